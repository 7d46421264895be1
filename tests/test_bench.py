"""bench/: the kernel benchmark runs end to end in CPU smoke mode and writes its table and JSON; the tuner
refuses without CUDA; the bytes/FLOPs it judges rows by are right for one real shape each.
No timing is asserted: performance is measured on a GPU, in bench/, never in unit tests."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from bench import common  # noqa: E402
from bench import kernels as bench_kernels  # noqa: E402
from bench import tune  # noqa: E402
from kernels.moe import moe_experts_ref  # noqa: E402

SMOKE_OPS = {"moe_experts", "route_topk", "qk_norm_rope", "decode_attention", "causal_conv1d_update",
             "causal_conv_transpose1d_update", "rms_norm", "add_rms_norm_linear", "add_rms_norm_swiglu"}
ROW_FIELDS = {"op", "case", "backend", "us", "mode", "bytes", "flops", "gbps", "tflops", "bw_frac", "flop_frac",
              "floor_us", "of_floor", "vs_ref", "err", "label"}


def test_kernels_smoke_writes_table_and_json(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert common.SMOKE_LABEL in out
    table = out[out.index("measured ceilings"):]  # the table is printed last
    for column in ("µs", "GB/s", "TFLOP/s", "%BW", "%GEMM", "%floor", "vs ref", "rel err"):
        assert column in table
    (path,) = tmp_path.glob("kernels-cpu-smoke-*.json")
    result = json.loads(path.read_text())  # strict JSON: no NaN/Infinity literals
    assert result["info"]["label"] == common.SMOKE_LABEL and result["info"]["device"].startswith("CPU")
    for key in ("torch", "triton", "cuda", "date", "commit"):
        assert key in result["info"]
    assert result["ceilings"]["copy_gbps"] > 0 and result["ceilings"]["gemm_tflops"] > 0
    rows = result["rows"]
    assert {row["op"] for row in rows} == SMOKE_OPS
    assert not [row for row in rows if "error" in row]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["label"] == common.SMOKE_LABEL and row["mode"] == "cpu-perf_counter"
        assert row["us"] > 0 and row["bytes"] > 0 and row["err"] < 1e-4
        assert row["case"] in table
    torch_rows = [row for row in rows if row["backend"] == "torch"]
    assert all(row["vs_ref"] == 1.0 for row in torch_rows)
    moe = [row for row in rows if row["op"] == "moe_experts"]
    assert {row["case"].split()[0] for row in moe} == {"thinker", "talker"}
    if hasattr(torch, "_grouped_mm"):  # the grouped-GEMM peer computes the same function
        assert {row["backend"] for row in moe} == {"torch", "torch._grouped_mm"}
    summary = subprocess.run([sys.executable, str(ROOT / "bench" / "summary.py"), str(path)], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert summary.returncode == 0 and common.SMOKE_LABEL in summary.stdout
    assert len(summary.stdout.splitlines()) == 4 + len({(r["op"], r["case"]) for r in rows})
    assert {r["case"].split()[0] for r in rows if r["op"] == "decode_attention"} == {"B=1", "B=2"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tuner_refuses_without_cuda():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_kernels_refuses_gpu_mode_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    assert bench_kernels.main(["--ops", "rms_norm"]) == 2


# ------------------------------------------------------------------------------- bytes and FLOPs counted


def test_moe_counts_thinker_decode():
    # M=1, 8 distinct experts routed, bf16: 8 experts x (gate_up 1536x2048 + down 2048x768) x 2 bytes
    weights = 8 * (1536 * 2048 + 2048 * 768) * 2
    assert weights == 75_497_472
    activations = 2 * 2048 * 2 + 8 * (8 + 2)  # hidden in + out, ids (int64) + weights per pair
    assert bench_kernels.moe_bytes(1, 8, 2048, 768, 8, 2) == weights + activations == 75_505_744
    assert bench_kernels.moe_flops(1, 2048, 768, 8) == 8 * 2 * (1536 * 2048 + 2048 * 768) == 75_497_472
    # prefill counts every routed pair's arithmetic, and weights once per distinct expert
    assert bench_kernels.moe_flops(2048, 2048, 768, 8) == 2048 * 75_497_472
    assert bench_kernels.moe_bytes(2048, 128, 2048, 768, 8, 2) == (128 * 4_718_592 * 2 + 2 * 2048 * 2048 * 2
                                                                   + 2048 * 8 * 10)


def test_decode_attention_counts():
    # B=1, 1k cached tokens, 4 kv heads, D=128, bf16: K and V once; q in, out out; slot id + length
    assert bench_kernels.decode_attention_bytes([1024], 32, 4, 128, 1, 2) == 2 * 1024 * 4 * 128 * 2 + 2 * 32 * 128 * 2 + 16
    assert bench_kernels.decode_attention_bytes([1024], 32, 4, 128, 1, 2) == 2_113_552
    assert bench_kernels.decode_attention_flops([1024], 32, 128, 1) == 2 * 2 * 32 * 128 * 1024 == 16_777_216
    assert bench_kernels.decode_attention_flops([1024, 4096], 32, 128, 1) == 16_777_216 * 5


def test_conv_update_counts_and_code2wav_shapes():
    # residual unit of decoder block 1: 768 channels, K=7, dilation 9 (state 54), L=32 per frame, bf16
    expected = 2 * (768 * 32 + 2 * 768 * 54 + 768 * 768 * 7 + 768 + 768 * 32) + 8
    assert bench_kernels.conv1d_update_bytes(1, 768, 768, 7, 9, 1, 32, 2) == expected == 8_523_272
    assert bench_kernels.conv1d_update_flops(1, 768, 768, 7, 1, 32) == 2 * 768 * 32 * 768 * 7
    assert bench_kernels.conv1d_update_flops(1, 1024, 1024, 7, 1024, 4) == 2 * 1024 * 4 * 7  # depthwise
    conv, trans = bench_kernels.code2wav_conv_shapes(bench_kernels._shapes(smoke=False)["code2wav"])
    assert conv[-1][-1] == 1920 and conv[-1][2] == 1  # one 80 ms frame = 1920 samples at 24 kHz, 1 channel
    assert [t[4] for t in trans] == [2, 2, 8, 5, 4, 3]
    assert conv[2][1:3] == (1024, 1536)


def test_make_row_rates_and_fractions():
    ceilings = {"copy_gbps": 2000.0, "gemm_tflops": 500.0}
    timing = {"median_us": 10.0, "p20_us": 9.0, "p80_us": 11.0, "reps": 10, "mode": "cuda-events"}
    row = common.make_row("op", "case", "triton", timing, 1e6, 2e9, ceilings, ref_us=20.0)
    assert math.isclose(row["gbps"], 100.0) and math.isclose(row["tflops"], 200.0)
    assert math.isclose(row["bw_frac"], 0.05) and math.isclose(row["flop_frac"], 0.4)
    assert math.isclose(row["floor_us"], 4.0)  # max(1 MB / 2000 GB/s = 0.5 µs, 2 GFLOP / 500 TFLOP/s = 4 µs)
    assert math.isclose(row["of_floor"], 0.4) and math.isclose(row["vs_ref"], 2.0)
    failed = common.make_row("op", "case", "triton", None, 1e6, 0, ceilings, error="boom")
    assert failed["error"] == "boom" and "us" not in failed
    assert "FAILED" in common.format_table([row, failed], {**ceilings, "gemm_dtype": "bfloat16",
                                                           "gemm_shape": [8192] * 3},
                                           {"device": "d", "torch": "t", "triton": "t", "cuda": "c",
                                            "date": "now", "commit": "abc"})


def test_cpu_timing_and_results_file(tmp_path):
    timing = common.time_calls([lambda: torch.ones(8).sum()] * 2, torch.device("cpu"), warmup_ms=1, rep_ms=2)
    assert timing["mode"] == "cpu-perf_counter" and timing["median_us"] > 0 and timing["reps"] >= 10
    assert common.num_input_sets(10**6, torch.device("cpu")) == 1
    info = common.device_info(torch.device("cpu"), smoke=True)
    path = common.write_results("unit", info, {"copy_gbps": 1.0}, [{"err": math.inf}], tmp_path, smoke=True)
    assert path.name.startswith("unit-cpu-smoke-") and json.loads(path.read_text())["rows"][0]["err"] == "inf"


# ------------------------------------------------------------------------------------------------ tuner


def test_coordinate_descent_finds_the_minimum_and_skips_failures():
    default = {"BLOCK_M": 64, "num_warps": 4}
    space = tune.derived_space(default)
    assert space["BLOCK_M"] == [16, 32, 64, 128, 256] and 4 in space["num_warps"]

    def cost(config):
        if config["num_warps"] == 16:
            return None  # a candidate that does not launch
        return abs(config["BLOCK_M"] - 32) + abs(config["num_warps"] - 8)

    best, best_cost, log = tune.coordinate_descent(default, space, cost)
    assert best == {"BLOCK_M": 32, "num_warps": 8} and best_cost == 0
    assert len({tuple(sorted(e["config"].items())) for e in log}) == len(log)  # each config evaluated once


def test_spy_sees_and_overrides_launch_config_imported_by_name():
    from kernels import tuning

    fake = types.ModuleType("kernels.triton_fake_for_test")
    fake.launch_config = tuning.launch_config  # `from kernels.tuning import launch_config` style
    sys.modules[fake.__name__] = fake
    try:
        with tune.LaunchConfigSpy() as spy:
            assert fake.launch_config("fake_op", "M=1", torch.float32, {"BLOCK_M": 16})["BLOCK_M"] == 16
            spy.override[("fake_op", "M=1", "float32")] = {"BLOCK_M": 64}
            assert fake.launch_config("fake_op", "M=1", torch.float32, {"BLOCK_M": 16})["BLOCK_M"] == 64
            assert spy.asked == {("fake_op", "M=1", "float32"): {"BLOCK_M": 16}}
            assert spy.count[("fake_op", "M=1", "float32")] == 2
        assert fake.launch_config is tuning.launch_config  # restored
    finally:
        del sys.modules[fake.__name__]


def test_sweep_tunes_any_callable_and_rejects_wrong_outputs():
    def run(config):  # a "kernel" whose output is wrong for BLOCK=128 and which cannot launch BLOCK=256
        if config["BLOCK"] == 256:
            raise RuntimeError("out of resources")
        return torch.ones(4) * (2.0 if config["BLOCK"] == 128 else 1.0)

    times = {16: 5.0, 32: 3.0, 64: 4.0, 128: 1.0, 256: 0.5}
    best, best_us, log = tune.sweep({"BLOCK": 64}, {"BLOCK": [16, 32, 64, 128, 256]}, run, torch.device("cpu"),
                                    check=common.rel_err, time_config=lambda c: times[c["BLOCK"]])
    assert best == {"BLOCK": 32} and best_us == 3.0
    errors = {e["config"]["BLOCK"]: e["error"] for e in log if "error" in e}
    assert set(errors) == {128, 256} and "wrong output" in errors[128] and "out of resources" in errors[256]
    with pytest.raises(RuntimeError, match="no config ran"):  # NaN never passes the check
        tune.sweep({"BLOCK": 64}, {"BLOCK": [32, 64]}, lambda c: torch.full((4,), math.nan), torch.device("cpu"),
                   check=common.rel_err, time_config=lambda c: 1.0)


def test_tune_case_finds_and_sweeps_the_configs_a_kernel_asks_for():
    """The driver on the CPU with a stand-in backend: it learns the key the kernel asks for, sweeps it, and
    rejects a config that computes something else."""
    from kernels import tuning
    from kernels.norm import rms_norm_ref
    from runtime import dispatch

    def fake_kernel(x, weight, eps):
        config = tuning.launch_config("fake_rms_norm", f"M={x.shape[0]}", x.dtype, {"BLOCK_N": 64, "num_warps": 4})
        out = rms_norm_ref(x, weight, eps)
        return out * 2 if config["num_warps"] == 8 else out  # a "miscompiled" variant

    env = bench_kernels.Env(torch.device("cpu"), torch.float32, smoke=True)
    case = next(c for c in bench_kernels.build_cases(env, ["rms_norm"]) if c.name.startswith("M=4 "))
    dispatch.register("rms_norm", "fake_tuned", fake_kernel)
    try:
        with tune.LaunchConfigSpy() as spy:
            (entry,) = tune.tune_case(case, env, spy, tol=1e-2, warmup_ms=0.1, rep_ms=0.5, backend="fake_tuned")
    finally:
        del dispatch._IMPLS["rms_norm"]["fake_tuned"]
    assert entry["op"] == "fake_rms_norm" and entry["key"] == "M=4" and entry["dtype"] == "float32"
    assert entry["default"] == {"BLOCK_N": 64, "num_warps": 4} and entry["best"]["num_warps"] != 8
    assert entry["evaluated"] > 3 and any("wrong output" in e.get("error", "") for e in entry["log"])


def test_kernels_smoke_picks_up_triton_backends(tmp_path):
    """The smoke run lists a row for each Triton kernel (under Triton's CPU interpreter), each checked against
    the reference from untouched inputs (in-place state ops included: the timed calls update their state)."""
    from runtime import dispatch

    ops = [op for op in bench_kernels.BUILDERS if "triton" in dispatch.backends(op)]
    if not ops:
        pytest.skip("no op has a triton implementation yet (kernels/triton_*.py)")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--backends", "torch,triton",
                           "--ops", ",".join(ops), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("kernels-cpu-smoke-*.json")
    rows = json.loads(path.read_text())["rows"]
    triton_rows = [row for row in rows if row["backend"] == "triton"]
    assert {row["op"] for row in triton_rows} == set(ops)
    for row in triton_rows:
        assert "error" not in row and row["err"] < 1e-4, row


# ------------------------------------------------------------------------------- case selection, partial runs


def test_case_selection_by_op_and_phase():
    env = bench_kernels.Env(torch.device("cpu"), torch.float32, smoke=True)
    every = bench_kernels.build_cases(env, None)
    assert {c.phase for c in every} == {"decode", "prefill"}
    decode = bench_kernels.build_cases(env, bench_kernels.parse_selectors("moe_experts:decode,decode_attention"))
    assert {c.op for c in decode} == {"moe_experts", "decode_attention"}
    assert all(c.phase == "decode" for c in decode)
    assert {c.name.split()[1] for c in decode if c.op == "moe_experts"} == {"M=1", "M=4"}  # smoke: M=33 is prefill
    rest = bench_kernels.build_cases(env, None, skip=bench_kernels.parse_selectors("moe_experts:decode,decode_attention"))
    names = lambda cases: {(c.op, c.name) for c in cases}  # noqa: E731
    assert names(decode) | names(rest) == names(every) and not names(decode) & names(rest)
    assert any(c.op == "moe_experts" and c.phase == "prefill" for c in rest)
    with pytest.raises(ValueError, match="unknown op"):
        bench_kernels.parse_selectors("moe")
    with pytest.raises(ValueError, match="unknown phase"):
        bench_kernels.parse_selectors("moe_experts:decoding")


def test_moe_decode_cases_time_the_down_kernel_unsplit_and_split():
    """At the real shapes each MoE decode case carries the Triton decode path with its down + combine kernel
    forced unsplit (K experts per program) and split (2), so one GPU run gives their ratio; prefill has neither.
    Both give the twin's result (a one-token thinker-like case under the interpreter on CPU)."""
    env = bench_kernels.Env(torch.device("cpu"), torch.float32, smoke=False)
    cases = bench_kernels.build_cases(env, bench_kernels.parse_selectors("moe_experts"))
    for case in cases:
        top_k = int(case.name.split("K=")[1].split()[0])
        variants = {name for name in case.extras if name.startswith("triton:down")}
        want = {f"triton:down {top_k} experts/program", "triton:down 2 experts/program"}
        assert variants == (want if case.phase == "decode" else set()), case.name
    assert {c.name.split()[0] for c in cases if c.phase == "decode"} == {"thinker", "talker"}
    thinker = next(c for c in cases if c.phase == "decode" and c.name.startswith("thinker"))  # K = 8
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 40, generator=gen)
    gate_up, down = torch.randn(16, 48, 40, generator=gen) / 7, torch.randn(16, 40, 24, generator=gen) / 5
    ids = torch.randperm(16, generator=gen)[:8].reshape(1, 8)
    weights = torch.rand(1, 8, generator=gen).softmax(-1)
    want = moe_experts_ref(hidden, ids, weights, gate_up, down)
    for name in ("triton:down 8 experts/program", "triton:down 2 experts/program"):
        assert common.rel_err(thinker.extras[name](hidden, ids, weights, gate_up, down), want) <= 1e-5, name


def test_kernels_json_is_written_after_every_case(tmp_path, monkeypatch):
    """A run stopped in the middle (a stage's time limit) leaves a valid JSON of the cases it finished."""
    real_run_case, finished = bench_kernels.run_case, []

    def stop_after_two(case, *args, **kwargs):
        if len(finished) == 2:
            raise KeyboardInterrupt  # what a time limit's SIGTERM/SIGINT looks like to the loop
        finished.append(case.name)
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(bench_kernels, "run_case", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.main(["--smoke", "--ops", "rms_norm,route_topk", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kernels-cpu-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] is False and result["cases_done"] == 2 and result["cases_total"] == 6
    assert [row["case"] for row in result["rows"]] == finished
    assert not list(tmp_path.glob("*.partial"))
    summary = subprocess.run([sys.executable, str(ROOT / "bench" / "summary.py"), str(path)], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert summary.returncode == 0 and "PARTIAL: 2 of 6 cases" in summary.stdout
