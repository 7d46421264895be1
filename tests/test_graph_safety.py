"""Graph safety of every stage the runtime captures, at the released 30B-A3B shapes, without a GPU.

The model is built on the meta device in bf16 with the Triton kernels selected (runtime/graph_audit.py says why
meta and how ops are counted); every `ModelRunner.capture_plan()` stage — the audio and vision encoders per
bucket, thinker and talker prefill chunks per bucket, each decode stage per batch bucket, the code predictor's
frame, Code2Wav's first and later frames — runs under a strict
StepAudit, which fails on a host sync, a host copy or a CPU computation inside the step. The other tests show
that the audit does catch each of those, including the CPU-built TM-RoPE table that once broke every capture.
"""

import pytest
import torch

from runtime import dispatch
from runtime.config import OmniConfig
from runtime.graph_audit import GraphSafetyError, meta_model
from runtime.options import SchedulerConfig
from runtime.runner import ModelRunner, batch_buckets, prefill_buckets

SLOTS, PREFILL_CHUNK = 8, 512


@pytest.fixture(scope="module")
def released():
    config = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    model = meta_model(config, torch.bfloat16)
    with dispatch.using("triton"):
        runner = ModelRunner(model.model, config, SchedulerConfig(
            max_sessions=SLOTS, max_seq_len=4096, prefill_chunk=PREFILL_CHUNK, use_graphs=False, static_prefill=True))
    return model, runner


def _stage(runner, name: str, size: int = 1):
    return next(s for s in runner.capture_plan() if s.name == name and s.size == size)


def test_every_captured_stage_is_graph_safe_at_released_shapes(released):
    model, runner = released
    plan = runner.capture_plan()
    covered = {(spec.name, spec.size) for spec in plan}
    expected = {(name, size) for size in prefill_buckets(PREFILL_CHUNK) for name in ("thinker_prefill", "talker_prefill")}
    expected |= {("audio_encoder", size) for size in (1, 2, 4, 8, 16, 24, 32)}  # whole chunks, then 8-chunk windows
    expected |= {("vision_encoder", 2 ** power) for power in range(4, 15)}  # 16 .. 16,384 patches per frame
    expected |= {(name, size) for size in batch_buckets(SLOTS)
                 for name in ("thinker_decode", "talker_decode", "code_predictor", "code2wav", "code2wav_first")}
    assert covered == expected
    with dispatch.using("triton"):
        for spec in plan:
            report, outputs = model.audit(spec.fn, spec.example_inputs, strict=True)
            assert not report.violations and report.host_syncs == report.h2d_copies == report.d2h_copies == 0
            assert report.kernels > 0, spec.name
            assert all(out.device.type == "meta" for out in outputs), spec.name
            assert report.ops.get("omni_rt_triton::moe_experts", 0) > 0 or spec.name in (
                "code_predictor", "code2wav", "code2wav_first", "audio_encoder", "vision_encoder")
            # the sampling runs inside the decode steps: one fused filter+draw per token (G − 1 per code-predictor frame)
            draws = {"thinker_decode": 1, "talker_decode": 1,
                     "code_predictor": runner.config.talker.num_code_groups - 1}.get(spec.name, 0)
            assert report.ops.get("omni_rt_triton::sample", 0) == draws, (spec.name, report.ops)


def test_decode_step_reads_the_routed_weights_once(released):
    """Thinker decode at batch 1 reads ~6 GB of bf16 weights (top-8 of 128 experts in 48 layers, attention, head):
    the byte count is what bench/launches.py reports as the step's floor."""
    model, runner = released
    spec = _stage(runner, "thinker_decode")
    with dispatch.using("triton"):
        report, _ = model.audit(spec.fn, spec.example_inputs)
    assert 5e9 < report.weight_bytes < 8e9, report.weight_bytes


def test_an_embedding_lookup_reads_its_rows_only(released):
    """The talker step embeds one fed text token through the thinker's 152k-row table: the byte count is the rows
    looked up, not the table (which would double the talker step's floor)."""
    model, _ = released
    table = model.model.thinker.model.embed_tokens
    ids = torch.zeros(3, dtype=torch.long, device="meta")
    report, _ = model.audit(table, (ids,))
    assert report.weight_bytes == 3 * table.weight.shape[1] * table.weight.element_size()


def test_a_cpu_built_rope_table_is_caught(released, monkeypatch):
    """The bug this test exists for: the TM-RoPE axis table built on the host and copied in every step."""
    import kernels.rope as rope

    built_on_device = rope.tm_rope_axis_of_slot

    def built_on_host(num_slots, mrope_section, device=None):
        return built_on_device(num_slots, mrope_section, "cpu").to(device)  # a host-to-device copy per call

    monkeypatch.setattr(rope, "tm_rope_axis_of_slot", built_on_host)
    model, runner = released
    spec = _stage(runner, "talker_decode")
    with dispatch.using("triton"), pytest.raises(GraphSafetyError, match="(CPU computation|host-to-device copy).*kernels/rope.py"):
        model.audit(spec.fn, spec.example_inputs)


