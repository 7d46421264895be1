"""OmniEngine on the tiny checkpoint: raw inputs through every front end, and clear errors on bad input."""

import numpy as np
import pytest
import torch

from runtime.engine import OmniEngine
from runtime.tiny import ensure_tiny_checkpoint, write_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return OmniEngine.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def _tone(rate, seconds, hz=440.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.randn(t.size)).astype(np.float32)


def test_tiny_checkpoint_is_reused_and_rewritten_when_stale(tmp_path):
    path = ensure_tiny_checkpoint(tmp_path / "tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp, "a complete tiny checkpoint is reused"
    (path / "config.json").write_text("{}")
    ensure_tiny_checkpoint(path)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp, "a damaged one is rewritten"


def test_raw_inputs_equal_processor_tensors(engine):
    """Text + audio at 44.1 kHz (resampled) + an image: generate from raw inputs equals generate from the
    tensors prepare() produced, and the placeholders match the encoders' outputs."""
    pytest.importorskip("soxr")
    image = (np.random.rand(70, 90, 3) * 255).astype(np.uint8)
    audio = _tone(44100, float(np.random.uniform(0.3, 2.0)))
    prompt = engine.prepare("What is this?", audio, 44100, [image])
    cfg = engine.config.thinker
    features = prompt.inputs.input_features
    assert features.shape[1] == 128 and prompt.inputs.feature_attention_mask.sum() == round(audio.size * 16000 / 44100) // 160
    merge = cfg.vision.spatial_merge_size
    assert int((prompt.input_ids == cfg.image_token_id).sum()) == int(prompt.inputs.image_grid_thw.prod()) // merge ** 2
    raw = engine.generate("What is this?", audio, 44100, [image], max_new_tokens=5, return_audio=False)
    direct = engine.generate(input_ids=prompt.input_ids, **{k: v for k, v in vars(prompt.inputs).items()
                                                            if v is not None and k != "use_audio_in_video"},
                             max_new_tokens=5, return_audio=False)
    assert torch.equal(raw.sequences, direct.sequences)
    assert raw.sequences.shape[1] > prompt.input_ids.shape[1]


def test_audio_file_paths(engine, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    path = tmp_path / "clip.flac"
    soundfile.write(path, _tone(22050, 0.8), 22050)
    result = engine.generate("hi", audio=str(path), max_new_tokens=2, return_audio=False)
    assert result.sequences.shape[0] == 1


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(text=""), ValueError, "empty prompt"),
    (dict(text="hi", audio=np.zeros(0, np.float32), sample_rate=16000), ValueError, "empty"),
    (dict(text="hi", audio=np.ones(1000, np.float32)), ValueError, "sample_rate"),
    (dict(text="hi", audio="/nonexistent/clip.wav"), FileNotFoundError, "clip.wav"),
    (dict(text="hi", images=["/nonexistent/picture.png"]), FileNotFoundError, "picture.png"),
    (dict(text="hi", max_new_tokens=10**6, return_audio=False), ValueError, "max_position_embeddings"),
])
def test_bad_input_is_a_clear_error(engine, kwargs, error, message):
    with pytest.raises(error, match=message):
        engine.generate(**kwargs)


def test_corrupt_audio_file(engine, tmp_path):
    pytest.importorskip("soundfile")
    path = tmp_path / "broken.wav"
    path.write_bytes(np.random.bytes(4096))
    with pytest.raises(ValueError, match="broken.wav"):
        engine.generate("hi", audio=str(path), return_audio=False)


def test_prompt_longer_than_context_fails_before_any_work(engine, monkeypatch):
    limit = engine.config.thinker.text.max_position_embeddings
    ids = torch.randint(0, 500, (1, limit + 1))
    calls = []
    monkeypatch.setattr(engine.model.thinker, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=str(limit)):
        engine.generate(input_ids=ids, max_new_tokens=1, return_audio=False)
    assert not calls


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="unsupported dtype"):
        OmniEngine.from_pretrained("tiny", dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            OmniEngine.from_pretrained("tiny", device="cuda")
