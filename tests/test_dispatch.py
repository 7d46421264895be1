"""runtime/dispatch.py: backends load from what their modules list (kernels/ never imports runtime/), and the
kernel choice is per context (a ContextVar), resolved and checked by kernel_choice."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from runtime import dispatch

ROOT = Path(__file__).resolve().parents[1]
# Every module the triton backend loads (kernels/ grows: the list is dispatch's own, not a copy of it).
TRITON_MODULES = [name for name in dispatch._BACKEND_MODULES["triton"] if importlib.util.find_spec(name) is not None]


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
        from kernels.launch_counts import LAUNCHES
        import torch
        prefill = (torch.empty(9, 8), torch.zeros(9, 2, dtype=torch.int64), torch.empty(9, 2), None, None)
        assert LAUNCHES["omni_rt_triton::moe_experts"](prefill, {}) == 4
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


# ------------------------------------------------------------------------------------- the kernel choice
def test_kernel_choice_resolves_names_and_mappings():
    everything_torch = dispatch.kernel_choice("torch")
    assert set(everything_torch) == set(dispatch._IMPLS) and set(everything_torch.values()) == {"torch"}
    assert dispatch.kernel_choice(None) == everything_torch == dispatch.kernel_choice({})
    partial = dispatch.kernel_choice({"rms_norm": "torch"})
    assert partial == everything_torch  # missing ops: torch
    dispatch.register("rms_norm", "test_backend", lambda x, weight, eps: x)
    try:
        choice = dispatch.kernel_choice("test_backend")  # that backend where an op has it, torch elsewhere
        assert choice["rms_norm"] == "test_backend"
        assert {b for op, b in choice.items() if op != "rms_norm"} == {"torch"}
        assert dispatch.kernel_choice({"rms_norm": "test_backend"}) == choice
    finally:
        del dispatch._IMPLS["rms_norm"]["test_backend"]


def test_kernel_choice_refuses_what_does_not_exist():
    with pytest.raises(KeyError, match="unknown op 'no_such_op'"):
        dispatch.kernel_choice({"no_such_op": "torch"})
    with pytest.raises(ValueError, match="op 'rope_cos_sin' has no 'no_such_backend' implementation"):
        dispatch.kernel_choice({"rope_cos_sin": "no_such_backend"})
    with pytest.raises(ValueError, match="no op has a 'no_such_backend' implementation"):
        dispatch.kernel_choice("no_such_backend")
    with pytest.raises(ValueError, match="no_such_backend"):
        with dispatch.using("no_such_backend"):
            pass


def test_active_sets_this_context_and_restores_on_exit():
    dispatch.register("rms_norm", "test_backend", lambda x, weight, eps: x + 1)
    try:
        before = dispatch.selected()
        x = torch.zeros(2, 4)
        with dispatch.active({"rms_norm": "test_backend"}) as choice:
            assert choice == dispatch.selected() and choice["rms_norm"] == "test_backend"
            assert torch.equal(dispatch.rms_norm(x, torch.ones(4), 1e-6), x + 1)  # _call reads the active choice
            with dispatch.using("torch"):  # nested: the inner wins, then the outer comes back
                assert dispatch.selected()["rms_norm"] == "torch"
            assert dispatch.selected()["rms_norm"] == "test_backend"
        assert dispatch.selected() == before
        with pytest.raises(RuntimeError, match="boom"):
            with dispatch.active({"rms_norm": "test_backend"}):
                raise RuntimeError("boom")
        assert dispatch.selected() == before  # restored after an exception too
    finally:
        del dispatch._IMPLS["rms_norm"]["test_backend"]


def test_two_threads_each_see_their_own_choice():
    dispatch.register("rms_norm", "test_backend", lambda x, weight, eps: x)
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def run(name: str, spec: dict) -> None:
        try:
            assert dispatch.selected() == dispatch._default_choice()  # a new thread starts from the default
            with dispatch.active(spec):
                barrier.wait()  # both choices are active at once
                for _ in range(200):
                    seen.setdefault(name, set()).add(dispatch.selected()["rms_norm"])
                barrier.wait()
        except Exception as exc:  # reported below: an assert in a thread would not fail the test
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=("a", {"rms_norm": "test_backend"})),
                   threading.Thread(target=run, args=("b", {"rms_norm": "torch"}))]
        with dispatch.using("torch"):
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
    finally:
        del dispatch._IMPLS["rms_norm"]["test_backend"]
    assert not errors, errors
    assert seen == {"a": {"test_backend"}, "b": {"torch"}}


def test_default_comes_from_the_environment():
    result = _run("""
        import os
        os.environ["OMNI_RT_BACKEND"] = "triton"
        from runtime import dispatch
        import threading
        want = dispatch.kernel_choice("triton")
        assert want["moe_experts"] == "triton" and want["rope_cos_sin"] == "torch", want
        assert dispatch.selected() == want
        seen = []
        thread = threading.Thread(target=lambda: seen.append(dispatch.selected()))
        thread.start(); thread.join()
        assert seen == [want]  # other threads start from the same default
        with dispatch.using("torch"):
            assert set(dispatch.selected().values()) == {"torch"}
        assert dispatch.selected() == want
        print("ok")
    """)
    if "triton" in result.stderr and "No module named" in result.stderr:
        pytest.skip("triton not installed")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
