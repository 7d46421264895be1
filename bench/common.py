"""Measurement helpers shared by the kernel benchmarks (/work/.library/device/METHOD.md, STYLE.md §18-19).

- `time_calls`: median time of a call after warm-up. On CUDA every call sits between its own pair of CUDA
  events (what `triton.testing.do_bench(return_mode="median")` does); the calls rotate over several input
  sets so repeated runs do not just measure the L2 cache. `graph=True` captures the rotating calls into one
  CUDA graph and times its replays instead: the launch gaps shrink to what the runtime sees (it replays
  graphs for every decode step). On the CPU (smoke mode) the host clock is used, and every number is
  labelled `SMOKE_LABEL`.
- `measure_ceilings`: the two measured roofs of this run: device-to-device copy bandwidth (bytes read +
  bytes written over a large copy) and the cuBLAS bf16 GEMM rate (a large torch.matmul).
- `make_row`: one table row with the floor it is judged against: bytes and FLOPs counted, GB/s, TFLOP/s,
  the fraction of the measured ceilings, and the ratio to the reference run in the same process.
- `write_results` / `print_table`: JSON under bench/results/<name>-<device-slug>-<date>.json (rewritable in
  place as rows come in) and a table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_LABEL = "CPU smoke, not a GPU measurement"
L2_BYTES_DEFAULT = 50 * 2**20  # H100/H200 L2; read from the device where torch exposes it


# ------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_BYTES_DEFAULT)


def num_input_sets(bytes_per_set: int, device: torch.device, max_sets: int = 64, budget_bytes: int = 2 * 2**30) -> int:
    """How many input sets to rotate so that one pass over them is at least twice the L2 cache (at most
    `max_sets`, and within `budget_bytes` of memory). One set on the CPU: smoke timings are not measurements."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    wanted = math.ceil(2 * l2_bytes(device) / bytes_per_set)
    affordable = max(1, budget_bytes // bytes_per_set)
    return int(max(1, min(wanted, max_sets, affordable)))


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, *, warmup_ms: float = 25.0,
               rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 2000, graph: bool = False,
               calls_per_graph: int = 16, flush_l2: bool = False) -> dict:
    """Median microseconds of one call, rotating over `calls` (one closure per input set).

    Returns {"median_us", "p20_us", "p80_us", "reps", "mode"} with mode "cuda-events", "cuda-graph" or
    "cpu-perf_counter". Warm-up runs first (compilation, autotuning, handle creation stay out of the numbers);
    the repetition count is sized from the warm-up so the timed part lasts about `rep_ms`. `flush_l2`
    (eager CUDA timing only) overwrites a buffer of twice the L2 size before every call, outside the timed
    region, as triton's do_bench does: for inputs too small for rotation to push them out of the cache.
    """
    if not calls:
        raise ValueError("time_calls needs at least one call")
    if device.type != "cuda":
        return _time_cpu(calls, warmup_ms, rep_ms, min_reps, max_reps)
    if graph:
        return _time_graph(calls, device, warmup_ms, rep_ms, min_reps, max_reps, calls_per_graph)
    return _time_events(calls, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2)


def _summary(samples_us: list[float], mode: str) -> dict:
    samples = sorted(samples_us)
    q = statistics.quantiles(samples, n=5) if len(samples) >= 5 else [samples[0], 0, 0, samples[-1]]
    return {"median_us": statistics.median(samples), "p20_us": q[0], "p80_us": q[-1], "reps": len(samples),
            "mode": mode}


def _warm(calls, device, warmup_ms: float) -> float:
    """Run calls round-robin for about warmup_ms (at least two rounds); returns the mean ms per call."""
    _sync(device)
    start, n = time.perf_counter(), 0
    while True:
        calls[n % len(calls)]()
        n += 1
        if n >= 2 * len(calls) and n >= 3:
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            if elapsed >= warmup_ms:
                return elapsed / n


def _reps(per_call_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> int:
    return int(min(max_reps, max(min_reps, rep_ms / max(per_call_ms, 1e-6))))


def _time_cpu(calls, warmup_ms, rep_ms, min_reps, max_reps) -> dict:
    device = torch.device("cpu")
    per_call = _warm(calls, device, warmup_ms)
    samples = []
    for i in range(_reps(per_call, rep_ms, min_reps, max_reps)):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) * 1e6)
    return _summary(samples, "cpu-perf_counter")


