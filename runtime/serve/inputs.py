"""OpenAI chat messages -> the thinker prompt `engine.stream` takes as processor tensors (input_ids,
input_features, feature_attention_mask, pixel_values, image_grid_thw), for a whole conversation: every turn,
media in the order the client sent them.

Two steps: `parse_messages` decodes what the client sent (base64 audio of any rate -> 16 kHz waveform, data-URL
or local images, videos as data URLs or local files) into the engine's conversation input, raising a 400 that names the field; `build_prompt`
prepares it with `engine.prepare(messages=...)` (so a request gives the ids `engine.generate` gives) and checks
that it fits.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile

import numpy as np
import torch

from runtime.frontend import audio as audio_frontend
from runtime.frontend.prompt import DEFAULT_SYSTEM_PROMPT
from runtime.serve.errors import bad_request
from runtime.serve.schemas import ChatCompletionRequest

ROLE_NAMES = {"developer": "system"}  # OpenAI's newer name for the system turn


def decode_base64(data: str, param: str) -> bytes:
    if "," in data[:100] and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"invalid base64: {err}", param) from None
    if not raw:
        raise bad_request("empty base64 payload", param)
    return raw


def check_waveform(waveform: np.ndarray, param: str) -> None:
    if waveform.size == 0:
        raise bad_request("audio has no samples", param)
    if not np.isfinite(waveform).all():
        raise bad_request("audio holds NaN or infinite samples", param)


def decode_audio_file(raw: bytes, param: str) -> torch.Tensor:
    """A wav / flac / mp3 file's bytes -> [num_samples] float32 mono at 16 kHz (the audio encoder's rate)."""
    soundfile = audio_frontend.require_soundfile()
    try:
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001 - libsndfile raises several kinds for undecodable bytes
        raise bad_request(f"cannot decode the audio: {err}", param) from None
    waveform = samples.mean(axis=1)
    check_waveform(waveform, param)
    return audio_frontend.resample(waveform, rate)


def decode_pcm16(raw: bytes, sample_rate: int, param: str) -> torch.Tensor:
    """Raw little-endian int16 mono PCM (the Realtime API's input format) -> float32 at 16 kHz."""
    if len(raw) % 2:
        raise bad_request("pcm16 audio has an odd number of bytes", param)
    waveform = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    check_waveform(waveform, param)
    return audio_frontend.resample(waveform, sample_rate)


def _open_image(url: str, allow_local_files: bool, param: str):
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        source = io.BytesIO(decode_base64(url, param))
    elif url.startswith(("http://", "https://")):
        raise bad_request("image URLs are not fetched: send a data: URL (base64)", param)
    elif not allow_local_files:
        raise bad_request("local image paths are refused (start the server with --allow-local-files)", param)
    else:
        source = url.removeprefix("file://")
        if not os.path.isfile(source):
            raise bad_request(f"no such image file: {source}", param)
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise bad_request(f"cannot decode the image: {err}", param) from None


def _load_video(url: str, allow_local_files: bool, param: str) -> np.ndarray:
    """A video data URL (base64 mp4 / webm / ...) or an allowed local file -> [T, H, W, 3] uint8 frames sampled at
    1 fps, as engine.prepare samples a video file (its default video_fps); decoded here so errors name the field."""
    from runtime.frontend.video import load_video

    if url.startswith(("http://", "https://")):
        raise bad_request("video URLs are not fetched: send a data: URL (base64)", param)
    if not url.startswith("data:") and not allow_local_files:
        raise bad_request("local video paths are refused (start the server with --allow-local-files)", param)
    try:
        if not url.startswith("data:"):
            return load_video(url.removeprefix("file://")).frames
        with tempfile.NamedTemporaryFile(suffix=".video") as handle:  # PyAV reads files; gone once decoded
            handle.write(decode_base64(url, param))
            handle.flush()
            return load_video(handle.name).frames
    except (ValueError, FileNotFoundError) as err:
        raise bad_request(f"cannot decode the video: {err}", param) from None


def audio_part(waveform: torch.Tensor) -> dict:
    """A decoded 16 kHz waveform as a part of the engine's conversation input (runtime/frontend/conversation.py)."""
    return {"type": "audio", "audio": waveform, "sample_rate": audio_frontend.SAMPLE_RATE}


def parse_messages(body: ChatCompletionRequest, allow_local_files: bool = False) -> list[dict]:
    """-> the engine's conversation input: [{"role", "content": [{"type": "text", "text"} | audio_part(...) |
    {"type": "image", "image": PIL image}]}], media decoded (so every decoding error names its field)."""
    turns = []
    for i, message in enumerate(body.messages):
        role = ROLE_NAMES.get(message.role, message.role)
        content = message.content
        if content is None or isinstance(content, str):
            turns.append({"role": role, "content": [{"type": "text", "text": content or ""}]})
            continue
        items = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            if part.type == "text":
                items.append({"type": "text", "text": part.text})
            elif role != "user":
                raise bad_request(f"a {message.role} message can only hold text", f"{param}.type")
            elif part.type == "input_audio":
                raw = decode_base64(part.input_audio.data, f"{param}.input_audio.data")
                items.append(audio_part(decode_audio_file(raw, f"{param}.input_audio.data")))
            elif part.type == "image_url":
                items.append({"type": "image",
                              "image": _open_image(part.image_url.url, allow_local_files, f"{param}.image_url.url")})
            else:
                items.append({"type": "video",
                              "video": _load_video(part.video_url.url, allow_local_files, f"{param}.video_url.url")})
        turns.append({"role": role, "content": items})
    return turns


def build_prompt(engine, messages: list[dict], max_tokens: int) -> tuple[dict, int]:
    """messages (parse_messages' form) -> (engine.stream keywords for the prompt, prompt length in tokens),
    prepared by `engine.prepare(messages=...)`, the engine's own conversation input (the checkpoint's chat
    template). 400 when the conversation is empty or does not fit the server's context with max_tokens."""
    if engine.tokenizer is None:
        raise bad_request("this model has no tokenizer: it serves no chat", "model")
    try:
        prompt = engine.prepare(messages=messages, system=DEFAULT_SYSTEM_PROMPT)
    except ValueError as err:
        raise bad_request(str(err), "messages") from None
    length = prompt.input_ids.shape[1]
    context = engine.scheduler_config.max_seq_len
    if length + max_tokens > context:
        raise bad_request(f"the prompt is {length} tokens; with max_tokens {max_tokens} it exceeds this server's "
                          f"context of {context} tokens", "messages", "context_length_exceeded")
    kwargs = {name: value for name, value in vars(prompt.inputs).items() if value is not None}
    return dict(kwargs, input_ids=prompt.input_ids, attention_mask=prompt.attention_mask), length
