"""Speech out: int16 PCM samples -> the bytes of the format a client asked for, with the front end's table of
output formats (runtime/frontend/audio.py OUTPUT_FORMATS: wav, flac, mp3, ogg/opus through libsndfile; pcm16 is
the raw little-endian samples, as the OpenAI API sends them)."""

from __future__ import annotations

import io

import numpy as np

from runtime.frontend.audio import OUTPUT_FORMATS, require_soundfile


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """samples: [n] int16 mono -> the file (or raw pcm16) bytes."""
    samples = np.ascontiguousarray(samples, dtype=np.int16)
    if audio_format == "pcm16":
        return samples.astype("<i2").tobytes()
    container, subtype = OUTPUT_FORMATS[audio_format]
    out = io.BytesIO()
    require_soundfile().write(out, samples, sample_rate, format=container, subtype=subtype)
    return out.getvalue()
