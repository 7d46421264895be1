"""The whole Qwen3-Omni model as the checkpoint lays it out: `thinker.*`, `talker.*`, `code2wav.*`."""

from __future__ import annotations

import torch
from torch import nn

from runtime.config import OmniConfig
from runtime.models.thinker import Thinker


class OmniModel(nn.Module):
    """thinker (always) + talker and code2wav (when the config enables audio output)."""

    def __init__(self, cfg: OmniConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker = Thinker(cfg.thinker)
        if cfg.talker is not None:
            from runtime.models.code2wav import Code2Wav
            from runtime.models.talker import Talker

            self.talker = Talker(cfg.talker)
            self.code2wav = Code2Wav(cfg.code2wav)
        else:
            self.talker = self.code2wav = None

    @property
    def has_audio_output(self) -> bool:
        return self.talker is not None


def build_model(cfg: OmniConfig, device: str | torch.device = "meta") -> OmniModel:
    """Construct without initialising weights (meta device by default: free at any size)."""
    with torch.device(device):
        return OmniModel(cfg)
