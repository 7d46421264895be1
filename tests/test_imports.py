"""Imports run one way (issue "One engine"): kernels/ needs nothing from runtime/ (tests/test_dispatch.py checks
it), the exported backends the runtime plugs in need nothing from runtime/ either, and the ONNX Runtime and
TensorRT backends share export/manifest.py instead of importing each other."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_exported_backends_import_nothing_from_runtime():
    code = ("import sys, export.backends, export.ort, export.trt, export.manifest; "
            "print(sorted(m for m in sys.modules if m == 'runtime' or m.startswith('runtime.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    for name in ("backends", "ort", "trt", "manifest"):
        assert not any(m.startswith("runtime") for m in _imported_modules(ROOT / "export" / f"{name}.py")), name


def test_ort_and_trt_do_not_import_each_other():
    assert "export.trt" not in _imported_modules(ROOT / "export" / "ort.py")
    assert "export.ort" not in _imported_modules(ROOT / "export" / "trt.py")


def test_runtime_imports_from_export_only_the_runtime_free_backends():
    allowed = {"export.backends"}
    for path in (ROOT / "runtime").rglob("*.py"):
        used = {m for m in _imported_modules(path) if m == "export" or m.startswith("export.")}
        assert used <= allowed, f"{path.relative_to(ROOT)} imports {sorted(used - allowed)}"
