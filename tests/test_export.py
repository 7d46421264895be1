"""Export: each module to ONNX (checker-valid, manifest), ONNX Runtime output vs the PyTorch module at the tiny
preset (random fp32 weights), streaming state carried across steps, refusal of other weights / shapes, and
the TensorRT builder's refusal when TensorRT or CUDA is missing.

The exports run once per session (module-scoped fixture): the dynamo exporter takes seconds per module.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="onnxscript not installed (torch.onnx dynamo exporter)")

import onnx  # noqa: E402

from export.onnx_export import export_all  # noqa: E402
from export.ort import ManifestMismatch, OrtCode2Wav, OrtModule, apply_backends, check_entry  # noqa: E402
from export.wrappers import moe_experts_gather  # noqa: E402
from kernels.moe import moe_experts_ref, route_topk_ref  # noqa: E402
from runtime.kv_cache import DynamicKVCache  # noqa: E402
from runtime.weights import init_random  # noqa: E402

TOL = 1e-4  # fp32: ‖ort − torch‖ / ‖torch‖
MODULES = ["thinker_step", "code_predictor", "talker_step", "code2wav", "audio_encoder", "vision_encoder"]
FRAMES = 6
AUDIO_FRAMES = 137  # one full 100-frame chunk plus a remainder: padded chunk and window slots
VISION_GRID = (2, 6, 4)  # a video-like grid: two frames, non-square


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def assert_close(got, want, what):
    err = rel_err(got, want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL} (max abs {(got - want).abs().max().item():.3g})"


@pytest.fixture(scope="module")
def model():
    """The tiny checkpoint's model (random weights written once), so OmniEngine("tiny") can use the export."""
    from runtime.engine import OmniEngine

    return OmniEngine.from_pretrained("tiny", "cpu", torch.float32).model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_all(model, MODULES, out, torch.float32, {"code2wav_frames": FRAMES, "audio_frames": AUDIO_FRAMES,
                                                                 "vision_grid": VISION_GRID}, "tiny")
    return out, manifest


def empty_past(cfg, batch):
    return [torch.zeros(batch, 0, cfg.num_kv_heads, cfg.head_dim) for _ in range(2 * cfg.num_layers)]