def _time_events(calls, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2=False) -> dict:
    per_call = _warm(calls, device, warmup_ms)
    reps = _reps(per_call, rep_ms, min_reps, max_reps)
    scrub = torch.empty(2 * l2_bytes(device) // 4, dtype=torch.int32, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if scrub is not None:
            scrub.fill_(i)
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)],
                    "cuda-events-flushed" if flush_l2 else "cuda-events")


def _time_graph(calls, device, warmup_ms, rep_ms, min_reps, max_reps, calls_per_graph) -> dict:
    """One graph holds `per_graph` calls (a multiple of the input sets); each replay is timed with events."""
    per_graph = max(len(calls), math.ceil(calls_per_graph / len(calls)) * len(calls))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch's docs ask
        per_call = _warm(calls, device, warmup_ms)
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            calls[i % len(calls)]()
    for _ in range(3):
        g.replay()
    reps = _reps(per_call * per_graph, rep_ms, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        g.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    result = _summary([s.elapsed_time(e) * 1e3 / per_graph for s, e in zip(starts, ends)], "cuda-graph")
    del g
    return result


def syncs_host(fn: Callable[[], object], device: torch.device) -> bool:
    """True when one call of `fn` synchronises with the host (then it cannot be captured in a CUDA graph).
    Uses torch's sync debug mode, so no failed capture is needed to find out."""
    if device.type != "cuda":
        return False
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, smoke: bool = False) -> dict:
    """The measured roofs of this device, this run: copy GB/s (read + write) and bf16 GEMM TFLOP/s.

    GPU: a 1 GiB device-to-device copy and an 8192³ bf16 torch.matmul (cuBLAS), random data (never zeros:
    a GEMM on zeros ran 13% faster on an H200, METHOD.md). CPU smoke: 16 MiB and 256³ fp32, labelled.
    """
    copy_bytes = 16 * 2**20 if smoke else 2**30
    n = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_calls([lambda: dst.copy_(src)], device, warmup_ms=20, rep_ms=200)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = time_calls([lambda: torch.matmul(a, b)], device, warmup_ms=50, rep_ms=300)
    del src, dst, a, b
    return {
        "copy_gbps": 2 * copy_bytes / (copy["median_us"] * 1e-6) / 1e9,
        "copy_bytes": copy_bytes, "copy_us": copy["median_us"],
        "gemm_tflops": 2 * n**3 / (gemm["median_us"] * 1e-6) / 1e12,
        "gemm_shape": [n, n, n], "gemm_dtype": str(dtype).removeprefix("torch."), "gemm_us": gemm["median_us"],
        **({"label": SMOKE_LABEL} if smoke else {}),
    }


# ------------------------------------------------------------------------------------------------ rows


def make_row(op: str, case: str, backend: str, timing: dict | None, bytes_moved: float, flops: float,
             ceilings: dict, ref_us: float | None = None, smoke: bool = False, **extra) -> dict:
    """One benchmark row. `bytes_moved`: the fewest bytes the op must move (each input read once, each output
    written once); `flops`: the arithmetic it must do (0 where only elementwise work: such ops are judged by
    bytes). The floor is max(bytes / copy bandwidth, flops / GEMM rate) with the ceilings measured in this run;
    `of_floor` = floor / time (1.0 = at the measured roof); `vs_ref` = reference time / this time (>1: faster).
    `timing` None means the row failed (the error goes in `extra`)."""
    row = {"op": op, "case": case, "backend": backend, "bytes": int(bytes_moved), "flops": int(flops), **extra}
    if smoke:
        row["label"] = SMOKE_LABEL
    if timing is None:
        return row
    us = timing["median_us"]
    seconds = us * 1e-6
    floor_us = max(bytes_moved / (ceilings["copy_gbps"] * 1e9), flops / (ceilings["gemm_tflops"] * 1e12)) * 1e6
    row.update(
        us=us, p20_us=timing["p20_us"], p80_us=timing["p80_us"], reps=timing["reps"], mode=timing["mode"],
        gbps=bytes_moved / seconds / 1e9,
        tflops=flops / seconds / 1e12,
        bw_frac=bytes_moved / seconds / 1e9 / ceilings["copy_gbps"],
        flop_frac=flops / seconds / 1e12 / ceilings["gemm_tflops"],
        floor_us=floor_us,
        of_floor=floor_us / us if us > 0 else None,
        vs_ref=(ref_us / us) if ref_us and us > 0 else None,
    )
    return row


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 over every tensor of (possibly nested tuples of) outputs; NaN → inf."""
    outs, refs = _flatten(out), _flatten(ref)
    if len(outs) != len(refs):
        return math.inf
    num = den = 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double().cpu(), r.detach().double().cpu()
        if o.shape != r.shape or not torch.isfinite(o).all():
            return math.inf
        num += float((o - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return []


# ----------------------------------------------------------------------------------- results and table


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted tracked changes); where there is no git checkout (the device machine
    gets a copy of the working tree), the OMNI_RT_COMMIT environment variable bench/run_gpu.sh exports."""
    fallback = os.environ.get("OMNI_RT_COMMIT", "unknown")
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return fallback
        commit = out.stdout.strip()
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def device_info(device: torch.device, smoke: bool = False) -> dict:
    """Device name, versions, date and commit: what every results file records."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=l2_bytes(device))
    if smoke:
        info["label"] = SMOKE_LABEL
    return info


def device_slug(info: dict, smoke: bool = False) -> str:
    if smoke:
        return "cpu-smoke"
    slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
    return slug.removeprefix("nvidia-") or "device"


def results_path(name: str, info: dict, out_dir: Path | str | None = None, smoke: bool = False) -> Path:
    """bench/results/<name>-<device-slug>-<UTC date-time>.json (or under out_dir); the directory is made."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return out / f"{name}-{device_slug(info, smoke)}-{stamp}.json"


