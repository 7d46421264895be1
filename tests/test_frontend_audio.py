"""Audio front end (MODEL_SPEC §5): log-mel features against transformers' WhisperFeatureExtractor called as
Qwen3OmniMoeProcessor calls it, file decoding/resampling, and the AuT token count."""

import math

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from runtime.frontend.audio import (
    audio_token_count,
    extract_audio_features,
    load_audio,
    log_mel_spectrogram,
    resample,
)
from tests.oracle import rel_err

TOL = 1e-4


@pytest.fixture
def seed():
    seed = int(torch.randint(0, 2**31, ()).item())
    print(f"seed={seed}")
    return seed


@pytest.fixture(scope="module")
def extractor():
    # The released checkpoint's preprocessor_config: 128 mel bins, 16 kHz, hop 160, n_fft 400.
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                   padding_value=0.0, return_attention_mask=True)


def reference(extractor, waveforms):
    """What Qwen3OmniMoeProcessor._process_audio gets from its feature extractor."""
    out = extractor([w.numpy() for w in waveforms], return_tensors="pt", **Qwen3OmniMoeProcessor.audio_kwargs)
    return out["input_features"], out["attention_mask"]


def random_speech(num_samples, generator):
    """Noise plus a random tone and a loud burst, so the per-audio peak and the 80 dB floor both matter."""
    t = torch.arange(num_samples) / 16000
    freq = 100 + 3000 * torch.rand((), generator=generator)
    wave = 0.05 * torch.randn(num_samples, generator=generator) + 0.3 * torch.sin(2 * math.pi * freq * t)
    start = int(torch.randint(0, num_samples // 2, (), generator=generator))
    wave[start:start + num_samples // 4] *= 3.0
    return wave


def random_lengths(generator, count):
    """Lengths that are not multiples of 160: some under one second, some of a few seconds."""
    lengths = []
    for i in range(count):
        lo, hi = (400, 16000) if i % 2 == 0 else (16000, 64000)
        n = int(torch.randint(lo, hi, (), generator=generator))
        lengths.append(n + 1 if n % 160 == 0 else n)
    return lengths


def test_single_audio_matches_whisper_extractor(extractor, seed):
    generator = torch.Generator().manual_seed(seed)
    for num_samples in random_lengths(generator, 4) + [201, 16000 * 3 + 7]:
        wave = random_speech(num_samples, generator)
        ref, ref_mask = reference(extractor, [wave])
        ours = log_mel_spectrogram(wave)
        err = rel_err(ours, ref[0])
        print(f"samples={num_samples} frames={ours.shape[-1]} rel_err={err:.2e} "
              f"max_abs={(ours - ref[0]).abs().max().item():.2e}")
        assert ours.shape == (128, num_samples // 160) and ours.dtype == torch.float32
        assert err <= TOL
        assert int(ref_mask.sum()) == num_samples // 160  # one audio: frames = floor(samples / 160)


def test_batch_matches_processor(extractor, seed):
    generator = torch.Generator().manual_seed(seed)
    waves = [random_speech(n, generator) for n in random_lengths(generator, 5)]
    ref, ref_mask = reference(extractor, waves)
    features, mask = extract_audio_features(waves)
    err = rel_err(features, ref)
    print(f"lengths={[w.numel() for w in waves]} rel_err={err:.2e} "
          f"max_abs={(features - ref).abs().max().item():.2e}")
    assert features.shape == ref.shape and features.dtype == torch.float32
    assert err <= TOL
    assert mask.dtype == torch.long
    assert torch.equal(mask, ref_mask.long())
    # Every row, padded frames included, matches: the encoder slices valid frames with this mask.
    for row in range(len(waves)):
        assert rel_err(features[row], ref[row]) <= TOL


def test_batched_row_differs_from_single_only_at_its_tail(seed):
    """Padding happens before the STFT (as in transformers), so a short item's last frames see zeros."""
    generator = torch.Generator().manual_seed(seed)
    short, long = random_speech(8001, generator), random_speech(40003, generator)
    features, mask = extract_audio_features([short, long])
    alone = log_mel_spectrogram(short)
    assert int(mask[0].sum()) == math.ceil(8001 / 160) and int(mask[1].sum()) == 40003 // 160
    assert rel_err(features[0, :, :45], alone[:, :45]) <= TOL  # frames whose window ends before sample 8001


def test_feature_errors():
    with pytest.raises(ValueError, match="resample"):
        log_mel_spectrogram(torch.randn(44100), sampling_rate=44100)
    with pytest.raises(ValueError, match="resample"):
        extract_audio_features([torch.randn(4410)], sampling_rate=44100)
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(torch.randn(200))
    with pytest.raises(ValueError, match="mono"):
        extract_audio_features([torch.randn(2, 16000)])


# ----------------------------------------------------------------------------------------------------------
# Files and resampling
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def soundfile():
    """File decoding needs soundfile (not on the GPU image): these tests skip without it, the rest still run."""
    return pytest.importorskip("soundfile")


@pytest.fixture
def soxr():
    return pytest.importorskip("soxr")


def soxr_length(num_samples, orig_rate, target_rate):
    """soxr's one-shot output length: num_samples * target / orig rounded, halves up."""
    return math.floor(num_samples * target_rate / orig_rate + 0.5)


@pytest.mark.parametrize("rate,channels,fmt", [(16000, 1, "WAV"), (44100, 2, "WAV"), (44100, 2, "FLAC"),
                                               (48000, 1, "FLAC"), (22050, 2, "OGG")])
def test_load_audio_rate_and_downmix(tmp_path, seed, soundfile, soxr, rate, channels, fmt):
    generator = np.random.default_rng(seed)
    num_samples = int(generator.integers(rate // 3, 2 * rate))
    data = (0.3 * generator.standard_normal((num_samples, channels))).clip(-1, 1).astype(np.float32)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, data, rate, format=fmt)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert wave.numel() == soxr_length(num_samples, rate, 16000)
    if rate == 16000 and fmt != "OGG":
        decoded, _ = soundfile.read(path, dtype="float32", always_2d=True)
        assert torch.equal(wave, torch.from_numpy(decoded.mean(axis=1)))


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 8000])
def test_resample_keeps_tone_frequency(seed, soxr, rate):
    generator = np.random.default_rng(seed)
    freq = float(generator.uniform(200, 3800))  # below both Nyquist limits
    duration = 1.5
    t = np.arange(int(duration * rate)) / rate
    tone = np.stack([np.sin(2 * np.pi * freq * t), 0.5 * np.sin(2 * np.pi * freq * t + 1.0)], axis=1)
    wave = resample(tone.mean(axis=1).astype(np.float32), rate)
    assert wave.numel() == soxr_length(len(t), rate, 16000)
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(wave.numel())))
    peak_hz = np.argmax(spectrum) * 16000 / wave.numel()
    bin_hz = 16000 / wave.numel()
    print(f"rate={rate} tone={freq:.1f} Hz peak={peak_hz:.1f} Hz")
    assert abs(peak_hz - freq) <= bin_hz


def test_resample_identity_and_tensor_input(seed, soxr):
    wave = torch.randn(12345, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(resample(wave, 16000), wave)
    assert resample(wave, 32000).numel() == soxr_length(12345, 32000, 16000) == 6173  # a tie rounds up
    assert resample(wave[:101, None].repeat(1, 2), 8000, 12000).shape == (152, 2)  # 151.5, channels kept
    with pytest.raises(ValueError):
        resample(wave, 0)


def test_load_audio_errors(tmp_path, seed, soundfile):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(missing)

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(seed).integers(1, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt.wav") as info:
        load_audio(corrupt)
    assert "decode" in str(info.value)

    zero_bytes = tmp_path / "zero_bytes.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(ValueError, match="zero_bytes.wav"):
        load_audio(zero_bytes)

    no_samples = tmp_path / "no_samples.wav"
    soundfile.write(no_samples, np.zeros((0, 2), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"no_samples.wav.*empty"):
        load_audio(no_samples)


# ----------------------------------------------------------------------------------------------------------
# Token count
# ----------------------------------------------------------------------------------------------------------

def test_audio_token_count_matches_transformers():
    named = [1, 7, 8, 9, 99, 100, 101, 199, 200, 201, 250, 1000, 2050, 3001]
    frames = torch.tensor(named + list(range(0, 5000, 7)))
    # The released n_window: equal to transformers' formula.
    assert torch.equal(audio_token_count(frames, n_window=50), _get_feat_extract_output_lengths(frames, 50))
    # Other windows: transformers hard-codes 13 tokens per full chunk, which its own convs do not produce;
    # ours counts what the convs give, ceil(chunk / 8) per full chunk.
    for n_window in (25, 64):
        chunk = 2 * n_window
        expected = math.ceil(chunk / 8) * (frames // chunk) + torch.ceil((frames % chunk) / 8).long()
        assert torch.equal(audio_token_count(frames, n_window=n_window), expected)
    for t in named:  # plain ints give ints; the closed form from MODEL_SPEC §5
        assert audio_token_count(t) == 13 * (t // 100) + math.ceil((t % 100) / 8)
    assert [audio_token_count(t) for t in (100, 101, 250, 1000)] == [13, 14, 33, 130]


def test_token_count_of_extracted_features(extractor, seed):
    generator = torch.Generator().manual_seed(seed)
    waves = [random_speech(n, generator) for n in random_lengths(generator, 3)]
    _, mask = extract_audio_features(waves)
    _, ref_mask = reference(extractor, waves)
    assert torch.equal(audio_token_count(mask.sum(-1)), _get_feat_extract_output_lengths(ref_mask.sum(-1)))
