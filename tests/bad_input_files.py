"""Bad input files for tests/test_bad_inputs.py, each made in a temporary folder by the test that needs it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def float_wav(path: Path, bad_value: float, rate: int = 16000) -> Path:
    """A 32-bit float WAV of a 0.5 s tone with one sample set to `bad_value` (NaN or inf): float WAV stores it."""
    import soundfile

    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate)).astype(np.float32)
    samples[rate // 4] = bad_value
    soundfile.write(path, samples, rate, subtype="FLOAT")
    return path


def random_bytes(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def text_file(path: Path) -> Path:
    path.write_text("these are notes, not pixels\n")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A 64x64 noise JPEG with its second half cut off (PIL: 'image file is truncated')."""
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncate_shard(checkpoint: Path) -> None:
    """Cut every safetensors shard of `checkpoint` to 60 % of its size (an interrupted download)."""
    for shard in checkpoint.glob("*.safetensors"):
        with open(shard, "r+b") as handle:
            handle.truncate(int(os.path.getsize(shard) * 0.6))


def video(path: Path, audio: bool = True, seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (96, 128),
          tone_hz: float = 440.0, audio_rate: int = 22050) -> Path:
    """An MPEG-4 clip made with PyAV: a bright square moving across a gradient (so frames differ) and, with
    `audio`, a sine tone (AAC, mono at `audio_rate`)."""
    import av

    height, width = size
    num_frames = int(seconds * fps)
    rows, cols = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        sound = container.add_stream("aac", rate=audio_rate, layout="mono") if audio else None
        for i in range(num_frames):
            frame = np.stack([rows * 255 // height, cols * 255 // width, np.full_like(rows, 60)], -1).astype(np.uint8)
            x = int(i * (width - 24) / max(num_frames - 1, 1))
            frame[30:54, x:x + 24] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            t = np.arange(int(seconds * audio_rate)) / audio_rate
            samples = (0.4 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None]  # [1, n] planar mono
            block = 1024
            for start in range(0, samples.shape[1], block):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + block]),
                                                   format="fltp", layout="mono")
                chunk.sample_rate = audio_rate
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return path
