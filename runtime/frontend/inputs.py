"""Raw inputs -> checked inputs for `OmniEngine.prepare`: each bad input fails here, before any model work, with
an error naming it (`audio 0`, `video 1`, the file) and saying what is wrong (docs/bad_inputs.md lists them).

    check_text(text)                  a str that encodes as UTF-8
    raw_turn(text, audios, ...)       prepare's raw arguments as one user turn of content parts
    load_waveform(array, rate, what)  rate, shape, dtype and NaN/inf checked before resampling to 16 kHz
    load_video_part(part, ...)        a video part -> (frames, its 16 kHz audio track or None)
    as_videos(videos)                 a bare array is one video
"""

from __future__ import annotations

import os

import numpy as np
import torch

from runtime.frontend import audio as audio_frontend

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_text(text) -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # e.g. a command-line argument of undecodable bytes (surrogate escapes)
        raise ValueError(f"text is not valid UTF-8 (character {exc.start} of {len(text)}): decode it first") from exc


def raw_turn(text, audios: list, sample_rate, images: list, videos: list, use_audio_in_video: bool) -> list[dict]:
    """prepare's raw inputs as one user turn: audios, images, videos, then the text. With use_audio_in_video the
    frame-array videos take their audio tracks from the end of `audios`, in video order."""
    check_text(text)
    array_videos = [i for i, v in enumerate(videos) if not isinstance(v, (str, os.PathLike))]
    tracks: dict[int, object] = {}
    if use_audio_in_video and array_videos:
        if len(audios) < len(array_videos):
            raise ValueError(f"use_audio_in_video=True with {len(array_videos)} video frame arrays needs their audio "
                             f"tracks: pass audio=[..., one waveform per array video, last and in video order] "
                             f"(got {len(audios)} audio inputs), or pass video files, whose tracks are decoded")
        tracks = dict(zip(array_videos, audios[len(audios) - len(array_videos):]))
        audios = audios[:len(audios) - len(array_videos)]
    content = [{"type": "audio", "audio": a, "sample_rate": sample_rate} for a in audios]
    content += [{"type": "image", "image": i} for i in images]
    content += [{"type": "video", "video": v, "audio": tracks.get(n), "sample_rate": sample_rate}
                for n, v in enumerate(videos)]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def load_waveform(audio, sample_rate, what: str) -> torch.Tensor:
    """A raw waveform -> [num_samples] float32 at 16 kHz, checked (rate, shape, finite) before resampling."""
    if sample_rate is None:
        raise ValueError(f"{what}: a raw audio waveform needs its sample_rate (it is resampled to 16 kHz)")
    rate = audio_frontend.check_sample_rate(sample_rate, what)
    try:
        waveform = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: expected a file path or a 1-D float waveform, got {type(audio).__name__}") from exc
    if waveform.dtype in INT_DTYPES:
        # Integer PCM would be fed at its raw scale (x32768 for int16): the log-mel features would be shifted and
        # the answer quietly wrong. Say how to convert instead of guessing the convention.
        raise ValueError(f"{what}: expected real float samples in [-1, 1], got integer dtype {waveform.dtype}; "
                         "convert first (int16 PCM: samples / 32768)")
    if waveform.is_complex() or not waveform.is_floating_point():
        raise ValueError(f"{what}: expected real float samples, got dtype {waveform.dtype}")
    if waveform.dim() != 1:
        raise ValueError(f"{what}: audio waveform must be 1-D (mono samples), got shape {tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise ValueError(f"{what}: audio waveform is empty (zero samples)")
    audio_frontend.check_finite(waveform, what)
    waveform = waveform.to(torch.float32)
    return audio_frontend.resample(waveform, rate) if rate != audio_frontend.SAMPLE_RATE else waveform




def load_video_part(item, index: int, video_fps: float, use_audio_in_video: bool, vision: dict):
    """A conversation's video part (value, track, track rate) -> (frames, 16 kHz track or None)."""
    value, track, track_rate = item
    what = f"video {index}"
    if not (isinstance(video_fps, (int, float)) and not isinstance(video_fps, bool) and video_fps > 0):
        raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
    if isinstance(value, (str, os.PathLike)):
        from runtime.frontend.video import load_video

        clip = load_video(value, fps=video_fps, temporal_patch_size=vision["temporal_patch_size"],
                          with_audio=use_audio_in_video)
        return clip.frames, (torch.from_numpy(clip.audio) if use_audio_in_video else None)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim != 4:
        raise ValueError(f"{what}: a video array must be [num_frames, H, W, 3] uint8, got shape {tuple(value.shape)}")
    if use_audio_in_video:
        if track is None:
            raise ValueError(f"{what}: use_audio_in_video=True needs this frame array's audio track (an 'audio' "
                             "waveform with its 'sample_rate' in the video part), or a video file")
        track = load_waveform(track, track_rate, f"audio track of {what}") if not isinstance(
            track, (str, os.PathLike)) else audio_frontend.load_audio(track)
        return value, track
    return value, None


def as_videos(videos) -> list:
    """videos as a list of videos: a bare [T, H, W, 3] array (or a path) is one video, a [N, T, H, W, 3] array
    N videos (a numpy array's truth value would otherwise be asked for, which fails)."""
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike)):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(f"videos: an array must be one video [num_frames, H, W, 3] or a batch [N, num_frames, H, W, "
                         f"3], got shape {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        return list(videos)
    raise ValueError(f"videos: expected a video file, a frame array or a list of them, got {type(videos).__name__}")
