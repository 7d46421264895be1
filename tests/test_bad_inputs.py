"""Every bad input a user can hand omni-rt, and the one clear error it gets (docs/bad_inputs.md is rendered from
CASES by scripts/bad_inputs_table.py; a test below keeps it up to date).

Each case builds its bad input in a temporary folder and calls the engine, the front ends, the checkpoint
loader, the export tools or the two CLIs (`python -m runtime`, `python -m export`). API cases assert the error
type, that the message names the input and says what is wrong, and that no request reached the engine (its loop
never started). CLI cases assert exit code 2, exactly one line on stderr naming the input, and no traceback.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests import bad_input_files as files


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # audio | image | video | text | options | checkpoint | export | cli | export-cli
    what: str  # the bad input, in words (a row of the docs table)
    error: type  # the exception type raised (CLI cases: the one behind the exit code 2; SystemExit: a usage error)
    names: str  # text the message must contain: the input's name (index, file, field, row)
    says: str  # regex the message must match: what is wrong with it
    run: Callable  # run(ctx): raises for API cases; returns argv for CLI cases


class Ctx:
    """What cases build on: a tiny checkpoint, an engine on it, a temporary folder, and for export cases two
    exports of the tiny preset's code predictor (seeds 0 and 1)."""

    def __init__(self, engine, checkpoint: Path, tmp: Path, exports=None):
        self.engine, self.checkpoint, self.tmp, self.exports = engine, checkpoint, tmp, exports

    def copy_checkpoint(self) -> Path:
        target = self.tmp / "checkpoint-copy"
        shutil.copytree(self.checkpoint, target)
        return target


def _tone(rate: int = 16000, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _with(value, index: int, samples: np.ndarray) -> np.ndarray:
    samples = samples.copy()
    samples[index] = value
    return samples


def gen(**kwargs):
    """A generate call whose inputs are bad: it must fail before any request reaches the engine."""
    return lambda ctx: ctx.engine.generate(**{"return_audio": False, "max_new_tokens": 2, **kwargs})


def gen_files(make: Callable[[Path], dict]):
    return lambda ctx: ctx.engine.generate(**{"return_audio": False, "max_new_tokens": 2, **make(ctx.tmp)})


def stream(**kwargs):
    return lambda ctx: ctx.engine.stream(**kwargs)


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long)


AUDIO = [
    Case("audio-nan-array", "audio", "NaN sample in a raw waveform", ValueError, "audio 0", "non-finite.*NaN",
         gen(text="hi", audio=_with(np.nan, 100, _tone()), sample_rate=16000)),
    Case("audio-inf-second-array", "audio", "inf sample in the second of two waveforms", ValueError, "audio 1",
         "non-finite.*inf", gen(text="hi", audio=[_tone(), _with(np.inf, 7, _tone())], sample_rate=16000)),
    Case("audio-nan-wav", "audio", "NaN sample in a float WAV file", ValueError, "nan.wav", "non-finite",
         gen_files(lambda tmp: dict(text="hi", audio=str(files.float_wav(tmp / "nan.wav", np.nan))))),
    Case("audio-rate-1", "audio", "sample_rate=1 (refused before resampling)", ValueError, "audio 0",
         "outside 1000..384000", gen(text="hi", audio=_tone(), sample_rate=1)),
    Case("audio-rate-huge", "audio", "sample_rate=10**7", ValueError, "audio 0", "outside 1000..384000",
         gen(text="hi", audio=_tone(), sample_rate=10**7)),
    Case("audio-rate-float", "audio", "sample_rate=16000.5", ValueError, "audio 0", "integer number of Hz",
         gen(text="hi", audio=_tone(), sample_rate=16000.5)),
    Case("audio-no-rate", "audio", "raw waveform without sample_rate", ValueError, "audio 0", "needs its sample_rate",
         gen(text="hi", audio=_tone())),
    Case("audio-2d", "audio", "stereo [n, 2] waveform", ValueError, "audio 0", "1-D",
         gen(text="hi", audio=np.zeros((800, 2), np.float32), sample_rate=16000)),
    Case("audio-complex", "audio", "complex waveform", ValueError, "audio 0", "real float",
         gen(text="hi", audio=np.ones(800, np.complex64), sample_rate=16000)),
    Case("audio-int16", "audio", "int16 PCM samples (raw scale, not [-1, 1])", ValueError, "audio 0",
         "integer dtype torch.int16.*32768", gen(text="hi", audio=np.zeros(800, np.int16), sample_rate=16000)),
    Case("audio-empty", "audio", "zero-length waveform", ValueError, "audio 0", "empty",
         gen(text="hi", audio=np.zeros(0, np.float32), sample_rate=16000)),
    Case("audio-corrupt-file", "audio", "random bytes named .wav", ValueError, "noise.wav", "could not decode",
         gen_files(lambda tmp: dict(text="hi", audio=str(files.random_bytes(tmp / "noise.wav"))))),
    Case("audio-missing-file", "audio", "audio file that does not exist", FileNotFoundError, "absent.wav",
         "not found", gen_files(lambda tmp: dict(text="hi", audio=str(tmp / "absent.wav")))),
]

