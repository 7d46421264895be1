"""The whole model at the tiny config through the Triton kernels equals the torch references (issue: Triton
kernels, "same outputs through the kernels as through the references"): thinker logits on a multimodal prompt,
talker and code-predictor logits, Code2Wav (full and streamed through per-slot pools), and a scheduler
session whose prefill chunks (front-padded to static buckets, as CUDA graphs capture them) and decode steps run
on the static KV cache with Triton decode attention.
fp32, on CUDA where present (compiled Triton takes device tensors only; TF32 off so the torch references stay
fp32), else on the CPU under Triton's interpreter (tests/conftest.py)."""

import pytest
import torch

from runtime import dispatch
from runtime.engine import OmniEngine
from runtime.models.code2wav import Code2WavSlots
from tests.oracle import build_oracle, rel_err
from tests.test_generate import GREEDY, image_request, speech_request

TOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ISSUE_OPS = ["route_topk", "moe_experts", "qk_norm_rope", "rms_norm", "decode_attention", "causal_conv1d",
             "causal_conv1d_update", "causal_conv_transpose1d", "causal_conv_transpose1d_update"]


@pytest.fixture(autouse=True)
def exact_fp32_references():
    """cuDNN convs (and, if asked, matmuls) default to TF32 on a GPU: the fp32 references must stay fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle")
    build_oracle("odd", path, seed=int(torch.randint(0, 2**31, ()).item()))
    return OmniEngine.from_pretrained(path, device=DEVICE)


def test_every_hot_op_has_a_triton_kernel():
    missing = [op for op in ISSUE_OPS if "triton" not in dispatch.backends(op)]
    assert not missing, f"no Triton implementation registered for: {missing}"


@torch.no_grad()
def test_thinker_talker_predictor_through_triton(engine):
    model, cfg = engine.model, engine.config
    request = {k: v.to(DEVICE) for k, v in image_request(cfg, with_audio=True).items()}
    inputs = {k: v for k, v in request.items() if k != "input_ids"}
    from runtime.models.thinker import MultimodalInputs

    mm = MultimodalInputs(**inputs)
    want = model.thinker(request["input_ids"], inputs=mm, num_logits_to_keep=4)
    hidden = torch.randn(3, 5, cfg.talker.text.hidden_size, device=DEVICE)
    positions = torch.arange(5, device=DEVICE).expand(3, 3, -1)
    want_talker = model.talker(hidden, positions)
    code0 = torch.randint(0, 64, (3,), device=DEVICE)
    want_codes, want_predictor = model.talker.predict_frame(hidden[:, -1], code0, return_logits=True)
    with dispatch.using("triton"):
        got = model.thinker(request["input_ids"], inputs=mm, num_logits_to_keep=4)
        got_talker = model.talker(hidden, positions)
        got_codes, got_predictor = model.talker.predict_frame(hidden[:, -1], code0, return_logits=True)
    assert rel_err(got.logits, want.logits) <= TOL
    assert rel_err(got_talker[0], want_talker[0]) <= TOL
    assert rel_err(got_predictor, want_predictor) <= TOL


@torch.no_grad()
def test_code2wav_full_and_streamed_through_triton(engine):
    code2wav = engine.model.code2wav
    cfg = code2wav.cfg
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.num_quantizers, 5), device=DEVICE)
    want = code2wav(codes)
    pool = Code2WavSlots(code2wav, 2, DEVICE, torch.float32)
    with dispatch.using("triton"):
        got = code2wav(codes)
        pool.reset(0)
        pool.reset(1)
        frames = [code2wav.decode_frame(codes[:, :, f:f + 1], pool.view(torch.tensor([1, 0], device=DEVICE), f == 0))
                  for f in range(codes.shape[-1])]
    assert rel_err(got, want) <= TOL
    assert rel_err(torch.cat(frames, dim=-1), want) <= TOL


def test_scheduler_session_through_triton(engine):
    from tests.test_scheduler import _check_alone, _sharing

    request, offline = speech_request(engine, min_frames=2, max_new_tokens=4, talker_max_new_tokens=4, **GREEDY)
    with dispatch.using("triton"):
        events = list(_sharing(engine, max_sessions=2, prefill_chunk=16, static_prefill=True).stream(**request))
    _check_alone(engine, request, offline, events)
