"""A compact view of a bench/kernels.py results file: per case the fastest backend, its fraction of the
measured floor and its ratio to the torch reference, plus every FAILED row. Fits the end of a device call's
output (the full table is in the JSON and the log).

    python bench/summary.py bench/results/kernels-h100-80gb-hbm3-20261124-120000.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


SHORT = {"moe_experts": "moe", "route_topk": "route_topk", "qk_norm_rope": "qk_norm_rope",
         "decode_attention": "decode_attn", "causal_conv1d_update": "conv1d_upd",
         "causal_conv_transpose1d_update": "convT_upd", "rms_norm": "rms_norm"}


def compact(result: dict, width: int = 150) -> str:
    rows = result["rows"]
    info, ceilings = result["info"], result["ceilings"]
    lines = [f"{info['device']} | torch {info['torch']} | triton {info['triton']} | {info['date']} | "
             f"{info['commit'][:12]}" + (f" | {info['label']}" if "label" in info else ""),
             f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s"
             + ("" if result.get("complete", True) else
                f" | PARTIAL: {result.get('cases_done', '?')} of {result.get('cases_total', '?')} cases (the run "
                "stopped early)"),
             f"{'op':<12} {'case':<52} {'fastest':<18} {'µs':>9} {'%floor':>7} {'vs ref':>7} {'ref µs':>9} backends"]
    cases: dict[tuple, list[dict]] = {}
    for row in rows:
        cases.setdefault((row["op"], row["case"]), []).append(row)
    failed = []
    for (op, case), group in cases.items():
        ok = [r for r in group if "us" in r]
        failed += [r for r in group if "error" in r]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["us"])
        ref = next((r for r in ok if r["backend"] == "torch"), None)
        floor = f"{100 * best['of_floor']:.1f}%" if best.get("of_floor") is not None else "-"
        vs = f"{best['vs_ref']:.2f}x" if best.get("vs_ref") else "-"
        names = ",".join(f"{r['backend'].split('.')[-1]}{'*' if r.get('mode') == 'cuda-graph' else ''}" for r in ok)
        line = (f"{SHORT.get(op, op)[:12]:<12} {case[:52]:<52} {best['backend'][:18]:<18} {best['us']:>9.2f} {floor:>7} {vs:>7} "
                f"{(ref['us'] if ref else float('nan')):>9.2f} {names}")
        lines.append(line[:width])
    if failed:
        lines.append(f"FAILED ({len(failed)}):")
        lines += [f"  {r['op']} | {r['case']} | {r['backend']}: {r['error'][:90]}" for r in failed]
    lines.append("(* = timed as CUDA-graph replay)")
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in paths:
        print(compact(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
