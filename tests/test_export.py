"""Export: every module to ONNX (checker-valid, manifest), ONNX Runtime output vs the PyTorch module on the tiny
oracle checkpoint (transformers' layout, random fp32 weights) at two or more shapes inside each profile or bucket
set, the KV state carried across steps, the whole pipeline with every module in ONNX Runtime equal to the PyTorch
pipeline, refusal of other weights / shapes / formats, and the TensorRT builder's refusal without TensorRT or CUDA.

The exports run once per session (module-scoped fixture): the dynamo exporter takes seconds per graph.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="onnxscript not installed (torch.onnx dynamo exporter)")

import onnx  # noqa: E402

from export.__main__ import parse_profile, parse_shapes  # noqa: E402
from export.onnx_export import FORMAT, MODULES, export_all  # noqa: E402
from export.backends import apply_backends  # noqa: E402
from export.ort import (ManifestMismatch, OrtAudioEncoder, OrtCode2Wav, OrtCode2WavStream,  # noqa: E402
                        OrtCodePredictorStep, OrtModule, OrtTalkerStep, OrtThinkerStep, OrtVisionEncoder, check_entry)
from export.wrappers import moe_experts_gather  # noqa: E402
from kernels.moe import moe_experts_ref, route_topk_ref  # noqa: E402
from runtime.engine import SCHEDULED_BACKENDS, OmniEngine  # noqa: E402
from runtime.models.decoder import DeepStack  # noqa: E402
from runtime.streaming import consume_together  # noqa: E402
from runtime.weights import init_random  # noqa: E402
from tests.oracle import build_oracle  # noqa: E402
from tests.test_generate import image_request  # noqa: E402

TOL = 1e-4  # fp32: ‖ort − torch‖ / ‖torch‖
SEED = 0  # checkpoint and prompt: a fixed draw whose greedy text and speech run long enough to compare
AUDIO_FRAMES_2 = 137  # a second audio bucket: one full 100-frame chunk plus a remainder (padded chunk slots)
VISION_GRIDS = [(1, 4, 6), (2, 6, 4)]  # the e2e image's grid and a video-like one: two frames, non-square
MAX_BATCH = 4  # the exported batch profile's max (a batch of 5 must be refused)
THINKER_TOKENS, TALKER_TOKENS = 8, 12


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def assert_close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL} (max abs {(got - want).abs().max().item():.3g})"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle")
    build_oracle("pow2", path, seed=SEED)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    return OmniEngine.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(engine):
    return engine.model


@pytest.fixture(scope="module")
def request_(engine):
    """A text + audio + image prompt (tests/test_generate.py's image_request), drawn once with a fixed seed."""
    torch.manual_seed(SEED)
    return image_request(engine.config, with_audio=True)


@pytest.fixture(scope="module")
def audio_frames(request_):
    return [request_["input_features"].shape[-1], AUDIO_FRAMES_2]


@pytest.fixture(scope="module")
def exported(model, checkpoint, audio_frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_all(model, MODULES, out, torch.float32, {"audio_frames": audio_frames,
                                                                "vision_grid": VISION_GRIDS},
                          str(checkpoint), None, {"batch": (1, 1, MAX_BATCH)})
    return out, manifest


def empty_cache(module):
    return module.new_cache()


def flat(cache):
    return [t for kv in zip(cache.keys, cache.values) for t in kv]


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (7, 5, 3), (0, 4, 2)])
def test_gathered_moe_matches_reference(tokens, experts, top_k):
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 12)
    weights, ids = route_topk_ref(torch.randn(tokens, experts), top_k, True)
    gate_up, down = torch.randn(experts, 2 * 10, 12), torch.randn(experts, 12, 10)
    want = moe_experts_ref(hidden, ids, weights, gate_up, down)
    got = moe_experts_gather(hidden, ids, weights, gate_up, down)
    assert got.shape == want.shape
    if tokens:
        assert_close(got, want, "moe")