IMAGE = [
    Case("image-truncated-jpeg", "image", "JPEG cut short", ValueError, "cut.jpg", "damaged",
         gen_files(lambda tmp: dict(text="hi", images=[str(files.truncated_jpeg(tmp / "cut.jpg"))]))),
    Case("image-text-as-jpg", "image", "a text file named .jpg", ValueError, "notes.jpg", "not an image",
         gen_files(lambda tmp: dict(text="hi", images=[str(files.text_file(tmp / "notes.jpg"))]))),
    Case("image-missing-file", "image", "image file that does not exist", FileNotFoundError, "nowhere.png",
         "does not exist", gen_files(lambda tmp: dict(text="hi", images=[str(tmp / "nowhere.png")]))),
    Case("image-float-array", "image", "float pixels instead of uint8", ValueError, "image 0", "uint8",
         gen(text="hi", images=[np.zeros((32, 32, 3), np.float32)])),
    Case("image-two-channels", "image", "[H, W, 2] array", ValueError, "image 0", "3 \\(RGB\\) channels",
         gen(text="hi", images=[np.zeros((32, 32, 2), np.uint8)])),
    Case("image-aspect", "image", "1x300 strip (aspect ratio over 200)", ValueError, "image", "aspect ratio",
         gen(text="hi", images=[np.zeros((1, 300, 3), np.uint8)])),
]

VIDEO = [
    Case("video-3d-array", "video", "a single [H, W, 3] frame as videos=", ValueError, "videos",
         "one video \\[num_frames, H, W, 3\\]", gen(text="hi", videos=np.zeros((32, 32, 3), np.uint8))),
    Case("video-not-a-video", "video", "a text file named .mp4", ValueError, "fake.mp4", "could not decode",
         gen_files(lambda tmp: dict(text="hi", videos=[str(files.text_file(tmp / "fake.mp4"))]))),
    Case("video-missing-file", "video", "video file that does not exist", FileNotFoundError, "gone.mp4",
         "does not exist", gen_files(lambda tmp: dict(text="hi", videos=[str(tmp / "gone.mp4")]))),
    Case("video-silent-with-audio", "video", "use_audio_in_video with a file that has no audio track", ValueError,
         "silent.mp4", "no audio track",
         gen_files(lambda tmp: dict(text="hi", videos=[str(files.video(tmp / "silent.mp4", audio=False))],
                                    use_audio_in_video=True))),
    Case("video-array-no-track", "video", "use_audio_in_video with a frame array and no audio track", ValueError,
         "video frame arrays", "needs their audio tracks",
         gen(text="hi", videos=[np.zeros((2, 64, 64, 3), np.uint8)], use_audio_in_video=True)),
    Case("video-fps-zero", "video", "video_fps=0", ValueError, "video_fps", "positive",
         gen(text="hi", videos=[np.zeros((2, 64, 64, 3), np.uint8)], video_fps=0)),
]

