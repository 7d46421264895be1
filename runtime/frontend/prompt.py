"""Chat messages → thinker input ids, built the way transformers' `Qwen3OmniMoeProcessor` builds them.

Two steps, as in the processor (transformers 5.23 `processing_qwen3_omni_moe.py` + `OmniModalProcessorMixin`):
1. `build_chat`: the chat text, one placeholder per media item:
     audio  `<|audio_start|><|audio_pad|><|audio_end|>`
     image  `<|vision_start|><|image_pad|><|vision_end|>`
     video  `<|vision_start|><|video_pad|><|vision_end|>`
2. `expand_placeholders`: each `<|audio_pad|>` / `<|image_pad|>` / `<|video_pad|>` becomes as many pad tokens as the
   encoder emits (audio: AuT length formula, MODEL_SPEC §5; image/video: t·h·w / merge²). With
   `use_audio_in_video` a video placeholder becomes `<|audio_start|>` + video and audio pads merged by time +
   `<|audio_end|>`, still wrapped in the vision markers (MODEL_SPEC §4.2).

Chat format (Qwen ChatML, as the released template renders it for list-style content):
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{items}<|im_end|>\\n<|im_start|>assistant\\n
Media placeholders and text items are concatenated in order with no separator. There is no default system turn
in the template itself; `build_chat` adds `DEFAULT_SYSTEM_PROMPT` unless told otherwise, because audio output is
only reliable with it (MODEL_SPEC §11).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

# AuT output length for T mel frames (13 per 100-frame chunk + ⌈tail/8⌉), shared with the audio front end.
from runtime.frontend.audio import audio_token_count  # noqa: F401  (re-exported for callers of this module)

DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
PLACEHOLDERS = {
    "audio": AUDIO_START + AUDIO_PAD + AUDIO_END,
    "image": VISION_START + IMAGE_PAD + VISION_END,
    "video": VISION_START + VIDEO_PAD + VISION_END,
}
_PAD_KIND = {AUDIO_PAD: "audio", IMAGE_PAD: "image", VIDEO_PAD: "video"}
_PAD_RE = re.compile("|".join(re.escape(p) for p in _PAD_KIND))
ROLES = ("system", "user", "assistant")

# Jinja twin of build_chat, written into our tiny tokenizer_config.json so transformers' apply_chat_template renders
# the same text (the released checkpoint ships its own, longer template with tools and thinking branches).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '<|im_start|>user\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}{%- else -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif item.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'text' -%}{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message.content is string -%}{%- set ns.text = message.content -%}{%- else -%}"
    "{%- for item in message.content -%}"
    "{%- if item.type == 'text' -%}{%- set ns.text = ns.text + item.text -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message.role == 'assistant' and '</think>' in ns.text -%}"
    "{%- set ns.text = ns.text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + ns.text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


def num_mel_frames(num_samples: int, hop_length: int = 160, batch_max_samples: int | None = None) -> int:
    """Valid log-mel frames (`feature_attention_mask.sum()`) WhisperFeatureExtractor reports for one waveform.

    The processor feature-extracts every audio of a call as one batch padded to the longest (batch_max_samples,
    default num_samples). The frame mask is the sample mask strided by the hop, with its last entry dropped when the
    padded length is not a multiple of the hop, so: the longest audio gets ⌊n/hop⌋ frames, a shorter one ⌈n/hop⌉
    (capped at ⌊max/hop⌋). Measured (transformers 5.23): 16197 samples beside a 40000-sample clip → 102 frames.
    """
    longest = num_samples if batch_max_samples is None else batch_max_samples
    if num_samples > longest:
        raise ValueError(f"num_samples {num_samples} exceeds batch_max_samples {longest}")
    return min(-(-num_samples // hop_length), longest // hop_length)


# ---------------------------------------------------------------------------------------------------------------
# Step 1: chat text.

def _items(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in ("text", "audio", "image", "video"):
            raise ValueError(f"content item type must be text/audio/image/video, got {item!r}")
        if kind == "text" and not isinstance(item.get("text"), str):
            raise ValueError(f"text item without a 'text' string: {item!r}")
    return list(content)


def _render_turn(role: str, items: list[dict]) -> str:
    if role == "user":
        body = "".join(item["text"] if item["type"] == "text" else PLACEHOLDERS[item["type"]] for item in items)
    else:
        media = [item["type"] for item in items if item["type"] != "text"]
        if media:
            raise ValueError(f"a {role} turn cannot carry media ({media}); put media in a user turn")
        body = "".join(item["text"] for item in items)
        if role == "assistant" and "</think>" in body:
            # History turns keep only the answer, as the released template does for list-style conversations.
            body = body.split("</think>")[-1].lstrip("\n")
    return f"{IM_START}{role}\n{body}{IM_END}\n"


def build_chat(messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM_PROMPT,
               add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
    """Qwen chat text with one placeholder per media item, in order.

    messages: turns `{"role": "user"|"system"|"assistant", "content": str | [{"type": "text", "text": ...},
        {"type": "audio"|"image"|"video", ...}, ...]}`. Media only in user turns.
    system: system prompt used when `messages` does not start with a system turn; None for no system turn.
    add_generation_prompt: end with `<|im_start|>assistant\\n` so the model writes the answer.
    enable_thinking: False appends the empty `<think>\\n\\n</think>\\n\\n` block (Thinking checkpoints).

    ValueError for an empty prompt (no text and no media outside the system prompt), unknown roles or item types.
    """
    messages = list(messages)
    for message in messages:
        if message.get("role") not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {message.get('role')!r}")
    turns = [(m["role"], _items(m)) for m in messages]
    if not any(item["type"] != "text" or item["text"].strip()
               for role, items in turns if role != "system" for item in items):
        raise ValueError("empty prompt: no text and no media in the conversation")
    if system is not None and turns[0][0] != "system":
        turns.insert(0, ("system", [{"type": "text", "text": system}]))
    text = "".join(_render_turn(role, items) for role, items in turns)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
        if enable_thinking is False:
            text += "<think>\n\n</think>\n\n"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Step 2: expand placeholders.

def _grid(thw, what: str, merge_size: int) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in thw)
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise ValueError(f"{what} grid (t, h, w) = {(t, h, w)} must be positive with h, w divisible by "
                         f"merge_size {merge_size}")
    return t, h, w


def _audio_in_video(num_audio: int, thw: tuple[int, int, int], second_per_grid: float, merge_size: int,
                    position_id_per_seconds: float) -> list[str]:
    """Video and audio pads merged by time position, video first on ties (the processor's rule, §4.2).

    Video token k of temporal group i sits at i·second_per_grid·position_id_per_seconds (a float, not rounded);
    audio token j sits at j (one position id per audio token).
    """
    t, h, w = thw
    per_group = (h // merge_size) * (w // merge_size)
    video_times = [(i * second_per_grid) * position_id_per_seconds for i in range(t) for _ in range(per_group)]
    out, v, a = [AUDIO_START], 0, 0
    while v < len(video_times) and a < num_audio:
        if video_times[v] <= a:
            out.append(VIDEO_PAD)
            v += 1
        else:
            out.append(AUDIO_PAD)
            a += 1
    out += [VIDEO_PAD] * (len(video_times) - v) + [AUDIO_PAD] * (num_audio - a) + [AUDIO_END]
    return out


def _replacements(kinds: list[str], audio_token_counts, image_grid_thw, video_grid_thw, video_second_per_grid,
                  merge_size: int, position_id_per_seconds: float, use_audio_in_video: bool) -> list[list[str]]:
    """Token list replacing each pad placeholder, in order; validates the media counts."""
    audio_token_counts = [int(n) for n in audio_token_counts]
    image_grid_thw = [_grid(g, "image", merge_size) for g in _rows(image_grid_thw)]
    video_grid_thw = [_grid(g, "video", merge_size) for g in _rows(video_grid_thw)]
    n_audio, n_image, n_video = (kinds.count(k) for k in ("audio", "image", "video"))
    if any(n < 0 for n in audio_token_counts):
        raise ValueError(f"audio token counts must be >= 0, got {audio_token_counts}")
    if n_image != len(image_grid_thw):
        raise ValueError(f"prompt has {n_image} image placeholders but {len(image_grid_thw)} image grids were given")
    if n_video != len(video_grid_thw):
        raise ValueError(f"prompt has {n_video} video placeholders but {len(video_grid_thw)} video grids were given")
    if use_audio_in_video:
        if n_audio + n_video != len(audio_token_counts):
            raise ValueError(
                f"prompt has {n_audio} audio placeholders + {n_video} videos with audio tracks (use_audio_in_video) "
                f"but {len(audio_token_counts)} audio token counts were given")
        if video_second_per_grid is None:
            video_second_per_grid = [2.0] * n_video  # temporal_patch_size 2 / fps 1.0, the processor's default
        video_second_per_grid = [float(s) for s in video_second_per_grid]
        if len(video_second_per_grid) != n_video:
            raise ValueError(f"prompt has {n_video} videos but {len(video_second_per_grid)} video_second_per_grid "
                             "values were given")
    elif n_audio != len(audio_token_counts):
        raise ValueError(f"prompt has {n_audio} audio placeholders but {len(audio_token_counts)} audio token counts "
                         "were given")

    out, i_audio, i_image, i_video = [], 0, 0, 0
    for kind in kinds:
        if kind == "audio":
            out.append([AUDIO_PAD] * audio_token_counts[i_audio])
            i_audio += 1
        elif kind == "image":
            t, h, w = image_grid_thw[i_image]
            out.append([IMAGE_PAD] * (t * h * w // merge_size**2))
            i_image += 1
        elif use_audio_in_video:
            # A video takes the next audio slot: audio items are listed in order of appearance, audio or video.
            out.append(_audio_in_video(audio_token_counts[i_audio], video_grid_thw[i_video],
                                       video_second_per_grid[i_video], merge_size, position_id_per_seconds))
            i_audio += 1
            i_video += 1
        else:
            t, h, w = video_grid_thw[i_video]
            out.append([VIDEO_PAD] * (t * h * w // merge_size**2))
            i_video += 1
    return out


def _rows(grid) -> list:
    if grid is None:
        return []
    if isinstance(grid, torch.Tensor):
        return grid.reshape(-1, 3).tolist()
    return list(grid)


def expand_placeholders(text: str, audio_token_counts: Sequence[int] = (), image_grid_thw=(), video_grid_thw=(),
                        video_second_per_grid: Sequence[float] | None = None, merge_size: int = 2,
                        position_id_per_seconds: float = 13, use_audio_in_video: bool = False) -> str:
    """Replace each `<|audio_pad|>` / `<|image_pad|>` / `<|video_pad|>` in `text` by its run of pad tokens.

    audio_token_counts: encoder output length per audio item, `audio_token_count(num_mel_frames(...))`. With
        use_audio_in_video every video also has an audio track, and the list holds one entry per audio
        placeholder or video, in order of appearance in the text (as transformers orders audio slots).
    image_grid_thw / video_grid_thw: per item (t, h, w) in patches, list of triples or LongTensor [N, 3].
    video_second_per_grid: seconds per temporal grid per video (temporal_patch_size / fps); only read with
        use_audio_in_video; None means 2.0 each. Pass the float64 quotient as the processor uses it for the layout,
        not its float32 `video_second_per_grid` output tensor: the rounding can flip a video/audio tie.
    merge_size: spatial merge (2 for the real model): tokens per item = t·h·w / merge_size².
    position_id_per_seconds: 13 for the released checkpoint (the processor's default too).

    ValueError if the text is empty or the placeholder counts do not match the media given.
    """
    kinds = [_PAD_KIND[m.group()] for m in _PAD_RE.finditer(text)]
    if not text.strip():
        raise ValueError("empty prompt: no text and no media")
    pieces = _PAD_RE.split(text)
    runs = _replacements(kinds, audio_token_counts, image_grid_thw, video_grid_thw, video_second_per_grid,
                         merge_size, position_id_per_seconds, use_audio_in_video)
    out = [pieces[0]]
    for run, piece in zip(runs, pieces[1:]):
        out += run
        out.append(piece)
    return "".join(out)


def tokenize_prompt(tokenizer, messages: Sequence[dict], *, system: str | None = DEFAULT_SYSTEM_PROMPT,
                    audio_token_counts: Sequence[int] = (), image_grid_thw=(), video_grid_thw=(),
                    video_second_per_grid: Sequence[float] | None = None, merge_size: int = 2,
                    position_id_per_seconds: float = 13, use_audio_in_video: bool = False,
                    add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> torch.Tensor:
    """input_ids LongTensor [1, L] for a chat, equal to `tokenizer.encode(expand_placeholders(build_chat(...)))`.

    tokenizer: runtime.frontend.tokenizer.Tokenizer (anything with encode/token_to_id). Pads are spliced in id space
    (the pad tokens are atomic added tokens, so this equals encoding the expanded text) to avoid building a
    multi-megabyte string for long media. Media arguments as in `expand_placeholders`.
    """
    text = build_chat(messages, system=system, add_generation_prompt=add_generation_prompt,
                      enable_thinking=enable_thinking)
    return tokenize_chat_text(tokenizer, text, audio_token_counts=audio_token_counts, image_grid_thw=image_grid_thw,
                              video_grid_thw=video_grid_thw, video_second_per_grid=video_second_per_grid,
                              merge_size=merge_size, position_id_per_seconds=position_id_per_seconds,
                              use_audio_in_video=use_audio_in_video)


def tokenize_chat_text(tokenizer, text: str, *, audio_token_counts: Sequence[int] = (), image_grid_thw=(),
                       video_grid_thw=(), video_second_per_grid: Sequence[float] | None = None, merge_size: int = 2,
                       position_id_per_seconds: float = 13, use_audio_in_video: bool = False) -> torch.Tensor:
    """Chat text with one placeholder per media item (build_chat, or a checkpoint's chat template) -> input_ids
    [1, L], equal to `tokenizer.encode(expand_placeholders(text, ...))`. Media arguments as in
    `expand_placeholders`."""
    if not text.strip():
        raise ValueError("empty prompt: no text and no media")
    ids = tokenizer.encode(text)
    pad_ids = {tokenizer.token_to_id(tok): kind for tok, kind in _PAD_KIND.items()}
    kinds = [pad_ids[i] for i in ids if i in pad_ids]
    runs = _replacements(kinds, audio_token_counts, image_grid_thw, video_grid_thw, video_second_per_grid,
                         merge_size, position_id_per_seconds, use_audio_in_video)
    token_ids = {tok: tokenizer.token_to_id(tok) for tok in (AUDIO_START, AUDIO_END, AUDIO_PAD, IMAGE_PAD, VIDEO_PAD)}
    out: list[int] = []
    runs_iter = iter(runs)
    for i in ids:
        if i in pad_ids:
            out += [token_ids[tok] for tok in next(runs_iter)]
        else:
            out.append(i)
    return torch.tensor([out], dtype=torch.long)