def test_files_pass_checker_and_manifest_describes_them(model, exported, checkpoint, audio_frames):
    out, manifest = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == FORMAT and manifest["checkpoint"] == str(checkpoint)
    keys = {"thinker_step", "talker_step", "code_predictor", "code2wav", "code2wav_stream.first",
            "code2wav_stream.next", *(f"audio_encoder.{f}" for f in audio_frames), "vision_encoder.1x4x6",
            "vision_encoder.2x6x4"}
    assert set(manifest["modules"]) == keys
    for key, entry in manifest["modules"].items():
        onnx.checker.check_model(str(out / entry["file"]))
        graph = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        assert [i.name for i in graph.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in graph.output] == [o["name"] for o in entry["outputs"]]
        assert entry["opset"] >= 17 and entry["dtype"] == "float32" and len(entry["weights_sha256"]) == 64
        assert entry["omni_rt_version"] and (out / entry["external_data"]).is_file()
        assert key == entry["module"] or key.startswith(entry["module"] + ".")
    cfg = model.thinker.model.cfg
    step = manifest["modules"]["thinker_step"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in step["inputs"][:5]] == [
        ("inputs_embeds", ["batch", "seq", cfg.hidden_size], "float32"),
        ("position_ids", [3, "batch", "seq"], "float32"),
        ("attention_mask", ["batch", "past+seq"], "int64"),
        ("deepstack_embeds", [2, "batch", "seq", cfg.hidden_size], "float32"),
        ("past_key_0", ["batch", "past", cfg.num_kv_heads, cfg.head_dim], "float32")]
    layer = model.cfg.talker.accept_hidden_layer
    assert step["hidden_layers"] == [layer] and step["deepstack_levels"] == 2
    assert [(o["name"], o["shape"]) for o in step["outputs"][:3]] == [
        ("logits", ["batch", 1, cfg.vocab_size]), (f"hidden_states_{layer}", ["batch", "seq", cfg.hidden_size]),
        ("present_key_0", ["batch", "past+seq", cfg.num_kv_heads, cfg.head_dim])]
    assert step["profile"] == {"batch": [1, 1, MAX_BATCH], "seq": [1, 1, cfg.max_position_embeddings],
                               "past": [0, 512, cfg.max_position_embeddings - 1]}
    groups = model.talker.code_predictor.num_code_groups
    assert manifest["modules"]["code_predictor"]["profile"]["past"] == [0, 2, groups - 1]
    assert manifest["modules"]["code2wav"]["inputs"][0]["shape"] == ["batch", 4, "frames"]
    assert manifest["modules"][f"audio_encoder.{AUDIO_FRAMES_2}"]["bucket"] == {"audio_frames": AUDIO_FRAMES_2}
    assert manifest["modules"][f"audio_encoder.{AUDIO_FRAMES_2}"]["inputs"][0]["shape"] == [128, AUDIO_FRAMES_2]
    assert manifest["modules"]["vision_encoder.2x6x4"]["profile"] == {}
    c2w = model.code2wav.cfg
    for chunk in ("first", "next"):
        stream = manifest["modules"][f"code2wav_stream.{chunk}"]
        assert stream["bucket"] == {"chunk": chunk} and stream["kv_keep"] == c2w.sliding_window - 1
        assert stream["profile"] == {"batch": [1, 1, MAX_BATCH], "frames": [1, 1, 1024],
                                     "past": [0, c2w.sliding_window - 1, c2w.sliding_window - 1]}
        names = [i["name"] for i in stream["inputs"]]
        assert names[:3] == ["codes", "start_frame", "past_key_0"] and len(names) == len(stream["outputs"]) + 1
        assert any(n.startswith("conv_") for n in names) and any(n.startswith("tail_") for n in names)


def _tm_positions(start: int, batch: int, length: int) -> torch.Tensor:
    """[3, B, L] float32 t/h/w ids that differ per axis, with a fractional t (video grids make those)."""
    ids = torch.arange(start, start + length, dtype=torch.float32)
    return torch.stack((ids + 0.5, ids + 1, ids + 2))[:, None].expand(3, batch, length).contiguous()