TEXT = [
    Case("text-not-utf8", "text", "text with undecodable bytes (a surrogate escape)", ValueError, "text",
         "not valid UTF-8", gen(text="caf\udce9")),
    Case("text-not-str", "text", "text=123", ValueError, "text", "must be a string", gen(text=123)),
    Case("ids-negative", "text", "a negative id in input_ids", ValueError, "row 1", "outside the vocabulary",
         gen(input_ids=_ids([[1, 2, 3], [4, -5, 6]]))),
    Case("ids-out-of-vocab", "text", "an id past the vocabulary in input_ids", ValueError, "row 0",
         "outside the vocabulary", gen(input_ids=_ids([[1, 10**6, 3]]))),
    Case("mask-all-zero", "text", "an all-zero attention_mask row", ValueError, "row 0", "no real token|all zeros",
         stream(input_ids=_ids([[1, 2, 3]]), attention_mask=_ids([[0, 0, 0]]), return_audio=False)),
    Case("messages-role", "text", "messages with role 'tool'", ValueError, "messages[0]", "role must be",
         gen(messages=[{"role": "tool", "content": "x"}])),
    Case("messages-media-in-assistant", "text", "an image in an assistant turn", ValueError,
         "messages[1].content[0]", "cannot carry image",
         gen(messages=[{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}])),
    Case("messages-and-text", "text", "messages= together with text=", ValueError, "messages=", "not both",
         gen(messages=[{"role": "user", "content": "hi"}], text="hi")),
    Case("messages-url", "text", "an http URL as an image part", ValueError, "http://example.com/a.png",
         "URL.*local files", gen(messages=[{"role": "user", "content": [
             {"type": "image", "image": "http://example.com/a.png"}, {"type": "text", "text": "?"}]}])),
    Case("empty-prompt", "text", "text='' and no media", ValueError, "prompt", "empty prompt", gen(text="")),
]

OPTIONS = [
    Case("dtype-string", "options", "dtype='float32' (a string)", ValueError, "'float32'", "torch.float32",
         lambda ctx: _from_pretrained(ctx.checkpoint, dtype="float32")),
    Case("speaker-int", "options", "speaker=123", TypeError, "speaker", "voice name",
         gen(text="hi", speaker=123)),
    Case("speaker-unknown", "options", "speaker='nobody'", ValueError, "'nobody'", "unknown speaker.*ethan",
         gen(text="hi", speaker="nobody", return_audio=True)),
    Case("max-new-tokens-float", "options", "max_new_tokens=2.5", TypeError, "max_new_tokens", "must be an int",
         gen(text="hi", max_new_tokens=2.5)),
    Case("talker-max-new-tokens-1", "options", "talker_max_new_tokens=1 (no frame possible)", ValueError,
         "talker_max_new_tokens", ">= 2", gen(text="hi", talker_max_new_tokens=1)),
]


def _from_pretrained(path, **kwargs):
    from runtime.engine import OmniEngine

    return OmniEngine.from_pretrained(path, **kwargs)


def _load_copy(ctx, damage: Callable[[Path], None]):
    path = ctx.copy_checkpoint()
    damage(path)
    return _from_pretrained(path)


def _random_init_too_big(ctx):
    """The released shapes in fp32 (~120 GB) with 8 GiB free: refused before anything is allocated. The free
    figure is pinned so the case never allocates, even on a machine that has the memory."""
    from unittest import mock

    from runtime import weights

    with mock.patch.object(weights, "available_bytes", return_value=8 << 30):
        _from_pretrained("qwen3-omni-30b-a3b", dtype=torch.float32)


CHECKPOINT = [
    Case("shard-truncated", "checkpoint", "a safetensors shard cut short", ValueError, "model.safetensors",
         "truncated", lambda ctx: _load_copy(ctx, files.truncate_shard)),
    Case("shard-header", "checkpoint", "a safetensors shard with a garbage header", ValueError, "model.safetensors",
         "truncated or not safetensors|damaged header",
         lambda ctx: _load_copy(ctx, lambda p: files.random_bytes(p / "model.safetensors"))),
    Case("index-json", "checkpoint", "a damaged model.safetensors.index.json", ValueError,
         "model.safetensors.index.json", "damaged",
         lambda ctx: _load_copy(ctx, lambda p: (p / "model.safetensors.index.json").write_text("{oops"))),
    Case("tokenizer-json", "checkpoint", "a broken tokenizer.json", ValueError, "tokenizer.json", "damaged",
         lambda ctx: _load_copy(ctx, lambda p: (p / "tokenizer.json").write_text('{"model": 1'))),
    Case("random-init-too-big", "checkpoint", "preset qwen3-omni-30b-a3b in fp32 with 8 GiB free", MemoryError,
         "torch.float32", "need 1[0-9][0-9].[0-9] GiB on cpu but only 8.0 GiB", _random_init_too_big),
]


def _cli(*argv):
    return lambda ctx: [a.format(tmp=ctx.tmp, ckpt=ctx.checkpoint) for a in argv]


def _cli_files(make: Callable[[Path], list]):
    return lambda ctx: [a.format(tmp=ctx.tmp, ckpt=ctx.checkpoint) for a in make(ctx.tmp)]


