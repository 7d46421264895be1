"""Conversations: `messages=` (system / user / assistant turns with content parts) -> chat text with one
placeholder per media item, plus the media themselves in order of appearance.

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "question.wav"},
                                     {"type": "image", "image": PIL.Image.open("p.png")},
                                     {"type": "text", "text": "What is said, and what is shown?"}]},
        {"role": "assistant", "content": "A dog barks; a dog is shown."},
        {"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "And here?"}]},
    ]

This is the OpenAI / transformers content-part form. A part's media is under its type's key (`audio`, `image`,
`video`), or under `path` / `url` (local paths only: nothing is fetched). Values: audio a file path or a 1-D
waveform (with `sample_rate` in the part, or the engine's sample_rate); image a path, PIL image or uint8 array;
video a path (decoded with PyAV), a [T, H, W, 3] uint8 array or a list of frames; with use_audio_in_video a
frame-array video part carries its audio track under `audio` (and `sample_rate`).

The text is rendered with the checkpoint's own `chat_template` (Jinja, in a sandbox configured as transformers'
`apply_chat_template` configures it) when the checkpoint has one, else with the built-in template
(runtime/frontend/prompt.py `build_chat`). Placeholders are then expanded by `prompt.tokenize_chat_text`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.frontend.prompt import ROLES, build_chat

MEDIA_KINDS = ("audio", "image", "video")


@dataclass
class Conversation:
    """Rendered chat text and its media, each list in order of appearance in the text."""

    text: str
    audios: list[Any] = field(default_factory=list)  # (value, sample_rate or None) per audio part
    images: list[Any] = field(default_factory=list)  # value per image part
    # (value, audio track or None, its sample_rate or None) per video part; a track given with a frame array is
    # what use_audio_in_video feeds the audio encoder (a video file's own track is decoded instead)
    videos: list[Any] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "audio" | "image" | "video" per media part, in order


def _media_value(part: dict, kind: str, where: str):
    for key in (kind, "path", "url"):
        if part.get(key) is not None:
            value = part[key]
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise ValueError(f"{where}: {kind} {value!r} is a URL; omni-rt reads local files only (download it)")
            if isinstance(value, str) and value.startswith("file://"):
                value = value[len("file://"):]
            return value
    raise ValueError(f"{where}: a {kind} part needs its {kind} under {kind!r} (or 'path'), got keys {sorted(part)}")


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of turns {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {ROLES}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, (str, list, tuple)):
            raise ValueError(f"messages[{i}]: content must be a string or a list of parts, got "
                             f"{type(content).__name__}")
        if isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text",) + MEDIA_KINDS:
                    raise ValueError(f"{where}: part type must be text, audio, image or video, got {part!r}")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}: a text part needs a 'text' string")
                if kind in MEDIA_KINDS and message["role"] != "user":
                    raise ValueError(f"{where}: a {message['role']} turn cannot carry {kind}; put media in a user turn")
    return list(messages)


def split_messages(messages, system: str | None = None) -> tuple[list[dict], Conversation]:
    """-> (template messages, Conversation with its media but no text yet). Template messages are the turns with
    every media part reduced to `{"type": kind, kind: <a short label>}` (what a chat template reads: the type, or
    the key's presence), a system turn prepended when `system` is given and the conversation has none."""
    messages = _check_messages(messages)
    media = Conversation("")
    audios, images, videos, plain = media.audios, media.images, media.videos, []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            plain.append({"role": message["role"], "content": content})
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
                continue
            value = _media_value(part, kind, f"messages[{i}].content[{j}]")
            label = os.fspath(value) if isinstance(value, (str, os.PathLike)) else f"<{kind} {j}>"
            if kind == "audio":
                audios.append((value, part.get("sample_rate")))
            elif kind == "image":
                images.append(value)
            else:
                videos.append((value, part.get("audio"), part.get("sample_rate")))
            media.kinds.append(kind)
            parts.append({"type": kind, kind: label})
        plain.append({"role": message["role"], "content": parts})
    if system is not None and plain[0]["role"] != "system":
        plain.insert(0, {"role": "system", "content": system})
    return plain, media


def load_chat_template(checkpoint_dir: str | os.PathLike | None) -> str | None:
    """The checkpoint's chat template, looked up where transformers looks: chat_template.jinja, then
    chat_template.json, then tokenizer_config.json's "chat_template" (a named list: its "default"). None if none.
    ValueError naming the file when it is not readable JSON."""
    if checkpoint_dir is None:
        return None
    root = Path(checkpoint_dir)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path} is damaged: {exc}") from exc
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A sandboxed Jinja template with what Hugging Face chat templates expect: trim_blocks / lstrip_blocks,
    loop controls, raise_exception, a tojson that keeps non-ASCII text, strftime_now."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template)


def render(messages: list[dict], chat_template: str | None, add_generation_prompt: bool = True,
           **template_kwargs) -> str:
    """Template messages (from split_messages) -> chat text with one placeholder per media part."""
    if chat_template is None:
        return build_chat(messages, system=None, add_generation_prompt=add_generation_prompt, **template_kwargs)
    import jinja2

    if not any(_has_content(m["content"]) for m in messages if m["role"] != "system"):
        raise ValueError("empty prompt: no text and no media in the conversation")
    try:
        return _compile(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **template_kwargs)
    except jinja2.TemplateError as exc:
        raise ValueError(f"the checkpoint's chat_template failed on these messages: {exc}") from exc


def _has_content(content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    return any(part["type"] != "text" or part["text"].strip() for part in content)


def conversation(messages, chat_template: str | None, system: str | None = None,
                 add_generation_prompt: bool = True, **template_kwargs) -> Conversation:
    """messages -> Conversation (rendered text + media lists). system: a system prompt to add when the
    conversation has no system turn (None: none)."""
    plain, media = split_messages(messages, system)
    media.text = render(plain, chat_template, add_generation_prompt, **template_kwargs)
    return media