@pytest.mark.parametrize("batch,length", [(1, 3), (2, 5)])
def test_thinker_step_matches_torch_over_steps(model, exported, batch, length):
    """Prefill with DeepStack rows and a left-padded row, then 3 decode steps carrying the KV state."""
    thinker = model.thinker
    cfg = thinker.model.cfg
    layer = model.cfg.talker.accept_hidden_layer
    backend = OrtThinkerStep(exported[0], thinker, torch.float32)
    torch.manual_seed(batch * 10 + length)
    want_cache, got_cache = thinker.new_cache(), thinker.new_cache()
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, 0] = 0 if batch > 1 else 1  # a left-padded row
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 1:3] = True
    deepstack = DeepStack(visual, [torch.randn(int(visual.sum()), cfg.hidden_size) for _ in range(2)])
    step_length, start = length, 0
    for step in range(4):
        embeds = torch.randn(batch, step_length, cfg.hidden_size)
        pos = _tm_positions(start, batch, step_length)
        with torch.no_grad():
            want, want_states = thinker.decode(embeds, pos, mask, want_cache, deepstack, hidden_layers=[layer, 0],
                                               num_logits_to_keep=1)
        got, got_states = backend(embeds, pos, mask, got_cache, deepstack, hidden_layers=[layer, 0],
                                  num_logits_to_keep=1)
        assert_close(got, want, f"thinker logits step {step}")
        assert_close(got_states[0], want_states[0], f"thinker hidden_states[{layer}] step {step}")
        assert got_states[1] is embeds
        for i, (g, w) in enumerate(zip(flat(got_cache), flat(want_cache))):
            assert_close(g, w, f"thinker present {i} step {step}")
        start, step_length, deepstack = start + step_length, 1, None
        mask = torch.cat((mask, torch.ones(batch, 1, dtype=torch.long)), dim=1)
    assert got_cache.keys[0].shape == (batch, length + 3, cfg.num_kv_heads, cfg.head_dim)


@pytest.mark.parametrize("batch,length", [(3, 2), (1, 4)])
def test_talker_step_matches_torch_over_steps(model, exported, batch, length):
    talker = model.talker
    cfg = talker.model.cfg
    backend = OrtTalkerStep(exported[0], talker, torch.float32)
    torch.manual_seed(2 + batch)
    want_cache, got_cache = talker.new_cache(), talker.new_cache()
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :1] = 0  # row 0 left-padded
    step_length, start = length, 0
    for step in range(3):
        embeds = torch.randn(batch, step_length, cfg.hidden_size)
        pos = _tm_positions(start, batch, step_length)
        with torch.no_grad():
            want_logits, want_hidden = talker(embeds, pos, mask, want_cache, num_logits_to_keep=1)
        logits, hidden = backend(embeds, pos, mask, got_cache, num_logits_to_keep=1)
        assert_close(logits, want_logits, f"talker logits step {step}")
        assert_close(hidden, want_hidden, f"talker hidden step {step}")
        for i, (g, w) in enumerate(zip(flat(got_cache), flat(want_cache))):
            assert_close(g, w, f"talker present {i} step {step}")
        start, step_length = start + step_length, 1
        mask = torch.cat((mask, torch.ones(batch, 1, dtype=torch.long)), dim=1)


@pytest.mark.parametrize("batch", [1, 3])
def test_code_predictor_frame_matches_torch(model, exported, batch):
    """The whole per-frame loop (a 2-token prefill, then G-2 single steps) with the KV state carried."""
    predictor = model.talker.code_predictor
    cfg = predictor.model.cfg
    backend = OrtCodePredictorStep(exported[0], predictor, torch.float32)
    torch.manual_seed(1 + batch)
    inputs = torch.randn(batch, 2, cfg.hidden_size)
    positions = torch.arange(2).expand(batch, -1)
    want_cache, got_cache = predictor.new_cache(), predictor.new_cache()
    for step in range(predictor.num_code_groups - 1):
        with torch.no_grad():
            want = predictor(inputs, positions, want_cache, step)
        got = backend(inputs, positions, got_cache, step)
        assert_close(got, want, f"code predictor logits step {step}")
        for i, (g, w) in enumerate(zip(flat(got_cache), flat(want_cache))):
            assert_close(g, w, f"code predictor present {i} step {step}")
        inputs = torch.randn(batch, 1, cfg.hidden_size)
        positions = torch.full((batch, 1), step + 2)


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 6), (2, 13)])
def test_code2wav_matches_torch(model, exported, batch, frames):
    code2wav = model.code2wav
    backend = OrtCode2Wav(exported[0], code2wav, torch.float32)
    torch.manual_seed(3 + frames)
    codes = torch.randint(0, code2wav.cfg.codebook_size, (batch, code2wav.cfg.num_quantizers, frames))
    with torch.no_grad():
        want = code2wav(codes)
    assert want.shape[-1] == code2wav.num_samples(frames)
    assert_close(backend(codes), want, f"code2wav waveform {batch}x{frames}")


