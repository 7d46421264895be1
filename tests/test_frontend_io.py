"""Files in and out: speech written as wav / flac / mp3 / opus / raw pcm16 and read back, image files turned
upright and composited like transformers does, the cached tiny checkpoint rebuilt when damaged, random init
refused when it cannot fit, and the CLI writing each output format."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.frontend import audio as audio_frontend
from runtime.frontend.vision import load_image, preprocess_images

soundfile = pytest.importorskip("soundfile")


@pytest.fixture
def rng():
    seed = int(torch.randint(0, 2**31, ()).item())
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _speech_like(rng, num_samples: int, rate: int = 24000) -> np.ndarray:
    t = np.arange(num_samples) / rate
    voice = 0.3 * np.sin(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 3 * t)) * t)
    return (voice + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------------------------------------

def test_available_formats_cover_every_output():
    for name, (container, subtype) in audio_frontend.OUTPUT_FORMATS.items():
        assert container in soundfile.available_formats(), name
        assert subtype in soundfile.available_subtypes(container), name


@pytest.mark.parametrize("suffix, format", [(".wav", "wav"), (".flac", "flac"), (".mp3", "mp3"), (".opus", "opus"),
                                            (".ogg", "opus"), (".pcm", "pcm16")])
def test_written_audio_decodes_back(suffix, format, tmp_path, rng):
    """Lossless formats give every sample back at 16 bits; mp3 and opus (lossy) decode to the same number of
    samples (libsndfile trims the encoder delay) and stay close to the signal (codec tolerance)."""
    num_samples = int(rng.integers(24000, 72000))  # 1..3 s, not a multiple of any codec frame
    samples = _speech_like(rng, num_samples)
    path = tmp_path / f"answer{suffix}"
    assert audio_frontend.write_audio(path, samples, 24000) == format
    if format == "pcm16":
        decoded = np.frombuffer(path.read_bytes(), dtype="<i2").astype(np.float32) / 32768
        rate = 24000
    else:
        decoded, rate = soundfile.read(path, dtype="float32")
    assert rate == 24000
    assert decoded.shape == (num_samples,), f"{format}: {decoded.shape} samples, wrote {num_samples}"
    err = np.linalg.norm(decoded - samples) / np.linalg.norm(samples)
    if format in ("wav", "flac", "pcm16"):
        assert np.abs(decoded - samples).max() <= 1 / 32768 + 1e-7, format
    else:
        # Measured on this signal: mp3 (LAME, default VBR) ~0.05, opus ~0.1-0.3 (it may shift phase). A codec
        # that decoded silence or noise would be ~1.
        assert err < 0.6, f"{format}: relative error {err:.3f}"
        spectrum = np.abs(np.fft.rfft(decoded)), np.abs(np.fft.rfft(samples))
        corr = np.corrcoef(*spectrum)[0, 1]
        assert corr > 0.9, f"{format}: magnitude spectrum correlation {corr:.3f}"


def test_format_choice_and_errors(tmp_path):
    assert audio_frontend.output_format(tmp_path / "x.bin", "mp3") == "mp3"  # --format wins over the suffix
    assert audio_frontend.output_format(tmp_path / "x.OGG") == "opus"
    with pytest.raises(ValueError, match="x.bin.*suffix"):
        audio_frontend.output_format(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="unknown audio format 'aac'"):
        audio_frontend.output_format(tmp_path / "x.wav", "aac")
    with pytest.raises(ValueError, match="does not exist"):
        audio_frontend.output_format(tmp_path / "missing" / "x.wav")
    with pytest.raises(ValueError, match="non-finite"):
        audio_frontend.write_audio(tmp_path / "x.wav", np.array([0.0, np.nan], np.float32), 24000)
    pcm = (np.arange(-100, 100) * 100).astype(np.int16)
    audio_frontend.write_audio(tmp_path / "x.wav", pcm, 24000)
    assert np.array_equal(soundfile.read(tmp_path / "x.wav", dtype="int16")[0], pcm)


@pytest.mark.parametrize("out", ["answer.mp3", "answer.opus", "answer.pcm"])
def test_cli_writes_each_format(out, tmp_path, monkeypatch):
    from runtime.__main__ import main
    from runtime.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny")
    path = tmp_path / out
    assert main(["generate", "--checkpoint", str(checkpoint), "--text", "Say something.", "--out", str(path),
                 "--max-new-tokens", "4", "--talker-max-new-tokens", "6"]) == 0
    if out.endswith(".pcm"):
        assert path.stat().st_size > 0 and path.stat().st_size % 2 == 0
    else:
        decoded, rate = soundfile.read(path)
        assert rate == 24000 and decoded.size > 0


def test_cli_defaults_fit_a_spoken_answer():
    from runtime.__main__ import build_parser

    args = build_parser().parse_args(["generate", "--checkpoint", "x", "--text", "hi"])
    assert args.max_new_tokens >= 512
    assert args.talker_max_new_tokens * 0.08 >= 300, "at least 5 minutes of speech"
    assert args.format is None and args.out == "out.wav"


# ----------------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------------

def test_exif_orientation_is_applied_like_transformers(tmp_path, rng):
    from transformers.image_utils import load_image as hf_load_image

    pixels = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    ours = load_image(path)
    assert ours.size == (48, 80), "turned upright: the stored 80x48 image displays as 48x80"
    want = hf_load_image(str(path))
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(want))
    features, grid = preprocess_images([ours])
    hf_features, hf_grid = preprocess_images([np.asarray(want)])
    assert torch.equal(grid, hf_grid) and torch.equal(features, hf_features)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white_for_paths_and_pil(mode, tmp_path, rng):
    """A file and the same image as a PIL object give the same pixels: transparency on white, as transformers'
    image processor composites a PIL image (its file loader would instead drop the alpha channel)."""
    from transformers.image_transforms import convert_to_rgb

    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    path = tmp_path / "alpha.png"
    image.save(path)
    from_path = preprocess_images([load_image(path)])[0]
    from_pil = preprocess_images([Image.open(path)])[0]
    want = preprocess_images([convert_to_rgb(Image.open(path), return_numpy=True)])[0]
    assert torch.equal(from_path, from_pil)
    assert torch.equal(from_path, want)


def test_damaged_image_files_are_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ValueError, match="cut.jpg.*damaged"):
        load_image(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match="text.jpg.*not an image"):
        load_image(tmp_path / "text.jpg")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated weights", "broken tokenizer", "missing tokenizer", "bad config"])
def test_damaged_tiny_cache_is_rebuilt(damage, tmp_path):
    from runtime.engine import OmniEngine
    from runtime.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(tmp_path / "tiny")
    weights = path / "model.safetensors"
    if damage == "truncated weights":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    elif damage == "broken tokenizer":
        (path / "tokenizer.json").write_text("{")
    elif damage == "missing tokenizer":
        (path / "tokenizer.json").unlink()
    else:
        (path / "config.json").write_text("not json")
    assert ensure_tiny_checkpoint(path) == path
    engine = OmniEngine.from_pretrained(path)  # loads: every file is whole again
    assert engine.tokenizer is not None
    assert not list(tmp_path.glob(".tiny-*")), "the staging folder is gone"


def test_random_init_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    from runtime import weights

    monkeypatch.setattr(weights, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(weights.InsufficientMemoryError, match=r"need .* GiB on cpu but only 0.0 GiB"):
        weights.init_random("tiny", dtype=torch.float32)
    monkeypatch.setattr(weights, "available_bytes", lambda device: None)  # unknown: no refusal
    assert weights.init_random("tiny", dtype=torch.float32) is not None


def test_meminfo_is_read():
    from runtime.weights import available_bytes

    free = available_bytes("cpu")
    assert free is None or free > 0


# ----------------------------------------------------------------------------------------------------------
# Raw inputs that are fine
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from runtime.engine import OmniEngine
    from runtime.tiny import write_tiny_checkpoint

    return OmniEngine.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_bare_video_array_is_one_video(engine, rng):
    clip = rng.integers(0, 256, (4, 64, 96, 3), dtype=np.uint8)
    bare, listed = engine.prepare("hi", videos=clip), engine.prepare("hi", videos=[clip])
    assert torch.equal(bare.input_ids, listed.input_ids)
    assert torch.equal(bare.inputs.pixel_values_videos, listed.inputs.pixel_values_videos)
    two = engine.prepare("hi", videos=np.stack([clip, clip]))  # [N, T, H, W, 3]: N videos
    assert two.inputs.video_grid_thw.shape[0] == 2


def test_sample_rate_forms_accepted(engine, rng):
    pytest.importorskip("soxr")
    wave = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    want = engine.prepare("hi", audio=wave, sample_rate=16000)
    for rate in (np.int64(16000), 16000.0):
        got = engine.prepare("hi", audio=wave, sample_rate=rate)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.inputs.input_features,
                                                                         want.inputs.input_features)
