"""Text front end: tiny tokenizer, streaming detokenizer, chat prompt and placeholder expansion.

Oracles are transformers' own classes: `AutoTokenizer` on the files we write, and `Qwen3OmniMoeProcessor` built
from that tokenizer, `WhisperFeatureExtractor(feature_size=128)`, the PIL `Qwen2VLImageProcessorPil`, and a stand-in
video processor (transformers' video processors need torchvision, which this environment cannot install; the
stand-in only reports `video_grid_thw` from the clip shape, which is all the text side reads).

Random cases draw a fresh seed each run; set OMNI_TEST_SEED to replay one (the seed is in every failure message).
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata

import numpy as np
import pytest
import torch

from runtime.frontend.prompt import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    audio_token_count,
    build_chat,
    expand_placeholders,
    num_mel_frames,
    tokenize_prompt,
)
from runtime.frontend.tokenizer import StreamingDecoder, Tokenizer, write_tiny_tokenizer
from runtime.presets import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE

# MODEL_SPEC §13.2: 160-token vocabulary, 15 specials at the top → a 145-token regular vocab (ASCII alphabet).
SPEC_TINY_SPECIALS = {
    "<tts_text_eod>": 145, "<tts_text_bos>": 146, "<tts_pad>": 147, "system": 148, "assistant": 149,
    "<|audio_pad|>": 150, "<|image_pad|>": 151, "<|video_pad|>": 152, "<|audio_start|>": 153, "<|audio_end|>": 154,
    "<|vision_start|>": 155, "<|vision_end|>": 156, "user": 157, "<|im_start|>": 158, "<|im_end|>": 159,
}
CONFIGS = {
    "spec160": (SPEC_TINY_SPECIALS, 160),  # restricted alphabet
    "preset640": (TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE),  # runtime.presets.tiny(): all 256 bytes
}

WORDS = ("the a user assistant system model answers question voice picture video sound quickly streams token "
         "layer expert kernel cache runs writes reads waits hello world carefully simple natural numbers and or "
         "with from into because while people machine second frame audio speaker listens").split()
UNICODE_SAMPLES = [
    "emoji 😀🎉 and a family 👩‍👩‍👧 (zero-width joiners)",
    "中文测试：你好，世界。日本語のテキスト、한국어 문장",
    "accents: café, naïve, Zürich, São Paulo, Ærøskøbing",
    "math ∑ x² ≤ ∞, arrows → ⇒, currency €£¥₹",
    "mixed 😀中a\tb\n\n  c  \r\n ",
]


@pytest.fixture(scope="module")
def seed() -> int:
    return int(os.environ.get("OMNI_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict:
    out = {}
    for name, (specials, vocab_size) in CONFIGS.items():
        out[name] = write_tiny_tokenizer(tmp_path_factory.mktemp(name), specials, vocab_size)
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(tokenizer_dirs) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(str(path)) for name, path in tokenizer_dirs.items()}


def _random_sentence(rng: np.random.Generator) -> str:
    words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 14)))]
    if rng.random() < 0.3:
        words.insert(int(rng.integers(0, len(words))), str(int(rng.integers(0, 100000))))
    text = " ".join(words)
    text = text[0].upper() + text[1:] + str(rng.choice([".", "?", "!", ",", ""]))
    return text + ("\n" if rng.random() < 0.2 else "")


def _random_unicode(rng: np.random.Generator) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x3040, 0x30FF), (0xAC00, 0xAD00),
              (0x1F300, 0x1F64F), (0x2190, 0x22FF)]
    chars = []
    for _ in range(int(rng.integers(1, 40))):
        lo, hi = ranges[int(rng.integers(0, len(ranges)))]
        chars.append(chr(int(rng.integers(lo, hi + 1))))
    return "".join(chars)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("name", CONFIGS)
def test_special_ids_exact(name, tokenizer_dirs, hf_tokenizers):
    specials, vocab_size = CONFIGS[name]
    tok = Tokenizer.from_dir(tokenizer_dirs[name])
    hf = hf_tokenizers[name]
    assert tok.vocab_size == vocab_size == len(hf)
    for token, token_id in specials.items():
        assert tok.token_to_id(token) == token_id, token
        assert tok.encode(token) == [token_id], token
        assert hf.convert_tokens_to_ids(token) == token_id, token
    for token_id in range(vocab_size):  # every id, tokenizer and embedding sizes agree
        assert tok.id_to_token(token_id) is not None, token_id
    # system/user/assistant are plain words, not specials: decoded even with skip_special_tokens
    user_turn = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert user_turn[:2] == [specials["<|im_start|>"], specials["user"]]
    assert tok.decode(user_turn) == "user\nhi\n"
    assert tok.decode(user_turn, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n"
    # the processor reads these attributes off the tokenizer
    assert hf.audio_token_id == specials["<|audio_pad|>"] and hf.image_token_id == specials["<|image_pad|>"]
    assert hf.video_token_id == specials["<|video_pad|>"] and hf.vision_bos_token == "<|vision_start|>"
    assert hf.audio_bos_token == "<|audio_start|>" and hf.audio_eos_token == "<|audio_end|>"
    assert hf.eos_token == "<|im_end|>"
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id("<|no_such_token|>")


@pytest.mark.parametrize("name", CONFIGS)
def test_english_uses_subwords(name, tokenizer_dirs):
    tok = Tokenizer.from_dir(tokenizer_dirs[name])
    text = "The assistant answers the question while the user listens to the voice."
    ids = tok.encode(text)
    pieces = [tok.id_to_token(i) for i in ids]
    # 364 merges in the 640 vocab, only ~44 in the 160 one (98-symbol alphabet in 145 ids)
    multi_char, ratio = (0.5, 0.4) if name == "preset640" else (0.25, 0.85)
    assert sum(len(p) > 1 for p in pieces) >= multi_char * len(pieces), pieces
    assert len(ids) < ratio * len(text), pieces


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_english(name, tokenizer_dirs, seed):
    rng = np.random.default_rng(seed)
    tok = Tokenizer.from_dir(tokenizer_dirs[name])
    for _ in range(200):
        text = _random_sentence(rng)
        assert tok.decode(tok.encode(text)) == text, f"seed={seed} {text!r}"


def test_round_trip_unicode(tokenizer_dirs, seed):
    rng = np.random.default_rng(seed)
    tok = Tokenizer.from_dir(tokenizer_dirs["preset640"])
    samples = UNICODE_SAMPLES + [_random_unicode(rng) for _ in range(200)] + ["e\u0301 NFC-composes"]
    for text in samples:
        want = unicodedata.normalize("NFC", text)  # the Qwen pipeline starts with an NFC normalizer
        assert tok.decode(tok.encode(text)) == want, f"seed={seed} {text!r}"


def test_restricted_alphabet_drops_like_transformers(tokenizer_dirs, hf_tokenizers):
    # 145 regular ids cannot hold 256 byte tokens: characters outside tab/newline/printable ASCII are dropped,
    # by our loader and by transformers' Qwen2Tokenizer alike.
    tok = Tokenizer.from_dir(tokenizer_dirs["spec160"])
    text = "café 😀 ok"
    assert tok.decode(tok.encode(text)) == "caf  ok"
    assert tok.encode(text) == hf_tokenizers["spec160"](text)["input_ids"]


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_autotokenizer_same_ids(name, tokenizer_dirs, hf_tokenizers, seed):
    rng = np.random.default_rng(seed)
    tok = Tokenizer.from_dir(tokenizer_dirs[name])
    hf = hf_tokenizers[name]
    specials = list(CONFIGS[name][0])
    for _ in range(100):
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            r = rng.random()
            parts.append(str(rng.choice(specials)) if r < 0.3 else
                         _random_unicode(rng) if r < 0.5 else _random_sentence(rng))
        text = "".join(parts)
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], f"seed={seed} {text!r}"
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), f"seed={seed} {text!r}"


@pytest.mark.parametrize("name", CONFIGS)
def test_vocab_merges_fallback(name, tokenizer_dirs, tmp_path, seed):
    # The released checkpoint also ships vocab.json + merges.txt; specials then come from tokenizer_config.json.
    for fname in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dirs[name] / fname, tmp_path / fname)
    full, fallback = Tokenizer.from_dir(tokenizer_dirs[name]), Tokenizer.from_dir(tmp_path)
    assert fallback.vocab_size == full.vocab_size and fallback.special_ids == full.special_ids
    rng = np.random.default_rng(seed)
    specials = list(CONFIGS[name][0])
    for _ in range(50):
        text = str(rng.choice(specials)) + _random_sentence(rng) + _random_unicode(rng) + str(rng.choice(specials))
        assert fallback.encode(text) == full.encode(text), f"seed={seed} {text!r}"


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))  # vocab.json without merges.txt is not enough
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocab.json.*merges.txt"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenizer


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    decoder = StreamingDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streaming_equals_full_decode(name, skip_special_tokens, tokenizer_dirs, seed):
    rng = np.random.default_rng(seed)
    tok = Tokenizer.from_dir(tokenizer_dirs[name])
    cases = [rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 60))).tolist() for _ in range(200)]
    cases += [tok.encode(t) for t in UNICODE_SAMPLES]
    cases += [tok.encode(_random_unicode(rng) + _random_sentence(rng)) for _ in range(50)]
    for ids in cases:
        chunks = _stream(tok, ids, skip_special_tokens)
        want = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(chunks) == want, f"seed={seed} ids={ids}"


def test_streaming_holds_back_partial_characters(tokenizer_dirs):
    tok = Tokenizer.from_dir(tokenizer_dirs["preset640"])
    ids = tok.encode("hi 😀 中")
    chunks = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(chunks) == "hi 😀 中"
    assert all("\ufffd" not in c for c in chunks)
    assert len([c for c in chunks if c == ""]) >= 3  # the 4-byte emoji spans several byte tokens
    # a sequence cut inside a character: nothing is emitted before flush, which matches the full decode
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) > 1
    decoder = StreamingDecoder(tok)
    assert [decoder.push(i) for i in emoji_ids[:-1]] == [""] * (len(emoji_ids) - 1)
    assert decoder.flush() == tok.decode(emoji_ids[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Chat text


def test_build_chat_format():
    messages = [{"role": "user", "content": [
        {"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "What is said?"},
        {"type": "image", "image": "b.png"}, {"type": "video", "video": "c.mp4"}]}]
    assert build_chat(messages) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>What is said?"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n")
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": [{"type": "text", "text": "<think>\nhm\n</think>\n\nHello."}]},
               {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert build_chat(history, system="ignored: messages bring their own") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert build_chat(history[1:2], system=None, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert build_chat(history[1:2], system=None, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_build_chat_matches_jinja_template(hf_tokenizers, seed):
    """Our tokenizer_config chat template (rendered by transformers) and build_chat agree on random chats."""
    rng = np.random.default_rng(seed)
    hf = hf_tokenizers["preset640"]
    assert hf.chat_template == CHAT_TEMPLATE
    for _ in range(50):
        messages = [{"role": "system", "content": _random_sentence(rng)}] if rng.random() < 0.5 else []
        for turn in range(int(rng.integers(1, 4))):
            items = [{"type": str(rng.choice(["text", "audio", "image", "video"]))} for _ in range(4)]
            for item in items:
                if item["type"] == "text":
                    item["text"] = _random_sentence(rng)
            items.append({"type": "text", "text": "?"})
            messages.append({"role": "user", "content": items})
            if rng.random() < 0.5:
                messages.append({"role": "assistant", "content": _random_sentence(rng)})
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert build_chat(messages, system=None, add_generation_prompt=gen) == want, f"seed={seed}"


def test_build_chat_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        build_chat([{"role": "user", "content": [{"type": "text", "text": "  "}]}])
    with pytest.raises(ValueError, match="empty prompt"):
        build_chat([{"role": "system", "content": "only a system prompt"}, {"role": "user", "content": []}])
    with pytest.raises(ValueError, match="role"):
        build_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="type"):
        build_chat([{"role": "user", "content": [{"type": "pdf"}]}])
    with pytest.raises(ValueError, match="media"):
        build_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "audio"}]}])


# ---------------------------------------------------------------------------------------------------------------
# Placeholder expansion


def test_audio_token_count(seed):
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    assert [audio_token_count(n) for n in (0, 1, 8, 9, 99, 100, 101, 250, 1000)] == [0, 1, 1, 2, 13, 13, 14, 33, 130]
    frames = np.random.default_rng(seed).integers(1, 20000, size=500)
    want = _get_feat_extract_output_lengths(torch.from_numpy(frames)).tolist()
    assert [audio_token_count(int(n)) for n in frames] == want, f"seed={seed}"


def test_num_mel_frames_matches_feature_extractor(seed):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(seed)
    extractor = WhisperFeatureExtractor(feature_size=128)
    for _ in range(10):
        lengths = rng.integers(1, 48000, size=int(rng.integers(1, 5))).tolist()
        mask = extractor([np.zeros(n, np.float32) for n in lengths], sampling_rate=16000, padding=True,
                         truncation=False, return_attention_mask=True)["attention_mask"]
        want = mask.sum(-1).tolist()
        assert [num_mel_frames(n, batch_max_samples=max(lengths)) for n in lengths] == want, f"seed={seed} {lengths}"


def test_expand_placeholders_counts_and_errors():
    text = "a<|audio_pad|>b<|image_pad|>c<|video_pad|>d"
    got = expand_placeholders(text, [3], [[1, 2, 4]], [[2, 2, 2]], merge_size=2)
    assert got == "a" + "<|audio_pad|>" * 3 + "b" + "<|image_pad|>" * 2 + "c" + "<|video_pad|>" * 2 + "d"
    with pytest.raises(ValueError, match="1 audio placeholders but 2 audio token counts"):
        expand_placeholders(text, [3, 4], [[1, 2, 4]], [[2, 2, 2]])
    with pytest.raises(ValueError, match="1 image placeholders but 0 image grids"):
        expand_placeholders(text, [3], [], [[2, 2, 2]])
    with pytest.raises(ValueError, match="1 video placeholders but 2 video grids"):
        expand_placeholders(text, [3], [[1, 2, 4]], [[2, 2, 2], [1, 2, 2]])
    with pytest.raises(ValueError, match="1 audio placeholders \\+ 1 videos .* but 1 audio token counts"):
        expand_placeholders(text, [3], [[1, 2, 4]], [[2, 2, 2]], use_audio_in_video=True)
    with pytest.raises(ValueError, match="empty prompt"):
        expand_placeholders("   ")
    with pytest.raises(ValueError, match="divisible"):
        expand_placeholders("<|image_pad|>", [], [[1, 3, 4]])


def test_audio_in_video_layout_matches_spec_example():
    # MODEL_SPEC §4.2: video grid (2, 4, 4) at 2 s per grid (26 ids), 33 audio tokens:
    # video@0 ×4, audio 0…25, video@26 ×4, audio 26…32.
    got = expand_placeholders("<|vision_start|><|video_pad|><|vision_end|>", [33], [], [[2, 4, 4]], [2.0],
                              merge_size=2, position_id_per_seconds=13, use_audio_in_video=True)
    want = ("<|vision_start|><|audio_start|>" + "<|video_pad|>" * 4 + "<|audio_pad|>" * 26 + "<|video_pad|>" * 4
            + "<|audio_pad|>" * 7 + "<|audio_end|><|vision_end|>")
    assert got == want


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' Qwen3OmniMoeProcessor


def _make_processor(hf_tokenizer):
    from transformers import BatchFeature, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import VideoProcessorMixin

    class GridVideoProcessor(VideoProcessorMixin):
        """Stand-in for Qwen2VLVideoProcessor (torchvision-only): clip [2t, 16h, 16w, 3] → grid (t, h, w)."""
        patch_size, temporal_patch_size, merge_size = 16, 2, 2

        def __call__(self, videos, **kwargs):
            grids = [[v.shape[0] // 2, v.shape[1] // 16, v.shape[2] // 16] for v in videos]
            return BatchFeature({"pixel_values_videos": torch.zeros(sum(t * h * w for t, h, w in grids), 1),
                                 "video_grid_thw": torch.tensor(grids)})

    class Processor(Qwen3OmniMoeProcessor):
        # ProcessorMixin resolves the expected base class by name from the top-level transformers module, where
        # VideoProcessorMixin is hidden without torchvision; check it directly instead.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                assert isinstance(argument, VideoProcessorMixin)
                return VideoProcessorMixin
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               size={"shortest_edge": 32 * 32, "longest_edge": 192 * 192})
    return Processor(image_processor=image_processor, video_processor=GridVideoProcessor(),
                     feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=hf_tokenizer,
                     chat_template=hf_tokenizer.chat_template)


def _random_media_chat(rng: np.random.Generator):
    """A random chat mixing text, audio, images and videos; media listed in order of appearance."""
    items, order = [], []
    for _ in range(int(rng.integers(1, 7))):
        kind = str(rng.choice(["text", "audio", "image", "video"]))
        if kind == "text":
            items.append({"type": "text", "text": _random_sentence(rng)})
            continue
        if kind == "audio":
            # shorter than a chunk, exact chunks and several seconds, at sample (not hop) resolution; at least 201
            # samples because WhisperFeatureExtractor's reflect padding (n_fft / 2) fails on shorter batches
            n = int(rng.choice([rng.integers(201, 1600), 16000 * int(rng.integers(1, 3)), rng.integers(1600, 64000)]))
            media = (rng.standard_normal(n) * 0.1).astype(np.float32)
        elif kind == "image":
            media = rng.integers(0, 256, size=(int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3),
                                 dtype=np.uint8)
        else:
            t, h, w = int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))
            media = np.zeros((2 * t, 16 * h, 16 * w, 3), np.uint8)
        items.append({"type": kind, kind: media})
        order.append((kind, media))
    messages = [{"role": "user", "content": items}]
    if rng.random() < 0.5:
        messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}] + messages
    return messages, order


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_tokenize_prompt_matches_processor(use_audio_in_video, tokenizer_dirs, hf_tokenizers, seed):
    rng = np.random.default_rng(seed + use_audio_in_video)
    tok = Tokenizer.from_dir(tokenizer_dirs["preset640"])
    processor = _make_processor(hf_tokenizers["preset640"])
    for trial in range(6):
        messages, order = _random_media_chat(rng)
        if not any(kind == "video" for kind, _ in order) and use_audio_in_video:
            clip = np.zeros((4, 64, 32, 3), np.uint8)
            messages[-1]["content"].append({"type": "video", "video": clip})
            order.append(("video", clip))
        text = build_chat(messages)
        audios = [m for kind, m in order if kind == "audio"]
        images = [m for kind, m in order if kind == "image"] or None
        videos = [m for kind, m in order if kind == "video"] or None
        kwargs = {}
        if use_audio_in_video:
            # every video carries an audio track; audio slots in order of appearance, as transformers builds them
            audios, indices, n_video = [], [], 0
            for kind, media in order:
                if kind == "audio":
                    audios.append(media)
                    indices.append(None)
                elif kind == "video":
                    n = int(rng.integers(201, 80000))
                    audios.append((rng.standard_normal(n) * 0.1).astype(np.float32))
                    indices.append(n_video)
                    n_video += 1
            fps = float(rng.choice([0.5, 1.0, 2.0, 1.5, 24.0 / 7]))
            kwargs = dict(load_audio_from_video=True, audio_from_video_indices=indices, videos_kwargs={"fps": fps})
        out = processor(text=text, audio=audios or None, images=images, videos=videos, return_tensors="pt",
                        **kwargs)

        longest = max((len(a) for a in audios), default=0)
        counts = [audio_token_count(num_mel_frames(len(a), batch_max_samples=longest)) for a in audios]
        # The processor lays out audio-in-video with the float64 `temporal_patch_size / fps`; the float32 tensor it
        # returns as `video_second_per_grid` can flip a tie (fps 1.5: 3 · 1.3333334 · 13 > 52).
        second_per_grid = [2 / kwargs["videos_kwargs"]["fps"]] * len(videos) if use_audio_in_video else None
        media = dict(audio_token_counts=counts, image_grid_thw=out.get("image_grid_thw"),
                     video_grid_thw=out.get("video_grid_thw"), video_second_per_grid=second_per_grid,
                     merge_size=2, position_id_per_seconds=13, use_audio_in_video=use_audio_in_video)
        ids = tokenize_prompt(tok, messages, **media)
        context = f"seed={seed} trial={trial} kinds={[k for k, _ in order]} counts={counts}"
        assert ids.dtype == torch.long and ids.shape[0] == 1, context
        assert torch.equal(ids, out["input_ids"].long()), context
        # the string route gives the same ids
        assert tok.encode(expand_placeholders(text, **media)) == ids[0].tolist(), context
