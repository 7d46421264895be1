"""Tuning tables as data: kernels/tuned/<op>.json maps (device, dtype, shape key) to launch parameters.

File layout: {"<device name>": {"<dtype>": {"<shape key>": {"BLOCK_M": 16, ...}}}}; device names are
torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3"), dtypes "bfloat16" / "float32" / ..., shape keys
whatever the op documents (e.g. "M=1,E=128,H=2048,I=768"). bench/tune.py writes entries; a kernel asks
`launch_config(op, key, dtype, default)` and gets the tuned entry or its own default (always the default on the
CPU interpreter). Entries are read once per process.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

TABLE_DIR = Path(__file__).with_name("tuned")


@lru_cache(maxsize=None)
def _table(op: str) -> dict:
    path = TABLE_DIR / f"{op}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def launch_config(op: str, key: str, dtype: torch.dtype, default: dict) -> dict:
    """The tuned launch parameters of `op` for this device, dtype and shape key, else `default`."""
    entry = _table(op).get(device_name(), {}).get(str(dtype).removeprefix("torch."), {}).get(key)
    return {**default, **entry} if entry else dict(default)


def record(op: str, device: str, dtype: torch.dtype, key: str, config: dict) -> None:
    """Write one tuned entry (used by bench/tune.py)."""
    TABLE_DIR.mkdir(exist_ok=True)
    path = TABLE_DIR / f"{op}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device, {}).setdefault(str(dtype).removeprefix("torch."), {})[key] = config
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _table.cache_clear()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands that came in as `dtype`: exact fp32 for fp32 inputs (the matrix
    units' default tf32 would cost ~1e-3 relative error), tf32 otherwise (bf16/fp16 operands are exact in it)."""
    return "ieee" if dtype == torch.float32 else "tf32"
