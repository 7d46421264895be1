"""runtime/dispatch.py: backends load from what their modules list, and kernels/ never imports runtime/."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runtime import dispatch

ROOT = Path(__file__).resolve().parents[1]
TRITON_MODULES = ["kernels.triton_moe", "kernels.triton_rope", "kernels.triton_conv", "kernels.triton_attention"]


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_kernels_import_nothing_from_runtime():
    pytest.importorskip("triton", reason="triton not installed")
    result = _run(f"""
        import importlib, sys
        for name in {TRITON_MODULES!r} + ["kernels.launch_counts"]:
            module = importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m == "runtime" or m.startswith("runtime."))
        assert not loaded, loaded
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_launch_counts_import_without_triton():
    result = _run("""
        import sys
        sys.modules["triton"] = None  # any import of triton now raises ImportError
        from kernels.launch_counts import LAUNCH_COUNTS, LAUNCHES
        assert "omni_rt_triton::moe_experts" in LAUNCHES and "omni_rt_triton::moe_experts" in LAUNCH_COUNTS
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_triton_backend_registers_what_its_modules_list():
    pytest.importorskip("triton", reason="triton not installed")
    import importlib

    dispatch.load_backend("triton")
    listed = {}
    for name in TRITON_MODULES:
        listed.update(importlib.import_module(name).TRITON_OPS)
    assert listed, "no module lists a Triton op"
    for op, fn in listed.items():
        assert dispatch._IMPLS[op]["triton"] is fn, op
    assert {op for op, impls in dispatch._IMPLS.items() if "triton" in impls} == set(listed)
    assert callable(torch.ops.omni_rt_triton.moe_experts)
