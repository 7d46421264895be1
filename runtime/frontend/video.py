"""Video files: PyAV decode -> sampled RGB frames (and the audio track as 16 kHz mono) for the vision front end.

    load_video(path, fps=1.0)  -> VideoClip(frames [N, H, W, 3] uint8, fps, indices, audio [S] f32 or None)

Frame sampling follows transformers' Qwen2-VL video processor (`sample_frames` with `fps`, transformers 5.23):
    num_frames = total / video_fps * fps, clamped to [min_frames, min(max_frames, total) floored to a multiple of
    temporal_patch_size] and to total, then floored to a multiple of temporal_patch_size;
    indices = arange(0, total, total / num_frames) truncated to int.
The sampled frames then go through `vision.preprocess_video` (smart resize to the video pixel bounds, the last
frame repeated to an even count) with `fps` as their rate, so `video_second_per_grid` = temporal_patch_size / fps
as the processor reports it. The audio track is decoded, averaged to mono and resampled to 16 kHz with soxr
(what `use_audio_in_video=True` feeds the audio encoder).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from runtime.frontend import audio as audio_frontend

MIN_FRAMES, MAX_FRAMES = 4, 768  # Qwen2VLVideoProcessor class defaults


@dataclass
class VideoClip:
    frames: np.ndarray  # [N, H, W, 3] uint8, the sampled frames
    fps: float  # rate the sampled frames stand for (the `fps` asked for)
    indices: np.ndarray  # [N] int64 indices of the sampled frames among all decoded frames
    audio: np.ndarray | None  # [num_samples] float32 mono at 16 kHz; None when the file has no audio track


def require_av():
    """The PyAV module, or ModuleNotFoundError saying how to install it (only video files need it)."""
    return audio_frontend._require("av", "av==18.1.0", "decode video files")


def sample_frame_indices(total_num_frames: int, video_fps: float, fps: float = 1.0, min_frames: int = MIN_FRAMES,
                         max_frames: int = MAX_FRAMES, temporal_patch_size: int = 2) -> np.ndarray:
    """Indices of the frames to keep, as transformers' Qwen2VLVideoProcessor.sample_frames picks them."""
    if total_num_frames < 1:
        raise ValueError(f"video has no frames (total_num_frames={total_num_frames})")
    if not (video_fps > 0 and fps > 0):
        raise ValueError(f"frame rates must be positive, got video_fps={video_fps}, fps={fps}")
    max_frames = math.floor(min(max_frames, total_num_frames) / temporal_patch_size) * temporal_patch_size
    num_frames = total_num_frames / video_fps * fps
    num_frames = min(max(num_frames, min_frames), max_frames, total_num_frames)
    num_frames = math.floor(num_frames / temporal_patch_size) * temporal_patch_size
    if num_frames < 1:
        raise ValueError(f"video has {total_num_frames} frames: fewer than one temporal patch "
                         f"({temporal_patch_size} frames) to sample")
    step = np.float64(total_num_frames) / num_frames
    # torch.arange(0, total, total / num).int() in float32 steps; float64 agrees for every count that matters.
    return np.arange(0, total_num_frames, step).astype(np.int64)[:num_frames]


def _frame_count(path: str, av) -> int:
    """Frames in the first video stream: its header count (what transformers' PyAV reader uses), else counted by
    decoding (some containers do not state it)."""
    with av.open(path) as container:
        stated = container.streams.video[0].frames
        if stated:
            return int(stated)
        return sum(1 for _ in container.decode(container.streams.video[0]))


def _decode_frames(path: str, av, fps: float, min_frames: int, max_frames: int, temporal_patch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """-> (sampled frames [N, H, W, 3] uint8, their indices). Only the sampled frames are converted and kept, so a
    long clip never sits in memory whole."""
    total = _frame_count(path, av)
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"video file {path}: the video stream states no frame rate")
        indices = sample_frame_indices(total, float(rate), fps, min_frames, max_frames, temporal_patch_size)
        wanted, frames = set(indices.tolist()), []
        for i, frame in enumerate(container.decode(stream)):
            if i > indices[-1]:
                break
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    if len(frames) != len(indices):
        raise ValueError(f"video file {path}: states {total} frames but only {i + 1 if total else 0} could be "
                         "decoded (truncated?)")
    return np.stack(frames), indices


def _decode_audio(path: str) -> np.ndarray | None:
    av = require_av()
    with av.open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        chunks, rate = [], stream.rate
        for frame in container.decode(stream):
            data = frame.to_ndarray()  # planar [channels, n] or packed [1, n * channels]
            if frame.format.is_planar:
                mono = data.astype(np.float32).mean(axis=0)
            else:
                mono = data.reshape(-1, len(frame.layout.channels)).astype(np.float32).mean(axis=1)
            if np.issubdtype(data.dtype, np.integer):  # s16 / s32 tracks: scale to [-1, 1]
                mono = mono / float(np.iinfo(data.dtype).max + 1)
            chunks.append(mono)
    if not chunks:
        return None
    samples = np.concatenate(chunks).astype(np.float32)
    audio_frontend.check_finite(samples, f"audio track of video file {path}")
    return audio_frontend.resample(samples, int(rate)).numpy()


def load_video(path: str | os.PathLike, fps: float = 1.0, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
               temporal_patch_size: int = 2, with_audio: bool = False) -> VideoClip:
    """A video file -> VideoClip: frames sampled at `fps` (see the module docstring) and, with `with_audio`, its
    audio track at 16 kHz mono. FileNotFoundError for a missing file; ValueError naming the file when PyAV cannot
    decode it, it has no video stream, or (with_audio) no audio track."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file {path!r} does not exist")
    av = require_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"video file {path}: no video stream")
        frames, indices = _decode_frames(path, av, fps, min_frames, max_frames, temporal_patch_size)
        track = _decode_audio(path) if with_audio else None
    except av.FFmpegError as exc:
        raise ValueError(f"could not decode video file {path}: {exc}") from exc
    if with_audio and (track is None or track.size == 0):
        raise ValueError(f"video file {path} has no audio track, but use_audio_in_video=True asks for it")
    return VideoClip(frames, fps, indices, track)