def write_results(name: str, info: dict, ceilings: dict, rows: list[dict], out_dir: Path | str | None = None,
                  smoke: bool = False, *, path: Path | None = None, **extra) -> Path:
    """Write {name, info, ceilings, rows, **extra} as strict JSON to `path` (default: a new results_path).
    Called again with the same path it replaces the file whole (written aside, then renamed), so a run that is
    killed between two writes leaves the last complete file, never half of one."""
    path = Path(path) if path else results_path(name, info, out_dir, smoke)
    payload = {"name": name, "info": info, "ceilings": ceilings, "rows": rows, **extra}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(_finite(payload), indent=1, default=str, allow_nan=False) + "\n")
    os.replace(partial, path)
    return path


def _finite(x):
    """Strict JSON: non-finite floats (an inf error of a broken output) become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


COLUMNS = [("op", "op", "{}"), ("case", "case", "{}"), ("backend", "backend", "{}"), ("mode", "mode", "{}"),
           ("us", "µs", "{:.2f}"), ("bytes", "MB", None), ("flops", "GFLOP", None), ("gbps", "GB/s", "{:.1f}"),
           ("tflops", "TFLOP/s", "{:.2f}"), ("bw_frac", "%BW", None), ("flop_frac", "%GEMM", None),
           ("of_floor", "%floor", None), ("vs_ref", "vs ref", "{:.2f}x"), ("err", "rel err", "{:.1e}")]


def _cell(row: dict, key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "bytes":
        return f"{value / 1e6:.3f}"
    if key == "flops":
        return f"{value / 1e9:.3f}" if value else "-"
    if key in ("bw_frac", "flop_frac", "of_floor"):
        return f"{100 * value:.1f}%"
    if key == "mode":
        return {"cuda-events": "eager", "cuda-events-flushed": "eager*", "cuda-graph": "graph",
                "cpu-perf_counter": "cpu"}.get(value, value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def format_table(rows: list[dict], ceilings: dict, info: dict, smoke: bool = False) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        if "error" in row:
            body.append([row["op"], row["case"], row["backend"], "FAILED", row["error"][:60]] + [""] * (len(COLUMNS) - 5))
        else:
            body.append([_cell(row, key, fmt) for key, _, fmt in COLUMNS])
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]
    lines = []
    if smoke:
        lines.append(f"*** {SMOKE_LABEL}: every number below is {SMOKE_LABEL} ***")
    lines.append(f"device: {info['device']} | torch {info['torch']} | triton {info['triton']} | CUDA {info['cuda']} "
                 f"| {info['date']} | commit {info['commit'][:12]}")
    lines.append(f"measured ceilings: copy {ceilings['copy_gbps']:.1f} GB/s (read+write), "
                 f"GEMM {ceilings['gemm_tflops']:.2f} TFLOP/s ({ceilings['gemm_dtype']} {ceilings['gemm_shape'][0]}³)")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    lines.append("mode: eager = CUDA events per call; eager* = same, L2 flushed before each call (inputs too small to "
                 "rotate out of L2); graph = CUDA-graph replay per call; cpu = host clock")
    if smoke:
        lines.append(f"*** {SMOKE_LABEL} ***")
    return "\n".join(lines)


def print_table(rows: list[dict], ceilings: dict, info: dict, smoke: bool = False) -> None:
    print(format_table(rows, ceilings, info, smoke), flush=True)