def as_cache(past):
    cache = DynamicKVCache(len(past) // 2)
    if past[0].shape[1]:
        cache.keys, cache.values = list(past[0::2]), list(past[1::2])
    return cache


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


def test_files_pass_checker_and_manifest_describes_them(exported):
    out, manifest = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    for name in MODULES:
        entry = manifest["modules"][name]
        onnx.checker.check_model(str(out / entry["file"]))
        model = onnx.load(str(out / entry["file"]), load_external_data=False)
        assert [i.name for i in model.graph.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in model.graph.output] == [o["name"] for o in entry["outputs"]]
        assert entry["opset"] >= 17 and entry["dtype"] == "float32" and len(entry["weights_sha256"]) == 64
        assert entry["omni_rt_version"] and entry["checkpoint"] == "tiny"
        assert (out / entry["external_data"]).is_file()
    step = manifest["modules"]["thinker_step"]
    assert step["inputs"][1]["shape"] == [3, "batch", "seq"]  # TM-RoPE position ids
    assert step["inputs"][2]["shape"][:2] == ["batch", "past"] and step["inputs"][2]["name"] == "past_key_0"
    assert step["outputs"][2]["name"] == "present_key_0"
    assert manifest["modules"]["code2wav"]["inputs"][0]["shape"] == [1, 4, FRAMES]


@pytest.mark.parametrize("batch,length", [(1, 3), (2, 1)])
def test_thinker_step_matches_torch_over_steps(model, exported, batch, length):
    out, _ = exported
    thinker = model.thinker
    cfg = thinker.model.cfg
    session = OrtModule(out, "thinker_step", expect=thinker.model, dtype=torch.float32)
    torch.manual_seed(batch * 10 + length)
    cache, past = thinker.new_cache(), empty_past(cfg, batch)
    for step in range(4):  # prefill from an empty past, then 3 steps carrying the KV state
        ids = torch.randint(0, cfg.vocab_size, (batch, length))
        start = step * length
        pos = torch.stack((torch.arange(start, start + length), torch.arange(start, start + length) + 1,
                           torch.arange(start, start + length) + 2))[:, None].expand(3, batch, length).contiguous()
        with torch.no_grad():
            want = thinker(ids, cache=cache, position_ids=pos)
        logits, hidden, *past = session(ids, pos, *past)
        assert_close(logits, want.logits, f"thinker logits step {step}")
        for i, (got, ref) in enumerate(zip(past, flat(cache))):
            assert_close(got, ref, f"thinker present {i} step {step}")
    assert past[0].shape == (batch, 4 * length, cfg.num_kv_heads, cfg.head_dim)


def test_code_predictor_frame_matches_torch(model, exported):
    out, _ = exported
    predictor = model.talker.code_predictor
    cfg = predictor.model.cfg
    session = OrtModule(out, "code_predictor", expect=predictor)
    batch = 2
    torch.manual_seed(1)
    inputs = torch.randn(batch, 2, cfg.hidden_size)
    positions = torch.arange(2).expand(batch, -1).contiguous()
    cache, past = predictor.new_cache(), empty_past(cfg, batch)
    for step in range(predictor.num_code_groups - 1):  # the whole per-frame loop: prefill + G-2 steps
        with torch.no_grad():
            want = predictor(inputs, positions, cache, step)
        logits, *past = session(inputs, positions, torch.tensor(step), *past)
        assert_close(logits, want, f"code predictor logits step {step}")
        code = logits[:, -1].argmax(-1)
        assert torch.equal(code, want[:, -1].argmax(-1))
        if step < predictor.num_code_groups - 2:
            inputs = predictor.model.codec_embedding[step](code)[:, None].detach()
            positions = torch.full((batch, 1), step + 2)
    for got, ref in zip(past, flat(cache)):
        assert_close(got, ref, "code predictor present")


def test_talker_step_matches_torch_over_steps(model, exported):
    out, _ = exported
    talker = model.talker
    cfg = talker.model.cfg
    session = OrtModule(out, "talker_step", expect=talker)
    batch, length = 3, 2
    torch.manual_seed(2)
    cache, past = talker.new_cache(), empty_past(cfg, batch)
    for step in range(3):
        embeds = torch.randn(batch, length, cfg.hidden_size)
        pos = torch.arange(step * length, (step + 1) * length).expand(3, batch, length).contiguous()
        with torch.no_grad():
            want_logits, want_hidden = talker(embeds, pos, None, cache)
        logits, hidden, *past = session(embeds, pos, *past)
        assert_close(logits, want_logits, f"talker logits step {step}")
        assert_close(hidden, want_hidden, f"talker hidden step {step}")


def test_code2wav_matches_torch(model, exported):
    out, _ = exported
    code2wav = model.code2wav
    backend = OrtCode2Wav(out, code2wav)
    torch.manual_seed(3)
    for _ in range(2):
        codes = torch.randint(0, code2wav.cfg.codebook_size, (1, code2wav.cfg.num_quantizers, FRAMES))
        with torch.no_grad():
            want = code2wav(codes)
        assert_close(backend(codes), want, "code2wav waveform")


def test_audio_encoder_matches_torch(model, exported):
    out, _ = exported
    tower = model.thinker.audio_tower
    session = OrtModule(out, "audio_encoder", expect=tower, shapes={"input_features": [128, AUDIO_FRAMES]})
    torch.manual_seed(5)
    features = torch.randn(tower.cfg.num_mel_bins, AUDIO_FRAMES)
    with torch.no_grad():
        want = tower(features, torch.tensor([AUDIO_FRAMES]))
    assert_close(session(features)[0], want, "audio encoder")


def test_vision_encoder_matches_torch(model, exported):
    out, _ = exported
    visual = model.thinker.visual
    session = OrtModule(out, "vision_encoder", expect=visual)
    torch.manual_seed(6)
    pixels = torch.randn(VISION_GRID[0] * VISION_GRID[1] * VISION_GRID[2], 3 * 2 * 16 * 16)
    with torch.no_grad():
        embeds, deepstack = visual(pixels, torch.tensor([list(VISION_GRID)]))
    got = session(pixels)
    assert len(got) == 1 + len(deepstack)
    for i, (g, w) in enumerate(zip(got, [embeds, *deepstack])):
        assert_close(g, w, f"vision encoder output {i}")


def test_other_weights_are_refused(exported):
    out, manifest = exported
    other = init_random("tiny", "cpu", torch.float32, seed=1)
    with pytest.raises(ManifestMismatch) as err:
        OrtModule(out, "thinker_step", expect=other.thinker.model)
    message = str(err.value)
    assert manifest["modules"]["thinker_step"]["weights_sha256"] in message
    assert "other weights" in message and "loaded module has" in message
    with pytest.raises(ManifestMismatch, match="code2wav"):
        apply_backends(other, {"code2wav": f"ort:{out}"})


def test_other_shapes_are_refused(model, exported):
    out, manifest = exported
    entry = manifest["modules"]["code2wav"]
    with pytest.raises(ManifestMismatch, match=rf"\[1, 4, {FRAMES}\].*\[1, 4, {FRAMES + 3}\]"):
        check_entry(entry, "code2wav", None, shapes={"codes": [1, 4, FRAMES + 3]})
    backend = OrtCode2Wav(out, model.code2wav)
    with pytest.raises(ManifestMismatch, match="called with"):
        backend(torch.zeros(1, 4, FRAMES + 1, dtype=torch.long))
    with pytest.raises(ManifestMismatch, match="float32.*bfloat16"):
        check_entry(entry, "code2wav", None, dtype=torch.bfloat16)


def test_backends_plug_code2wav_into_the_model(model, exported):
    out, _ = exported
    torch.manual_seed(4)
    codes = torch.randint(0, 64, (1, 4, FRAMES))
    with torch.no_grad():
        want = model.code2wav(codes)
    from runtime.engine import OmniEngine

    engine = OmniEngine.from_pretrained("tiny", backends={"code2wav": f"ort:{out}", "thinker_step": f"ort:{out}",
                                                          "talker_step": "torch"})
    assert set(engine.backends) == {"code2wav", "thinker_step"}
    assert isinstance(engine.backends["code2wav"], OrtCode2Wav)
    assert_close(engine.model.code2wav(codes), want, "code2wav through the ort backend")
    with pytest.raises(ValueError, match="ort:DIR"):
        apply_backends(engine.model, {"code2wav": "onnx"})


def test_tensorrt_refuses_without_tensorrt_or_cuda(exported, tmp_path):
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


def test_tensorrt_builds_engines(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from export.trt import build_engines

    built = build_engines(exported[0], tmp_path, ["code_predictor", "code2wav"])
    for name in ("code_predictor", "code2wav"):
        assert (tmp_path / built["modules"][name]["engine"]).is_file()
    assert (tmp_path / "timing.cache").is_file() and (tmp_path / "manifest.json").is_file()