CLI = [
    Case("cli-truncated-jpeg", "cli", "--image with a JPEG cut short", ValueError, "cut.jpg", "damaged",
         _cli_files(lambda tmp: ["generate", "--checkpoint", "{ckpt}", "--text", "hi", "--image",
                                 str(files.truncated_jpeg(tmp / "cut.jpg"))])),
    Case("cli-text-as-jpg", "cli", "--image with a text file named .jpg", ValueError, "notes.jpg", "not an image",
         _cli_files(lambda tmp: ["generate", "--checkpoint", "{ckpt}", "--text", "hi", "--image",
                                 str(files.text_file(tmp / "notes.jpg"))])),
    Case("cli-usage", "cli", "an unknown flag (argparse's usage error)", SystemExit, "--colour",
         "unrecognized arguments", _cli("generate", "--checkpoint", "{ckpt}", "--text", "hi", "--colour")),
    Case("cli-out-suffix", "cli", "--out answer.xyz (unknown format, refused before loading)", ValueError,
         "answer.xyz", "cannot tell the audio format",
         _cli("generate", "--checkpoint", "{ckpt}", "--text", "hi", "--out", "{tmp}/answer.xyz")),
    Case("cli-out-folder", "cli", "--out in a folder that does not exist", ValueError, "no/such/dir", "does not exist",
         _cli("generate", "--checkpoint", "{ckpt}", "--text", "hi", "--out", "{tmp}/no/such/dir/a.wav")),
    Case("cli-preset-no-tokenizer", "cli", "--checkpoint qwen3-omni-30b-a3b --text hi (refused before allocating)",
         ValueError, "qwen3-omni-30b-a3b", "no tokenizer",
         _cli("generate", "--checkpoint", "qwen3-omni-30b-a3b", "--text", "hi")),
    Case("cli-truncated-shard", "cli", "--checkpoint with a truncated shard", ValueError, "model.safetensors",
         "truncated", lambda ctx: ["generate", "--checkpoint", str(_damaged(ctx, files.truncate_shard)),
                                   "--text", "hi", "--no-audio"]),
    Case("cli-broken-tokenizer", "cli", "--checkpoint with a broken tokenizer.json", ValueError, "tokenizer.json",
         "damaged", lambda ctx: ["generate", "--checkpoint",
                                 str(_damaged(ctx, lambda p: (p / "tokenizer.json").write_text("[1,"))),
                                 "--text", "hi", "--no-audio"]),
    Case("cli-messages-json", "cli", "--messages file that is not JSON", ValueError, "conv.json", "not valid JSON",
         _cli_files(lambda tmp: ["generate", "--checkpoint", "{ckpt}", "--messages",
                                 str(files.text_file(tmp / "conv.json"))])),
    Case("cli-unknown-speaker", "cli", "--speaker nobody", ValueError, "'nobody'", "unknown speaker",
         _cli("generate", "--checkpoint", "{ckpt}", "--text", "hi", "--speaker", "nobody", "--out", "{tmp}/a.wav")),
    Case("cli-nan-wav", "cli", "--audio float WAV holding NaN", ValueError, "nan.wav", "non-finite",
         _cli_files(lambda tmp: ["generate", "--checkpoint", "{ckpt}", "--text", "hi", "--no-audio", "--audio",
                                 str(files.float_wav(tmp / "nan.wav", np.nan))])),
]


def _damaged(ctx, damage):
    path = ctx.copy_checkpoint()
    damage(path)
    return path


def _export_cli(*argv):
    return lambda ctx: ["--preset", "tiny", "--modules", "code_predictor", "--out", str(ctx.tmp / "export"),
                        *argv]


def _open_export(ctx, damage: Callable[[Path, Path], None], **kwargs):
    """Copy the seed-0 export, damage it (given the seed-1 export too), open its code_predictor graph."""
    from export.ort import OrtModule

    first, other = ctx.exports
    target = ctx.tmp / "export-copy"
    shutil.copytree(first, target)
    damage(target, other)
    return OrtModule(target, "code_predictor", **kwargs)


def _swap(*names):
    return lambda target, other: [shutil.copyfile(other / n, target / n) for n in names]


def _bf16_against_fp32(ctx):
    from export.ort import OrtModule
    from runtime.weights import init_random

    model = init_random("tiny", "cpu", torch.bfloat16, seed=0)
    OrtModule(ctx.exports[0], "code_predictor", expect=model.talker.code_predictor, dtype=torch.bfloat16)


