"""Sweep the launch configs of the Triton ops that read `kernels.tuning.launch_config` and write the winners
to kernels/tuned/<op>.json with `kernels.tuning.record` (GPU only: it refuses without CUDA).

    python bench/tune.py                              # every op with a triton backend, bench/kernels.py shapes
    python bench/tune.py --ops moe_experts --moe-m 1,2,4,8,16,32 --dry-run

How it finds what to tune, without the kernels having to cooperate:
1. Each case of bench/kernels.py whose op has a `triton` backend runs once with `launch_config` observed
   (`LaunchConfigSpy` wraps kernels.tuning.launch_config, and the name in every kernels.triton_* module that
   imported it directly). That yields the (tuning op, shape key, dtype, default config) each kernel asks for.
2. For each of those, candidates come from the kernel module's `TUNE_SPACE[tuning_op]` ({param: [values]})
   where it defines one, else from the default by parameter name (`derived_space`).
3. `coordinate_descent` sweeps one parameter at a time around the best so far (two passes). A candidate is
   forced through the spy, run through the op's dispatch entry and timed with bench/common.py; it must
   compile, run and match the default config's output (relative error ≤ --tol) to count.
4. The best config is recorded for (op, device, dtype, key), the full sweep logged as JSON in bench/results.

The generic entry point is `sweep(default, space, run)`: any callable `run(config)` can be tuned with it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from kernels import tuning  # noqa: E402

NO_CUDA_MESSAGE = ("bench/tune.py needs a CUDA GPU: launch configs are tuned on the device they are for, and "
                   "torch.cuda.is_available() is False here. Run it on the GPU machine (bench/run_gpu.sh "
                   "--tune); the CPU interpreter always uses each kernel's default config.")


# ---------------------------------------------------------------------------------------- search space


def derived_space(default: dict) -> dict[str, list]:
    """Candidate values per parameter, derived from a kernel's default config by the parameter's name.
    Unknown parameters keep their default only."""
    space = {}
    for name, value in default.items():
        upper = name.upper()
        if upper.startswith("BLOCK") and isinstance(value, int) and value > 0:
            lo, hi = max(16, value // 4), min(512, value * 4)
            space[name] = [v for v in (2 ** i for i in range(4, 10)) if lo <= v <= hi] or [value]
        elif upper == "NUM_WARPS":
            space[name] = [1, 2, 4, 8, 16] if value <= 2 else [2, 4, 8, 16]
        elif upper == "NUM_STAGES":
            space[name] = [1, 2, 3, 4, 5]
        elif upper.startswith("GROUP") and isinstance(value, int):
            space[name] = sorted({1, 4, 8, 16, value})
        elif upper.startswith("SPLIT") and isinstance(value, int):
            space[name] = sorted({1, 2, 4, 8, 16, value})
        else:
            space[name] = [value]
        if value not in space[name]:
            space[name] = sorted(set(space[name]) | {value}, key=lambda v: (str(type(v)), v))
    return space


def coordinate_descent(default: dict, space: dict[str, list], evaluate: Callable[[dict], float | None],
                       passes: int = 2) -> tuple[dict, float, list[dict]]:
    """Minimise evaluate(config) (None = the candidate failed) one parameter at a time from `default`.
    Returns (best config, its cost, every evaluation as {"config", "cost"}); configs are evaluated once."""
    seen: dict[tuple, float | None] = {}
    log: list[dict] = []

    def cost_of(config: dict) -> float | None:
        key = tuple(sorted(config.items()))
        if key not in seen:
            seen[key] = evaluate(dict(config))
            log.append({"config": dict(config), "cost": seen[key]})
        return seen[key]

    best = dict(default)
    best_cost = cost_of(best)
    if best_cost is None:
        best_cost = math.inf
    for _ in range(passes):
        improved = False
        for name, values in space.items():
            for value in values:
                if value == best.get(name):
                    continue
                candidate = {**best, name: value}
                cost = cost_of(candidate)
                if cost is not None and cost < best_cost:
                    best, best_cost, improved = candidate, cost, True
        if not improved:
            break
    return best, best_cost, log


def sweep(default: dict, space: dict[str, list], run: Callable[[dict], object], device: torch.device,
          check: Callable[[object, object], float] | None = None, tol: float = 1e-2,
          warmup_ms: float = 10.0, rep_ms: float = 50.0,
          time_config: Callable[[dict], float] | None = None) -> tuple[dict, float, list[dict]]:
    """Tune any `run(config)`: median µs per config (bench/common.py timing of `run`, or `time_config(config)`
    where given, e.g. rotating input sets); a candidate counts only when it runs and `check(out, default_out)`
    ≤ tol. Returns (best config, best µs, log)."""
    reference = run(dict(default))
    if time_config is None:
        def time_config(config):
            return common.time_calls([lambda: run(config)], device, warmup_ms=warmup_ms, rep_ms=rep_ms)["median_us"]

    errors: dict[tuple, str] = {}

    def evaluate(config: dict) -> float | None:
        try:
            out = run(config)
            if check is not None:
                err = check(out, reference)
                if not err <= tol:
                    errors[tuple(sorted(config.items()))] = f"wrong output: rel err {err:.2e} > {tol}"
                    return None
            return time_config(config)
        except Exception as exc:  # does not compile, out of shared memory, bad launch: not a candidate
            errors[tuple(sorted(config.items()))] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return None

    best, best_cost, log = coordinate_descent(default, space, evaluate)
    for entry in log:
        error = errors.get(tuple(sorted(entry["config"].items())))
        if error:
            entry["error"] = error
    if not math.isfinite(best_cost):
        first = next((e["error"] for e in log if "error" in e), "no candidate ran")
        raise RuntimeError(f"no config ran, the default included ({first})")
    return best, best_cost, log


# --------------------------------------------------------------------------------- launch_config spy


class LaunchConfigSpy:
    """Observes and overrides `kernels.tuning.launch_config`, also where a module imported it by name.

    `asked`: {(op, key, dtype): default} of every lookup seen; `override`: {(op, key, dtype): config} forced.
    `count[(op, key, dtype)]` tells whether a kernel asks on every call (needed to sweep it)."""

    def __init__(self):
        self.original = tuning.launch_config
        self.asked: dict[tuple, dict] = {}
        self.override: dict[tuple, dict] = {}
        self.count: dict[tuple, int] = {}
        self._patched: list[tuple[object, str]] = []

    def __call__(self, op: str, key: str, dtype: torch.dtype, default: dict) -> dict:
        ident = (op, key, str(dtype).removeprefix("torch."))
        self.asked.setdefault(ident, dict(default))
        self.count[ident] = self.count.get(ident, 0) + 1
        if ident in self.override:
            return {**default, **self.override[ident]}
        return self.original(op, key, dtype, default)

    def install(self) -> "LaunchConfigSpy":
        targets = [tuning] + [m for name, m in list(sys.modules.items())
                              if m is not None and name.startswith(("kernels.", "runtime.")) and m is not tuning]
        for module in targets:
            if getattr(module, "launch_config", None) is self.original:
                setattr(module, "launch_config", self)
                self._patched.append((module, "launch_config"))
        return self

    def uninstall(self) -> None:
        for module, attr in self._patched:
            setattr(module, attr, self.original)
        self._patched.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def module_space(tuning_op: str) -> dict[str, list] | None:
    """A kernel module's own search space: `TUNE_SPACE = {tuning_op: {param: [values]}}`, if it has one."""
    for name, module in list(sys.modules.items()):
        if name.startswith("kernels.triton_") and module is not None:
            space = getattr(module, "TUNE_SPACE", {}).get(tuning_op)
            if space:
                return {k: list(v) for k, v in space.items()}
    return None