@pytest.mark.parametrize("batch,chunks", [(1, [1, 3, 2, 5, 1]), (2, [4, 1, 6])])
def test_code2wav_stream_matches_torch_stream(model, exported, batch, chunks):
    """Streaming Code2Wav through the exported graphs, state carried across uneven chunks (the kept keys grow
    to the window and are trimmed): each chunk's samples and the state after it equal the PyTorch stream's, and
    the whole stream equals the full decode."""
    code2wav = model.code2wav
    backend = OrtCode2WavStream(exported[0], code2wav, torch.float32)
    codes = torch.randint(0, code2wav.cfg.codebook_size, (batch, code2wav.cfg.num_quantizers, sum(chunks)))
    ours, theirs = code2wav.new_state(batch), code2wav.new_state(batch)
    got_all, at = [], 0
    for n in chunks:
        got, want = backend(codes[..., at:at + n], ours), code2wav.decode_step(codes[..., at:at + n], theirs)
        at += n
        assert_close(got, want, f"samples of frames {at - n}..{at}")
        assert (ours.frames, ours.samples) == (theirs.frames, theirs.samples)
        for layer, (k, v) in enumerate(zip(theirs.keys, theirs.values)):
            assert_close(ours.keys[layer], k, f"kept keys of layer {layer} after {at} frames")
            assert_close(ours.values[layer], v, f"kept values of layer {layer} after {at} frames")
        for path in (*theirs.conv, *theirs.tails):
            mine = ours.conv.get(path, ours.tails.get(path))
            want_state = theirs.conv.get(path, theirs.tails.get(path))
            if want_state.numel():
                assert_close(mine, want_state, f"state {path} after {at} frames")
        got_all.append(got)
    assert_close(torch.cat(got_all, dim=-1), code2wav(codes), "whole stream vs full decode")
    assert backend(codes[..., :0], ours).shape == (batch, 1, 0)


def test_audio_encoder_buckets_match_torch(model, exported, audio_frames):
    tower = model.thinker.audio_tower
    backend = OrtAudioEncoder(exported[0], tower, torch.float32)
    torch.manual_seed(5)
    for frames in audio_frames:
        features = torch.randn(tower.cfg.num_mel_bins, frames)
        with torch.no_grad():
            want = tower(features, torch.tensor([frames]))
        assert_close(backend(features, torch.tensor([frames])), want, f"audio encoder, {frames} frames")


def test_vision_encoder_buckets_match_torch(model, exported):
    visual = model.thinker.visual
    backend = OrtVisionEncoder(exported[0], visual, torch.float32)
    torch.manual_seed(6)
    for grid in VISION_GRIDS:
        pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 16 * 16)
        with torch.no_grad():
            embeds, deepstack = visual(pixels, torch.tensor([list(grid)]))
        got_embeds, got_deepstack = backend(pixels, torch.tensor([list(grid)]))
        assert len(got_deepstack) == len(deepstack) == 2
        for i, (g, w) in enumerate(zip([got_embeds, *got_deepstack], [embeds, *deepstack])):
            assert_close(g, w, f"vision encoder {grid} output {i}")


# Greedy on every stage (the talker samples by default): both engines must choose the same tokens.
GREEDY = dict(do_sample=False, talker_do_sample=False, talker_repetition_penalty=1.0)