@pytest.mark.parametrize("breach, message", [
    (lambda out: out.sum().item(), "host sync"),
    (lambda out: bool(out.max() > 0), "host sync"),
    (lambda out: out.reshape(-1)[:4].tolist(), "device-to-host copy"),
    (lambda out: out[out > 0], "boolean-mask"),
    (lambda out: out.nonzero(), "nonzero"),
    (lambda out: out + torch.ones(out.shape[-1]).to(out.device), "CPU computation"),
    (lambda out: out + torch.tensor([0.5, 0.25], device=out.device)[:1], "host-to-device copy|CPU computation"),
])
def test_each_kind_of_breach_is_caught(released, breach, message):
    model, runner = released
    spec = _stage(runner, "code2wav")

    def step(*inputs):
        spec.fn(*inputs)  # writes its samples per slot (ModelRunner.last_samples)
        breach(runner.last_samples)
        return ()

    with dispatch.using("triton"), pytest.raises(GraphSafetyError, match=message):
        model.audit(step, spec.example_inputs)


def test_torch_references_that_sync_are_flagged(released):
    """The references runtime/graphs.py refuses to capture (GRAPH_UNSAFE_REFERENCES) really do sync."""
    model, runner = released
    spec = _stage(runner, "thinker_decode")
    with dispatch.using("torch"):
        report, _ = model.audit(spec.fn, spec.example_inputs, strict=False)
    assert report.host_syncs > 0
    assert any("decode_attention_ref" in v for v in report.violations)
    assert any("moe_experts_ref" in v for v in report.violations)


def test_launches_bench_writes_its_table_and_json(tmp_path, capsys):
    """bench/launches.py (CI, CPU): one row per stage and the two totals, each total the sum of its parts."""
    import json

    from bench import launches

    assert launches.main(["--out", str(tmp_path)]) == 0
    rows = {row["stage"]: row for row in json.loads((tmp_path / "launches.json").read_text())["rows"]}
    tick = rows["steady-state tick (1 session)"]
    parts = ["thinker_decode[1]", "talker_decode[1]", "code_predictor[1]", "code2wav[1]"]
    assert tick["kernels"] == sum(rows[p]["kernels"] for p in parts) > 0
    assert tick["h2d_copies"] == 0 and all(rows[p]["host_syncs"] == 0 for p in parts)
    # Every stage builds its input from per-slot state on the device (runtime/decode_inputs.py), the talker's text
    # included, and writes its results there; a steady batch's slot ids stay in the graphs' buffers. Between the
    # graphs of a tick nothing goes up and no kernel runs: no gather, cat, clone, position arithmetic, cast or
    # packet assembly. The frame that stands leaves in two non-blocking copies (samples, codes), which wait for
    # nothing (the tick's one blocking read is the read-back, not counted here).
    glue = rows["steady-state tick glue (1 session)"]
    assert glue["kernels"] == glue["h2d_copies"] == glue["host_syncs"] == 0 and glue["top_ops"] == {}, glue
    assert glue["d2h_copies"] == 2 and all("(non-blocking)" in v for v in glue["violations"]), glue
    # Around the first packet's graphs a text prompt's layouts are read on the host (its ids stay there): the only
    # blocking device reads are the two the path needs, t1 and the first code 0 (+ the first frame's two
    # non-blocking copies); the rest goes up in 5 uploads (the ids, the positions, the talker prompt's indices,
    # its special ids, its positions).
    first = rows["first-packet glue (1 session)"]
    assert first["host_syncs"] == 2 and first["d2h_copies"] == 4 and first["h2d_copies"] == 5, first
    assert all(v.startswith(("host-to-device copy", "device-to-host copy")) for v in first["violations"]), first
    assert 0 < first["kernels"] < 150
    assert rows["first packet (1 session)"]["weight_bytes"] > rows["thinker_prefill[256]"]["weight_bytes"] > 0
    # a spoken question's first packet runs in graphs from its audio encoder on (issue 18: <= 2,500 kernels)
    assert "audio_encoder[16]" in rows["first packet (1 session)"]["note"]
    assert rows["audio_encoder[16]"]["kernels"] > 0 and rows["first packet (1 session)"]["kernels"] <= 2500
    image = rows["first packet, image question (1 session)"]  # and an image question's from its vision encoder on
    assert "vision_encoder[1024]" in image["note"] and rows["vision_encoder[1024]"]["kernels"] > 0
    assert image["kernels"] <= 2500 and image["h2d_copies"] == image["host_syncs"] == 0
    assert "steady-state tick" in capsys.readouterr().out


def test_the_torch_sampler_is_graph_safe_too(released):
    """The sampler's torch twin (filters and Philox draw, kernels/sampling.py sample_ref) inside the decode steps:
    no host sync, no host copy, so a graph may capture it when the fused draw is not selected."""
    model, runner = released
    choice = dict(dispatch.kernel_choice("triton"), sample="torch")
    with dispatch.active(choice):
        for name in ("thinker_decode", "talker_decode", "code_predictor"):
            spec = _stage(runner, name, 8)
            report, _ = model.audit(spec.fn, spec.example_inputs, strict=True)
            assert not report.violations and report.host_syncs == report.h2d_copies == 0, name
            assert "omni_rt_triton::sample" not in report.ops and report.ops.get("aten::sort", 0) > 0, name


def test_performance_doc_is_rendered_from_the_committed_counts():
    """docs/performance.md is bench/performance_doc.py's rendering of bench/results/launches.json (regenerate
    both after a change: `python bench/launches.py && python bench/performance_doc.py`)."""
    import json

    from bench import performance_doc

    launches = json.loads(performance_doc.RESULTS.read_text())
    assert performance_doc.DOC.read_text() == performance_doc.render(launches)
    stages = {row["stage"] for row in launches["rows"]}
    assert set(performance_doc.TARGETS) <= stages  # every target names a stage the bench counts