# ---------------------------------------------------------------------------------------------- driver


def tune_case(case, env, spy: LaunchConfigSpy, tol: float, warmup_ms: float, rep_ms: float,
              backend: str = "triton") -> list[dict]:
    """Tune every launch config the triton implementation of `case` asks for; returns result entries.
    Candidates are checked on fresh copies of the first input set and timed rotating over input sets as in
    bench/kernels.py (in-place state updated by the timed calls is just more random state)."""
    from runtime import dispatch

    fn = dispatch._IMPLS[case.op][backend]
    first = case.make_set(0)
    n_sets = max(common.num_input_sets(first[1], env.device), case.min_sets)
    sets = [first[0]] + [case.make_set(i)[0] for i in range(1, n_sets)]
    flush = env.device.type == "cuda" and first[1] * n_sets < 2 * common.l2_bytes(env.device)

    def fresh():
        return tuple(a.clone() if i in case.mutable and isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(sets[0]))

    spy.asked.clear()
    fn(*fresh())
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    if not spy.asked:
        return [{"op": case.op, "case": case.name, "skipped": f"its {backend} implementation reads no launch_config"}]
    results = []
    for ident, default in list(spy.asked.items()):
        tuning_op, key, dtype = ident
        space = module_space(tuning_op) or derived_space(default)

        def forced(config, args, ident=ident):
            spy.override[ident] = config
            before = spy.count.get(ident, 0)
            try:
                out = fn(*args)
            finally:
                spy.override.pop(ident, None)
            if spy.count.get(ident, 0) == before:
                raise RuntimeError(f"{tuning_op} read launch_config once and cached it: configs cannot be swept")
            return out

        def time_config(config, forced=forced):
            calls = [lambda args=args: forced(config, args) for args in sets]
            return common.time_calls(calls, env.device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                     flush_l2=flush)["median_us"]

        try:
            best, best_us, log = sweep(default, space, lambda config: forced(config, fresh()), env.device,
                                       check=common.rel_err, tol=tol, time_config=time_config)
        except Exception as exc:
            results.append({"op": tuning_op, "key": key, "dtype": dtype, "case": case.name,
                            "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        default_us = next((e["cost"] for e in log if e["config"] == default), None)
        results.append({"op": tuning_op, "key": key, "dtype": dtype, "case": case.name, "default": default,
                        "default_us": default_us, "best": best, "best_us": best_us, "evaluated": len(log),
                        "log": log})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=None, help="comma list of dispatch ops (default: all with a triton backend)")
    parser.add_argument("--moe-m", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096",
                        help="token counts to tune moe_experts at (thinker and talker shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tol", type=float, default=1e-2, help="max relative error vs the default config's output")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no new case after this many seconds (the device tool allows 10 min a command)")
    parser.add_argument("--dry-run", action="store_true", help="print the winners, write no tuning table")
    parser.add_argument("--out", default=None, help="directory of the sweep log (default bench/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2

    from bench import kernels as bench_kernels
    from runtime import dispatch

    device = torch.device("cuda")
    torch.manual_seed(0)
    env = bench_kernels.Env(device, getattr(torch, args.dtype), smoke=False)
    ops = args.ops.split(",") if args.ops else None
    moe_m = [int(m) for m in args.moe_m.split(",")]
    cases = bench_kernels.build_cases(env, ops, overrides={"thinker_moe_m": moe_m, "talker_moe_m": moe_m})
    def has_triton(op: str) -> bool:
        try:
            return "triton" in dispatch.backends(op)
        except Exception as exc:  # a kernel module that does not import yet: tune the others
            print(f"note: listing backends of {op} failed ({type(exc).__name__}: {exc})", flush=True)
            return "triton" in dispatch._IMPLS[op]

    cases = [c for c in cases if has_triton(c.op)]
    if not cases:
        print("bench/tune.py: no op has a triton implementation yet (kernels/triton_*.py); nothing to tune")
        return 0
    info = common.device_info(device)
    results = []
    started = time.monotonic()
    with LaunchConfigSpy() as spy:
        for case in cases:
            if time.monotonic() - started > args.budget_s:
                results.append({"op": case.op, "case": case.name, "skipped": f"time budget {args.budget_s:.0f} s spent"})
                print(f"{case.op:<28} {case.name:<40} skipped: time budget spent", flush=True)
                continue
            for entry in tune_case(case, env, spy, args.tol, args.warmup_ms, args.rep_ms):
                results.append(entry)
                if "best" in entry:
                    gain = (entry["default_us"] / entry["best_us"]) if entry.get("default_us") else float("nan")
                    print(f"{entry['op']:<28} {entry['key']:<40} default {entry['default_us'] or float('nan'):9.2f} µs "
                          f"-> {entry['best_us']:9.2f} µs ({gain:.2f}x) {entry['best']}", flush=True)
                    if not args.dry_run and entry["best_us"] is not None and math.isfinite(entry["best_us"]):
                        tuning.record(entry["op"], info["device"], getattr(torch, entry["dtype"]), entry["key"],
                                      entry["best"])
                else:
                    print(f"{entry['op']:<28} {entry.get('key', entry['case']):<40} "
                          f"{entry.get('skipped') or entry.get('error')}", flush=True)
    path = common.write_results("tune", info, {}, results, args.out, dry_run=args.dry_run)
    print(f"wrote {path}" + ("" if args.dry_run else f"; tuning tables under {tuning.TABLE_DIR}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
