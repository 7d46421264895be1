"""The tiny default checkpoint: config, random weights and a tokenizer of our own, in the real layout.

Nothing is fetched from a hub: `write_tiny_checkpoint` writes everything a real checkpoint directory has
(config.json, safetensors with HF names, tokenizer files), so the demo and the tests exercise the same
loading code a downloaded Qwen3-Omni checkpoint goes through.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from runtime.config import OmniConfig
from runtime.presets import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE, tiny

TINY_SEED = 0


def default_tiny_dir() -> Path:
    """Where the demo keeps its tiny checkpoint: $OMNI_RT_CACHE/tiny (default ~/.cache/omni-rt/tiny)."""
    root = os.environ.get("OMNI_RT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omni-rt")
    return Path(root) / "tiny"


def write_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the `tiny` preset with random weights (fp32) and its tokenizer to `out_dir`."""
    from runtime.frontend.tokenizer import write_tiny_tokenizer
    from runtime.weights import init_random, save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmniConfig.from_dict(tiny())
    model = init_random(cfg, device="cpu", dtype=torch.float32, seed=seed)
    save_weights(model, out)
    write_tiny_tokenizer(out, TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE)
    cfg.save(out)  # last: its presence marks a complete checkpoint
    return out


def _is_intact(out: Path) -> bool:
    """True when every file of a cached tiny checkpoint reads back: the config is the preset's, the weights are
    whole safetensors files, the tokenizer loads (a damaged cache would otherwise fail the demo on every run)."""
    from runtime.frontend.tokenizer import Tokenizer
    from runtime.weights import CheckpointError, check_shard

    config = out / "config.json"
    if not (config.is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()):
        return False
    try:
        if OmniConfig.from_dict(json.loads(config.read_text())) != OmniConfig.from_dict(tiny()):
            return False
        check_shard(str(out / "model.safetensors"))
        Tokenizer.from_dir(out)
    except (ValueError, CheckpointError, OSError):  # ConfigError and JSONDecodeError are ValueErrors
        return False
    return True


def ensure_tiny_checkpoint(out_dir: str | os.PathLike | None = None) -> Path:
    """Reuse the tiny checkpoint at `out_dir` if it is intact and matches the preset; else (re)write it, into a
    temporary folder renamed into place, so an interrupted write never leaves a half checkpoint behind."""
    out = Path(out_dir) if out_dir is not None else default_tiny_dir()
    if _is_intact(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_tiny_checkpoint(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