EXPORT = [
    Case("export-data-swapped", "export", "another export's .onnx.data swapped in", ValueError,
         "code_predictor.onnx.data", "sha256 differs", lambda ctx: _open_export(ctx, _swap("code_predictor.onnx.data"))),
    Case("export-interrupted", "export", "graph files of an interrupted re-export beside the old manifest",
         ValueError, "code_predictor.onnx", "not the file this manifest was written with",
         lambda ctx: _open_export(ctx, _swap("code_predictor.onnx", "code_predictor.onnx.data"))),
    Case("export-missing-file", "export", "a listed .onnx.data deleted", ValueError, "code_predictor.onnx.data",
         "missing", lambda ctx: _open_export(ctx, lambda t, o: (t / "code_predictor.onnx.data").unlink())),
    Case("export-manifest-corrupt", "export", "manifest.json that is not JSON", ValueError, "manifest.json",
         "damaged", lambda ctx: _open_export(ctx, lambda t, o: (t / "manifest.json").write_text("{\"modules\": "))),
    Case("export-dtype", "export", "a bfloat16 engine given a float32 export", ValueError, "bfloat16",
         "exported in float32, the runtime runs torch.bfloat16", _bf16_against_fp32),
    Case("export-profile-min-gt-max", "export-cli", "--profile batch=4:2:1 (min > max)", SystemExit,
         "batch=4:2:1", "MIN <= OPT <= MAX", _export_cli("--profile", "batch=4:2:1")),
    Case("export-profile-bogus-dim", "export-cli", "--profile bogus=1:1:2 (no module has it)", ValueError, "bogus",
         "no exported module has a dynamic dim", _export_cli("--profile", "bogus=1:1:2")),
    Case("export-profile-zero-frames", "export-cli", "--profile frames=0:0:0", SystemExit, "frames=0:0:0",
         "1 <= MIN", _export_cli("--modules", "code2wav", "--profile", "frames=0:0:0")),
    Case("export-audio-frames-0", "export-cli", "--shapes audio_frames=0", SystemExit, "audio_frames=0",
         "sizes >= 1", _export_cli("--modules", "audio_encoder", "--shapes", "audio_frames=0")),
    Case("export-profile-not-numbers", "export-cli", "--profile batch=1:x:4", SystemExit, "batch=1:x:4",
         "MIN:OPT:MAX", _export_cli("--profile", "batch=1:x:4")),
]

CASES: list[Case] = AUDIO + IMAGE + VIDEO + TEXT + OPTIONS + CHECKPOINT + CLI + EXPORT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from runtime.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    from runtime.engine import OmniEngine

    return OmniEngine.from_pretrained(checkpoint)


def test_enough_cases_in_every_area():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    areas = {c.area for c in CASES}
    assert {"audio", "image", "video", "text", "options", "checkpoint", "cli", "export", "export-cli"} <= areas, areas


@pytest.mark.parametrize("case", [c for c in CASES if c.area not in ("cli", "export", "export-cli")],
                         ids=lambda c: c.id)
def test_bad_input_api(case, engine, checkpoint, tmp_path):
    pytest.importorskip("soundfile")
    if case.area == "video":
        pytest.importorskip("av", reason="PyAV not installed (pip install av==18.1.0)")
    ctx = Ctx(engine, checkpoint, tmp_path)
    start = time.perf_counter()
    with pytest.raises(case.error) as raised:
        case.run(ctx)
    message = str(raised.value)
    assert case.names in message, f"{case.id}: message does not name {case.names!r}: {message}"
    assert _search(case.says, message), f"{case.id}: message does not say {case.says!r}: {message}"
    assert engine.loop is None, f"{case.id}: a request reached the engine before the error"
    assert time.perf_counter() - start < 60, f"{case.id}: the error came only after {time.perf_counter() - start} s"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny preset's code predictor exported twice, from seeds 0 and 1 (~20 s each)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript", reason="onnxscript not installed (torch.onnx dynamo exporter)")
    from export.onnx_export import export_all
    from runtime.weights import init_random

    out = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"export{seed}")
        export_all(init_random("tiny", "cpu", torch.float32, seed=seed).eval(), ["code_predictor"], folder,
                   checkpoint=f"preset:tiny:seed={seed}")
        out.append(folder)
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c.area == "export"], ids=lambda c: c.id)
def test_bad_input_export(case, exports, tmp_path):
    from export.ort import OrtModule

    with pytest.raises(case.error) as raised:
        case.run(Ctx(None, None, tmp_path, exports))
    message = str(raised.value)
    assert case.names in message and _search(case.says, message), f"{case.id}: {message}"
    OrtModule(exports[0], "code_predictor")  # the intact export still opens


