#!/usr/bin/env bash
# Create (or update) .venv with the pinned packages and omni-rt installed in editable mode.
# Idempotent: a second run only checks the pins. CPU-only machines need nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "== installing pinned packages (requirements-test.txt)"
.venv/bin/python -m pip install -q -r requirements-test.txt
.venv/bin/python -m pip install -q -r requirements-scale.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, transformers, runtime; print('== torch', torch.__version__, '| transformers', transformers.__version__, '| omni-rt ready')"