def test_whole_pipeline_with_every_scheduled_module_in_onnx_runtime(engine, checkpoint, exported, request_,
                                                                     monkeypatch):
    """generate() and stream() on a text + audio + image prompt, greedy, with every module the engine runs
    (runtime.engine.SCHEDULED_BACKENDS: encoders, thinker and talker steps fed from the slots, code predictor,
    Code2Wav's stream) run by ONNX Runtime: the same tokens and codec codes as the PyTorch engine and the same
    waveform within fp32 tolerance."""
    out, _ = exported
    want = engine.generate(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                           return_audio=True, **GREEDY)
    prompt_len = request_["input_ids"].shape[1]
    assert want.sequences.shape[1] - prompt_len >= 4 and want.codes.shape[-1] >= 4, (
        "the seeded prompt no longer gives enough text and speech to compare: pick another SEED")
    ort_engine = OmniEngine.from_pretrained(checkpoint, backends={name: f"ort:{out}" for name in SCHEDULED_BACKENDS})
    assert set(ort_engine.backends) == SCHEDULED_BACKENDS
    runs: dict[str, int] = {}
    original = OrtModule.__call__

    def counted(self, *tensors):
        module = self.entry["module"].split(".")[0]  # code2wav_stream.first / .next count as code2wav_stream
        runs[module] = runs.get(module, 0) + 1
        return original(self, *tensors)

    monkeypatch.setattr(OrtModule, "__call__", counted)
    got = ort_engine.generate(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                              return_audio=True, **GREEDY)
    frames = want.codes.shape[-1]
    groups = engine.model.talker.code_predictor.num_code_groups
    # one prefill (the prompt fits one chunk) and one step per fed token; the talker's prefill and one step
    # after each frame; a frame (code predictor, Code2Wav) from every code 0 drawn, before it is read: the last
    # code 0 ends the speech, and its frame is dropped (runtime/speech.py make_frames)
    assert runs == {"audio_encoder": 1, "vision_encoder": 1, "thinker_step": want.sequences.shape[1] - prompt_len,
                    "talker_step": frames + 1, "code_predictor": (frames + 1) * (groups - 1),
                    "code2wav_stream": frames + 1}, runs
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences.tolist()} != {want.sequences.tolist()}"
    assert torch.equal(got.codes, want.codes), f"{got.codes[:, 0].tolist()} != {want.codes[:, 0].tolist()}"
    assert got.waveform.shape == want.waveform.shape
    assert_close(got.waveform, want.waveform, "waveform")
    # two streams side by side: each session's steps see only its own slot
    streams = [ort_engine.stream(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                                 **GREEDY) for _ in range(2)]
    for events in consume_together(streams):
        chunks = [e for e in events if hasattr(e, "codes")]
        assert torch.equal(torch.cat([chunk.codes for chunk in chunks], dim=-1), want.codes[0])
        assert_close(torch.cat([chunk.samples for chunk in chunks]), want.waveform[0], "streamed waveform")


def test_the_full_code2wav_decode_is_refused_by_name(checkpoint, exported, request_):
    """The engine decodes Code2Wav frame by frame for every request: an exported full decode (`code2wav`) has
    no place there, and generate() and stream() say so, before any model work."""
    out, _ = exported
    every = OmniEngine.from_pretrained(checkpoint, backends={name: f"ort:{out}" for name in MODULES})
    assert sorted(set(MODULES) - SCHEDULED_BACKENDS) == ["code2wav"]
    for call in (every.generate, every.stream):
        with pytest.raises(NotImplementedError, match="exported backends for code2wav cannot run"):
            call(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS)


def test_other_weights_are_refused_by_every_backend(engine, exported):
    """The same config with other random weights: every module's backend refuses, naming both fingerprints."""
    out, manifest = exported
    other = init_random(engine.config, "cpu", torch.float32, seed=1)
    for name in MODULES:
        with pytest.raises(ManifestMismatch) as err:
            apply_backends(other, {name: f"ort:{out}"})
        message = str(err.value)
        entry = next(e for e in manifest["modules"].values() if e["module"] == name)
        assert message.startswith(name) and entry["weights_sha256"] in message, message
        assert "other weights" in message and "loaded module has" in message
    assert "forward" not in vars(other.code2wav) and "decode" not in vars(other.thinker)  # nothing plugged