def test_interrupted_reexport(exports, tmp_path, monkeypatch):
    """A re-export that dies inside a module leaves the previous export whole and usable; one that dies after
    renaming its files but before the manifest is refused by file name, never run with the wrong weights."""
    import export.onnx_export as onnx_export
    from export.ort import ManifestMismatch, OrtModule
    from runtime.weights import init_random

    target = tmp_path / "export"
    shutil.copytree(exports[0], target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    old_model = init_random("tiny", "cpu", torch.float32, seed=0).eval()
    new_model = init_random("tiny", "cpu", torch.float32, seed=1).eval()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C mid-export raises

    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "export_graph", crash)
        with pytest.raises(KeyboardInterrupt):
            onnx_export.export_all(new_model, ["code_predictor"], target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before, "files and manifest untouched, no staging"
    OrtModule(target, "code_predictor", expect=old_model.talker.code_predictor)

    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "_write_manifest", crash)
        with pytest.raises(KeyboardInterrupt):
            onnx_export.export_all(new_model, ["code_predictor"], target)
    assert (target / "manifest.json").read_bytes() == before["manifest.json"]
    with pytest.raises(ManifestMismatch, match="code_predictor.onnx.* not the file this manifest was written with"):
        OrtModule(target, "code_predictor", expect=old_model.talker.code_predictor)
    onnx_export.export_all(new_model, ["code_predictor"], target)  # a finished re-export is usable again
    OrtModule(target, "code_predictor", expect=new_model.talker.code_predictor)


@pytest.mark.parametrize("case", [c for c in CASES if c.area == "export-cli"], ids=lambda c: c.id)
def test_bad_input_export_cli(case, tmp_path, capsys):
    from export.__main__ import main

    argv = case.run(Ctx(None, None, tmp_path))
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"{case.id}: exit {code}, stderr {err!r}"
    assert case.names in lines[0] and _search(case.says, lines[0]), f"{case.id}: {lines[0]!r}"
    assert not (tmp_path / "export" / "manifest.json").exists(), "refused before anything was exported"


@pytest.mark.parametrize("case", [c for c in CASES if c.area == "cli"], ids=lambda c: c.id)
def test_bad_input_cli(case, checkpoint, tmp_path, capsys):
    from runtime.__main__ import main

    argv = case.run(Ctx(None, checkpoint, tmp_path))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors leave through SystemExit, as from the real command
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"{case.id}: exit code {code}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, f"{case.id}: stderr is not one line: {err!r}"
    assert case.names in lines[0] and _search(case.says, lines[0]), f"{case.id}: {lines[0]!r}"


def test_engine_serves_after_bad_inputs(engine, tmp_path):
    """Runs after the API cases (file order): none of them left the engine unable to serve."""
    for case in AUDIO[:3] + TEXT[:3]:
        with pytest.raises(case.error):
            case.run(Ctx(engine, None, tmp_path))
    result = engine.generate("hi", audio=_tone(), sample_rate=16000, max_new_tokens=3, return_audio=False)
    assert result.sequences.shape[1] > 3
    stream = engine.stream(text="hi", max_new_tokens=2, return_audio=False)
    assert sum(1 for _ in stream) >= 1


def test_cli_debug_shows_the_traceback(checkpoint, tmp_path, capsys):
    from runtime.__main__ import main

    argv = ["generate", "--checkpoint", str(checkpoint), "--text", "hi", "--out", str(tmp_path / "a.xyz")]
    assert main(argv + ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_non_utf8_argument_in_a_subprocess(checkpoint, tmp_path):
    """A real process and real argv bytes: Python decodes undecodable bytes to surrogates (surrogateescape)."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "runtime", "generate", "--checkpoint", str(checkpoint).encode(), b"--text",
            b"caf\xe9", b"--no-audio"]
    done = subprocess.run(argv, capture_output=True, timeout=300, env={**os.environ, "LC_ALL": "C.UTF-8"},
                          cwd=Path(__file__).resolve().parents[1])
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "UTF-8" in err


def test_sample_rate_1_fails_at_once(engine):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="sample_rate"):
        engine.generate("hi", audio=np.zeros(16000 * 35, np.float32), sample_rate=1, return_audio=False)
    assert time.perf_counter() - start < 1.0, "refused before resampling, not after"


def test_docs_table_is_up_to_date():
    from scripts.bad_inputs_table import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
    assert doc.read_text() == render(CASES), "docs/bad_inputs.md is stale: run python scripts/bad_inputs_table.py"


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text, re.S) is not None
