"""Conversations (`messages=`): rendered with the checkpoint's chat template and equal, token for token and
tensor for tensor, to transformers' `processor.apply_chat_template(..., tokenize=True)` on the tiny checkpoint;
the built-in template when a checkpoint has none; generate / stream / the CLI take them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.engine import OmniEngine
from runtime.frontend.conversation import conversation, load_chat_template
from runtime.frontend.prompt import CHAT_TEMPLATE, build_chat
from runtime.frontend.vision import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS

soundfile = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from runtime.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    return OmniEngine.from_pretrained(checkpoint)


@pytest.fixture
def rng():
    seed = int(torch.randint(0, 2**31, ()).item())
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def _media(rng, tmp_path):
    """Two 16 kHz clips (a file and an array), an image file and a PIL image of other sizes."""
    clip = (0.1 * rng.standard_normal(int(rng.integers(8000, 40000)))).astype(np.float32)
    clip_path = tmp_path / "question.wav"
    soundfile.write(clip_path, clip, 16000, subtype="FLOAT")
    array_clip = (0.1 * rng.standard_normal(int(rng.integers(3000, 20000)))).astype(np.float32)
    picture = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 256, (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3),
                                 dtype=np.uint8)).save(picture)
    pil = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return clip_path, array_clip, picture, pil


def _messages(clip_path, array_clip, picture, pil):
    return [
        {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
        {"role": "user", "content": [{"type": "audio", "audio": str(clip_path)},
                                     {"type": "text", "text": "What is said here?"},
                                     {"type": "image", "image": str(picture)}]},
        {"role": "assistant", "content": "A question about a picture."},
        {"role": "user", "content": [{"type": "image", "image": pil},
                                     {"type": "text", "text": "And this one, with that sound?"},
                                     {"type": "audio", "audio": array_clip, "sample_rate": 16000}]},
    ]


def test_multi_turn_with_audio_and_images_equals_transformers(engine, checkpoint, tmp_path, rng):
    from transformers import AutoTokenizer

    from tests.test_frontend_text import _make_processor

    clip_path, array_clip, picture, pil = _media(rng, tmp_path)
    messages = _messages(clip_path, array_clip, picture, pil)
    processor = _make_processor(AutoTokenizer.from_pretrained(str(checkpoint)))
    # the engine resizes images within the released processor's pixel limits; the shared test processor is set up
    # for other tests' small limits, and a small image would round to another grid under them
    processor.image_processor.size = {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}
    assert processor.chat_template == load_chat_template(checkpoint) == CHAT_TEMPLATE
    want_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert conversation(messages, engine.tokenizer.chat_template).text == want_text
    want = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                         return_tensors="pt")
    prompt = engine.prepare(messages=messages)
    assert torch.equal(prompt.input_ids, want["input_ids"].long())
    inputs = prompt.inputs
    assert torch.equal(inputs.feature_attention_mask, want["feature_attention_mask"].long())
    valid = want["feature_attention_mask"].bool()
    # log-mel in float32 on both sides: same formulas, different op order
    got_features = inputs.input_features.permute(0, 2, 1)[valid]
    want_features = want["input_features"].permute(0, 2, 1)[valid]
    err = ((got_features - want_features).norm() / want_features.norm()).item()
    assert err < 1e-5, f"input_features relative error {err:.2e}"
    assert torch.equal(inputs.image_grid_thw, want["image_grid_thw"])
    err = ((inputs.pixel_values - want["pixel_values"]).norm() / want["pixel_values"].norm()).item()
    assert err < 1e-6, f"pixel_values relative error {err:.2e}"


def test_conversation_through_generate_and_stream(engine, tmp_path, rng):
    clip_path, array_clip, picture, pil = _media(rng, tmp_path)
    messages = _messages(clip_path, array_clip, picture, pil)
    prompt = engine.prepare(messages=messages)
    direct = engine.generate(input_ids=prompt.input_ids, **{k: v for k, v in vars(prompt.inputs).items()
                                                            if v is not None and k != "use_audio_in_video"},
                             max_new_tokens=4, return_audio=False)
    via_messages = engine.generate(messages=messages, max_new_tokens=4, return_audio=False)
    assert torch.equal(via_messages.sequences, direct.sequences)
    events = list(engine.stream(messages=messages, max_new_tokens=4, return_audio=False))
    streamed = "".join(e.text for e in events if hasattr(e, "text"))
    assert streamed == via_messages.text[0]


def test_system_prompt_is_added_only_when_missing(engine):
    turns = [{"role": "user", "content": "hi"}]
    with_default = engine.tokenizer.decode(engine.prepare(messages=turns).input_ids[0].tolist(), False)
    assert with_default.startswith("<|im_start|>system\nYou are Qwen")
    bare = engine.tokenizer.decode(engine.prepare(messages=turns, system=None).input_ids[0].tolist(), False)
    assert bare == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    own = [{"role": "system", "content": "Be brief."}] + turns
    assert engine.tokenizer.decode(engine.prepare(messages=own).input_ids[0].tolist(), False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")


def test_checkpoint_template_wins_and_builtin_without_one(checkpoint, tmp_path):
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(checkpoint, custom)
    (custom / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
        "{% if p.type == 'text' %}{{ p.text }}{% elif p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{{ 'custom: ' }}{% endif %}")
    engine = OmniEngine.from_pretrained(custom)
    ids = engine.prepare(messages=[{"role": "user", "content": "hi"}], system=None).input_ids
    assert engine.tokenizer.decode(ids[0].tolist(), False).endswith("<|im_start|>assistant\ncustom: ")

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    engine = OmniEngine.from_pretrained(bare)
    assert engine.tokenizer.chat_template is None
    turns = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    ids = engine.prepare(messages=turns).input_ids
    assert engine.tokenizer.decode(ids[0].tolist(), False) == build_chat(turns)


def test_cli_messages_file(checkpoint, tmp_path, rng, capsys):
    from runtime.__main__ import main

    clip = (0.1 * rng.standard_normal(12000)).astype(np.float32)
    soundfile.write(tmp_path / "q.wav", clip, 16000)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "q.wav"}, {"type": "image", "image": "p.png"},
                                         {"type": "text", "text": "What is this?"}]}]
    (tmp_path / "conversation.json").write_text(json.dumps(conv))
    out = tmp_path / "answer.flac"
    assert main(["generate", "--checkpoint", str(checkpoint), "--messages", str(tmp_path / "conversation.json"),
                 "--out", str(out), "--max-new-tokens", "3", "--talker-max-new-tokens", "5"]) == 0
    assert "text:" in capsys.readouterr().out
    assert soundfile.info(out).format == "FLAC"


def test_template_features_render_as_transformers_renders_them(checkpoint):
    """A template using what Hub templates use (namespace, loop controls, loop.last, tojson with non-ASCII,
    raise_exception, whitespace control, trim_blocks/lstrip_blocks) renders as transformers renders it."""
    from transformers import AutoTokenizer

    from runtime.frontend.conversation import render

    template = (
        "{%- set ns = namespace(users=0) %}\n"
        "{%- for m in messages %}\n"
        "    {%- if m.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}\n"
        "<|im_start|>{{ m.role }}\n"
        "    {%- if m.content is string %}\n{{ m.content }}\n"
        "    {%- else %}\n"
        "        {%- for p in m.content %}\n"
        "            {%- if p.type == 'text' %}{{ p.text }}{% elif 'image' in p %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% elif p.type == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>{% endif %}\n"
        "            {%- if p.type == 'stop' %}{% break %}{% endif %}\n"
        "        {%- endfor %}\n"
        "    {%- endif %}\n"
        "<|im_end|>{{ '\\n' if not loop.last else '' }}\n"
        "{%- endfor %}\n"
        "{%- if ns.users == 0 %}{{ raise_exception('no user turn') }}{% endif %}\n"
        "{{- '\\n<|im_start|>assistant\\n' if add_generation_prompt }}"
        "{{- {'meta': 'café ☕'} | tojson if messages | length > 2 }}")
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    messages = [{"role": "system", "content": "Rules: be brief."},
                {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi?"},
                                             {"type": "audio", "audio": "q.wav"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Ünïcödé and more"}]
    for turns in (messages, messages[1:2]):
        for gen in (True, False):
            want = hf.apply_chat_template(turns, chat_template=template, tokenize=False, add_generation_prompt=gen)
            assert render(turns, template, add_generation_prompt=gen) == want
    with pytest.raises(ValueError, match="chat_template failed.*no user turn"):
        render([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], template)