def test_other_shapes_are_refused(model, exported, audio_frames):
    out, manifest = exported
    thinker = OrtThinkerStep(out, model.thinker, torch.float32)
    cfg = model.thinker.model.cfg
    embeds, pos = torch.randn(1, 2, cfg.hidden_size), _tm_positions(0, 1, 2)
    with pytest.raises(ManifestMismatch, match=r"inputs_embeds has shape \[1, 2, 7\].*axis 2 must be"):
        thinker(embeds[..., :7], pos, num_logits_to_keep=1)
    big = MAX_BATCH + 1
    with pytest.raises(ManifestMismatch, match=rf"batch = {big} is outside the exported profile \[1, {MAX_BATCH}\]"):
        thinker(torch.randn(big, 1, cfg.hidden_size), _tm_positions(0, big, 1))
    with pytest.raises(ManifestMismatch, match=r"attention_mask axis 1 is 3, must be past\+seq = 2"):
        thinker(embeds, pos, torch.ones(1, 3, dtype=torch.long), num_logits_to_keep=1)
    with pytest.raises(ManifestMismatch, match=r"dim 'seq' is 2 in one input and 3 in position_ids"):
        thinker(embeds, _tm_positions(0, 1, 3), num_logits_to_keep=1)
    with pytest.raises(ManifestMismatch, match=r"hidden_states \[3\] only, asked for \[1\]"):
        thinker(embeds, pos, hidden_layers=[1], num_logits_to_keep=1)
    with pytest.raises(ValueError, match="last position's logits only"):
        thinker(embeds, pos)
    audio = OrtAudioEncoder(out, model.thinker.audio_tower, torch.float32)
    with pytest.raises(ManifestMismatch, match=rf"a clip of frames 150 \(exported: {min(audio_frames)}, "
                                               rf"{max(audio_frames)}\).*audio_frames=150"):
        audio(torch.randn(128, 150), torch.tensor([150]))
    with pytest.raises(ManifestMismatch, match="one clip per call"):
        audio(torch.randn(128, 274), torch.tensor([137, 137]))
    vision = OrtVisionEncoder(out, model.thinker.visual, torch.float32)
    with pytest.raises(ManifestMismatch, match=r"grid 1x4x4 \(exported: 1x4x6, 2x6x4\).*vision_grid=1x4x4"):
        vision(torch.randn(16, 1536), torch.tensor([[1, 4, 4]]))
    code2wav = OrtCode2Wav(out, model.code2wav, torch.float32)
    with pytest.raises(ManifestMismatch, match=r"codes has shape \[1, 3, 5\], exported as \['batch', 4, 'frames'\]"):
        code2wav(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ManifestMismatch, match="frames = 1025 is outside the exported profile"):
        code2wav(torch.zeros(1, 4, 1025, dtype=torch.long))
    entry = manifest["modules"][f"audio_encoder.{AUDIO_FRAMES_2}"]
    with pytest.raises(ManifestMismatch, match=rf"\[128, {AUDIO_FRAMES_2}\].*\[128, 200\]"):
        check_entry(entry, "audio_encoder", None, shapes={"input_features": [128, 200]})
    with pytest.raises(ManifestMismatch, match="float32.*bfloat16"):
        OrtCode2Wav(out, model.code2wav, torch.bfloat16)


def test_other_formats_and_missing_modules_are_refused(model, exported, tmp_path):
    out, manifest = exported
    stale = dict(manifest, format="omni-rt-export/1")
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    with pytest.raises(ManifestMismatch, match="export format 'omni-rt-export/1'.*re-export"):
        OrtCode2Wav(tmp_path, model.code2wav)
    only = dict(manifest, modules={"code2wav": manifest["modules"]["code2wav"]})
    (tmp_path / "manifest.json").write_text(json.dumps(only))
    with pytest.raises(KeyError, match="'talker_step' was not exported"):
        apply_backends(model, {"talker_step": f"ort:{tmp_path}"})
    with pytest.raises(KeyError, match="bucketed: open one of vision_encoder.1x4x6"):
        OrtModule(out, "vision_encoder")
    with pytest.raises(ValueError, match="unknown module 'thinker'"):
        apply_backends(model, {"thinker": f"ort:{out}"})
    with pytest.raises(ValueError, match="ort:DIR"):
        apply_backends(model, {"code2wav": "onnx"})
    # A bf16 export (manifest as `--dtype bfloat16` writes it): ONNX Runtime cannot run it, said before loading.
    entry = manifest["modules"]["code2wav"]
    bf16 = dict(entry, dtype="bfloat16", outputs=[dict(o, dtype="bfloat16") for o in entry["outputs"]])
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, modules={"code2wav": bf16})))
    with pytest.raises(ManifestMismatch, match="exported in bfloat16.*export.trt"):
        OrtModule(tmp_path, "code2wav")


def test_torch_entries_leave_modules_alone(checkpoint, exported):
    engine = OmniEngine.from_pretrained(checkpoint, backends={"code2wav": f"ort:{exported[0]}", "talker_step": "torch"})
    assert set(engine.backends) == {"code2wav"}
    assert engine.model.code2wav.forward is engine.backends["code2wav"]
    assert "forward" not in vars(engine.model.talker)  # the PyTorch talker, untouched


def test_cli_shapes_and_profile_parse(model, tmp_path):
    assert parse_shapes("audio_frames=137/200,vision_grid=1x4x6") == {"audio_frames": [137, 200],
                                                                      "vision_grid": [(1, 4, 6)]}
    assert parse_profile("batch=1:1:4,code_predictor.past=0:1:14") == {"batch": (1, 1, 4),
                                                                        "code_predictor.past": (0, 1, 14)}
    with pytest.raises(SystemExit, match="unknown key 'code2wav_frames'"):
        parse_shapes("code2wav_frames=8")
    with pytest.raises(SystemExit, match="MIN:OPT:MAX"):
        parse_profile("batch=4")
    # Refused before anything is exported: a dim no module has, one the named module lacks, min > opt.
    with pytest.raises(ValueError, match="no exported module has a dynamic dim bach"):
        export_all(model, ["code2wav"], tmp_path, profile={"bach": (1, 1, 4)})
    with pytest.raises(ValueError, match=r"code2wav: no dynamic dim seq \(it has: batch, frames\)"):
        export_all(model, ["code2wav"], tmp_path, profile={"code2wav.seq": (1, 1, 4)})
    with pytest.raises(ValueError, match="needs min <= opt <= max"):
        export_all(model, ["code2wav"], tmp_path, profile={"frames": (8, 1, 16)})
    assert not list(tmp_path.iterdir())


def test_cli_profile_dim_of_one_module_among_several(tmp_path, capsys):
    from export.__main__ import main

    # "frames" is code2wav's alone: checked against all modules exported together, not each one by itself.
    assert main(["--preset", "tiny", "--modules", "code2wav,code_predictor", "--profile", "frames=1:4:16",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] code2wav exported in" in printed and "[2/2] code_predictor exported in" in printed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    profiles = {e["module"]: e["profile"] for e in manifest["modules"].values()}
    assert profiles["code2wav"]["frames"] == [1, 4, 16]
    assert "frames" not in profiles["code_predictor"]


def test_tensorrt_refuses_without_tensorrt_or_cuda(engine, exported, tmp_path):
    from export.trt import TensorRTUnavailable, build_engines

    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if has_trt and torch.cuda.is_available():
        pytest.skip("TensorRT and CUDA present: the refusal path does not apply (see the build test)")
    with pytest.raises(TensorRTUnavailable, match="tensorrt" if not has_trt else "CUDA"):
        build_engines(exported[0], tmp_path)
    other = init_random(engine.config, "cpu", torch.float32, seed=1)
    with pytest.raises(TensorRTUnavailable, match="tensorrt" if not has_trt else "CUDA"):
        apply_backends(other, {"code2wav": f"trt:{exported[0]}"})
    assert "forward" not in vars(other.code2wav)


def test_tensorrt_builds_engines(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from export.trt import build_engines

    built = build_engines(exported[0], tmp_path, ["code_predictor", "code2wav", "audio_encoder"])
    assert {e["module"] for e in built["modules"].values()} == {"code_predictor", "code2wav", "audio_encoder"}
    for key, entry in built["modules"].items():
        assert (tmp_path / entry["engine"]).is_file()
    assert built["modules"]["code2wav"]["profile_shapes"]["codes"][2] == [MAX_BATCH, 4, 1024]
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "manifest.json").is_file()


def test_whole_pipeline_with_the_scheduled_modules_in_tensorrt(engine, checkpoint, exported, request_, tmp_path):
    """As the ONNX Runtime pipeline test, with the scheduled modules' engines built and run by TensorRT (fp32,
    TF32 off)."""
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from export.trt import TrtModule, build_engines

    build_engines(exported[0], tmp_path)
    want = engine.generate(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                           return_audio=True)
    trt_engine = OmniEngine.from_pretrained(checkpoint, backends={name: f"trt:{tmp_path}" for name in SCHEDULED_BACKENDS})
    sessions = [s for b in trt_engine.backends.values()
                for s in (b.buckets.graphs.values() if hasattr(b, "buckets") else [b.session])]
    assert sessions and all(isinstance(s, TrtModule) for s in sessions)
    got = trt_engine.generate(**request_, max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                              return_audio=True)
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences.tolist()} != {want.sequences.tolist()}"
    assert torch.equal(got.codes, want.codes)
    assert_close(got.waveform, want.waveform, "waveform")
    with pytest.raises(ManifestMismatch, match="not a TensorRT engine"):
        apply_backends(init_random(engine.config, "cpu", torch.float32, seed=1), {"code2wav": f"trt:{exported[0]}"})
