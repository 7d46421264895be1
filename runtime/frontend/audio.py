"""Audio front end: file -> 16 kHz mono waveform -> Whisper-style log-mel features (MODEL_SPEC §5).

    load_audio(path)           soundfile decode, channel mean, soxr resample          -> [num_samples] f32
    check_waveform(wav, what)  finite samples, a sane sample rate: bad input fails before any model work
    write_audio(path, wav)     wav / flac / mp3 / opus (ogg) / raw pcm16 through libsndfile
    log_mel_spectrogram(wav)   |STFT|² (n_fft 400, hop 160, periodic Hann) -> slaney mel (128)
                               -> log10(max(·, 1e-10)) -> max(·, peak − 8) -> (· + 4) / 4   -> [128, frames]
    extract_audio_features     zero-pad a batch to the longest, as the Qwen3-Omni processor does
                               -> input_features [B, 128, T_max], feature_attention_mask [B, T_max]
    audio_token_count(T)       AuT output length for T mel frames (one <|audio_pad|> per token)

The numerics are those of transformers' `WhisperFeatureExtractor(feature_size=128)` called the way
`Qwen3OmniMoeProcessor` calls it (padding to the longest, no truncation, attention mask returned); the mel
filterbank is built here, in float64, from the slaney formulas.
"""

from __future__ import annotations

import functools
import importlib
import math
import os

import numpy as np
import torch

SAMPLE_RATE = 16000  # the only rate the AuT features are defined for
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: frames = floor(num_samples / 160)
NUM_MEL_BINS = 128
MEL_MAX_HZ = 8000.0  # Nyquist of 16 kHz; transformers fixes the filterbank's top at 8 kHz
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below each audio's peak (80 dB)
# Input sample rates accepted: telephone-band 1 kHz .. 384 kHz (the highest rate audio interfaces record).
# Outside it the number is a mistake (sample_rate=1 would resample a clip to hundreds of millions of samples).
MIN_INPUT_RATE, MAX_INPUT_RATE = 1000, 384000


# ----------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ----------------------------------------------------------------------------------------------------------

def _require(module: str, pin: str, needed_for: str):
    """Import `module` on first use. Only file decoding and resampling need soundfile / soxr, and the GPU image
    has neither (nor cffi, which soundfile loads): everything else must import and run without them."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: soundfile is installed but libsndfile is not
        raise ModuleNotFoundError(f"{module} is not installed: pip install {pin} (needed to {needed_for})",
                                  name=module) from exc


def require_soundfile():
    """The soundfile module, or ModuleNotFoundError saying how to install it."""
    return _require("soundfile", "soundfile==0.14.0", "decode audio files")


def require_soxr():
    """The soxr module, or ModuleNotFoundError saying how to install it."""
    return _require("soxr", "soxr==1.1.0", "resample audio that is not at 16 kHz")


def resample(waveform: torch.Tensor | np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """waveform: [num_samples] (or [num_samples, channels]) float, any device -> float32 CPU tensor of the same
    rank with floor(num_samples * target_rate / orig_rate + 0.5) samples (soxr rounds halves up).

    Band-limited resampling with soxr at its "HQ" setting. Returns the input (as float32) when the rates match
    (soxr is needed only when they differ).
    """
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got orig_rate={orig_rate}, target_rate={target_rate}")
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be [num_samples] or [num_samples, channels], got shape {waveform.shape}")
    if orig_rate != target_rate and waveform.shape[0] > 0:
        waveform = require_soxr().resample(waveform, orig_rate, target_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(waveform))


def check_sample_rate(sample_rate, what: str = "audio") -> int:
    """-> sample_rate as an int; ValueError naming `what` for a non-integer rate or one outside 1 kHz .. 384 kHz
    (checked before resampling, whose cost grows with the ratio)."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        if not (isinstance(sample_rate, float) and sample_rate.is_integer()):
            raise ValueError(f"{what}: sample_rate must be an integer number of Hz, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise ValueError(f"{what}: sample_rate {rate} Hz is outside {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz")
    return rate


def check_finite(waveform: np.ndarray | torch.Tensor, what: str) -> None:
    """ValueError naming `what` and the first bad sample when the waveform holds NaN or inf: such a sample
    turns every log-mel value of its clip into NaN, and the model then answers garbage without any error."""
    values = torch.as_tensor(waveform)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        kind = "NaN" if bool(torch.isnan(values.flatten()[first])) else "inf"
        raise ValueError(f"{what}: {int(bad.sum())} non-finite samples ({kind} first at sample {first}); audio "
                         "must be finite")


def load_audio(path: str | os.PathLike, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """-> [num_samples] float32 mono waveform at `target_rate`, values in [-1, 1] for PCM files.

    Decodes wav/flac/ogg (anything libsndfile reads) with soundfile, averages the channels, and resamples with
    soxr when the file's rate differs from `target_rate`.
    Raises FileNotFoundError for a missing file, ModuleNotFoundError naming soundfile when it is not installed,
    ValueError naming the path for an undecodable file (with the decoder's message), for a file holding no
    samples or for one holding NaN / inf samples.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    soundfile = require_soundfile()
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)  # [num_samples, channels]
    except (RuntimeError, soundfile.SoundFileError) as exc:  # LibsndfileError derives from both
        raise ValueError(f"could not decode audio file {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty (0 samples)")
    check_finite(data, f"audio file {path}")  # float WAV/FLAC can store NaN and inf
    mono = data.mean(axis=1, dtype=np.float32)  # downmix first: resampling is linear, so the order is free
    return resample(mono, rate, target_rate)


# ----------------------------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------------------------

def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    # Slaney (Auditory Toolbox) scale: linear 200/3 Hz per mel below 1 kHz, logarithmic above it.
    linear = hz * 3.0 / 200.0
    log = 15.0 + torch.log(hz.clamp_min(1000.0) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(hz >= 1000.0, log, linear)


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * 200.0 / 3.0
    log = 1000.0 * torch.exp((mel.clamp_min(15.0) - 15.0) * (math.log(6.4) / 27.0))
    return torch.where(mel >= 15.0, log, linear)


@functools.lru_cache(maxsize=8)
def mel_filterbank(num_mel_bins: int = NUM_MEL_BINS, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE,
                   max_hz: float = MEL_MAX_HZ) -> torch.Tensor:
    """-> [num_mel_bins, n_fft // 2 + 1] float32: slaney-scale triangles over 0..max_hz with slaney area
    normalisation (each filter scaled by 2 / its bandwidth in Hz), built in float64.
    """
    num_bins = n_fft // 2 + 1
    bin_hz = torch.linspace(0.0, sampling_rate // 2, num_bins, dtype=torch.float64)  # [F]
    mel_edges = torch.linspace(0.0, float(_hz_to_mel_slaney(torch.tensor(max_hz, dtype=torch.float64))),
                               num_mel_bins + 2, dtype=torch.float64)
    edge_hz = _mel_to_hz_slaney(mel_edges)  # [M + 2]: filter m spans edge_hz[m] .. edge_hz[m + 2]
    lower, center, upper = edge_hz[:-2, None], edge_hz[1:-1, None], edge_hz[2:, None]  # [M, 1]
    rising = (bin_hz - lower) / (center - lower)  # [M, F]
    falling = (upper - bin_hz) / (upper - center)
    triangles = torch.minimum(rising, falling).clamp_min(0.0)
    triangles = triangles * (2.0 / (upper - lower))
    return triangles.to(torch.float32)


@functools.lru_cache(maxsize=8)
def _hann_window(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32)


def _check_rate(sampling_rate: int) -> None:
    if sampling_rate != SAMPLE_RATE:
        raise ValueError(
            f"log-mel features need {SAMPLE_RATE} Hz audio, got sampling_rate={sampling_rate}; resample first "
            f"(runtime.frontend.audio.resample(waveform, {sampling_rate}) or load_audio(path))")


def log_mel_spectrogram(waveform: torch.Tensor, num_mel_bins: int = NUM_MEL_BINS,
                        sampling_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                        hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """waveform: [num_samples] or [B, num_samples] float, 16 kHz mono, on any device
    -> [num_mel_bins, num_samples // hop_length] (or [B, num_mel_bins, ...]) float32 on the same device.

    Whisper log-mel: centered STFT (reflect padding, periodic Hann, n_fft 400, hop 160), power spectrum with
    the last frame dropped, slaney mel filterbank, log10 with a 1e-10 floor, values clamped to at most 8 below
    each row's peak (peak over all of that row's frames, padded ones included), then (x + 4) / 4.
    A [B, num_samples] input is treated as already padded: every row keeps all num_samples // hop frames.
    """
    _check_rate(sampling_rate)
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be [num_samples] or [B, num_samples], got shape {tuple(waveform.shape)}")
    num_samples = waveform.shape[-1]
    if num_samples <= n_fft // 2:  # reflect padding of n_fft / 2 needs more samples than that
        raise ValueError(f"audio too short: {num_samples} samples, need more than {n_fft // 2} "
                         f"({(n_fft // 2 + 1) / sampling_rate * 1000:.1f} ms)")
    waveform = waveform.to(torch.float32)
    window = _hann_window(n_fft).to(waveform.device)
    spec = torch.stft(waveform, n_fft, hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # [(B,) F, num_samples // hop + 1]
    power = spec[..., :-1].abs() ** 2  # the last centered frame is dropped: frames = floor(samples / hop)
    filters = mel_filterbank(num_mel_bins, n_fft, sampling_rate).to(waveform.device)
    log_spec = torch.clamp(filters @ power, min=LOG_FLOOR).log10()  # [(B,) M, frames]
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0


def extract_audio_features(waveforms: list[torch.Tensor], sampling_rate: int = SAMPLE_RATE
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """waveforms: B tensors [num_samples_i] float, 16 kHz mono, same device
    -> input_features [B, 128, T_max] float32, feature_attention_mask [B, T_max] int64 (1 = real frame),
    T_max = max_i(num_samples_i) // 160.

    What `Qwen3OmniMoeProcessor` returns for audio: every waveform is zero-padded to the longest *in samples*
    before the STFT (so the tail frames of shorter items see zeros, not their reflection), no truncation.
    The mask marks ceil(num_samples_i / 160) frames of a shorter item (the frame straddling its end counts)
    and floor(num_samples / 160) for the longest; sum it per row to get the frame counts the encoder uses.
    """
    _check_rate(sampling_rate)
    if len(waveforms) == 0:
        raise ValueError("extract_audio_features needs at least one waveform")
    waveforms = [torch.as_tensor(w) for w in waveforms]
    for i, w in enumerate(waveforms):
        if w.ndim != 1:
            raise ValueError(f"waveform {i} must be mono [num_samples], got shape {tuple(w.shape)}")
    lengths = torch.tensor([w.shape[0] for w in waveforms], dtype=torch.long)
    max_len = int(lengths.max())
    device = waveforms[0].device
    batch = torch.zeros(len(waveforms), max_len, dtype=torch.float32, device=device)  # [B, L_max]
    for i, w in enumerate(waveforms):
        batch[i, : w.shape[0]] = w.to(device, torch.float32)
    features = log_mel_spectrogram(batch, sampling_rate=sampling_rate)  # [B, 128, L_max // 160]
    num_frames = features.shape[-1]
    # transformers subsamples the per-sample mask at every hop: frame j is real iff sample j*hop is.
    frame_start = torch.arange(num_frames, dtype=torch.long) * HOP_LENGTH
    mask = (frame_start[None, :] < lengths[:, None]).to(torch.long).to(device)
    return features, mask


def audio_token_count(num_mel_frames, n_window: int = 50):
    """num_mel_frames: int or int64 tensor of mel frame counts -> same type: AuT output tokens per audio.

    The one place this count is computed (prompt expansion, TM-RoPE ids and the encoder all use it).
    Each 2·n_window-frame chunk goes through three stride-2 convs (k 3, pad 1), so a chunk of r frames gives
    ceil(r / 8) tokens: tokens(T) = ceil(2n / 8)·floor(T / 2n) + ceil((T mod 2n) / 8), e.g. 100 -> 13, 101 -> 14,
    250 -> 33 for the released n_window = 50. transformers' `_get_feat_extract_output_lengths` hard-codes 13 per
    full chunk, which is the same number for n_window = 50.
    """
    chunk = 2 * n_window
    return conv_out_len(chunk) * (num_mel_frames // chunk) + conv_out_len(num_mel_frames % chunk)


def conv_out_len(frames):
    """AuT's three stride-2, kernel-3, padding-1 convs: frames -> ceil(frames / 8) (0 stays 0), ints or int tensors."""
    return (((frames + 1) // 2 + 1) // 2 + 1) // 2


# ----------------------------------------------------------------------------------------------------------
# Writing speech
# ----------------------------------------------------------------------------------------------------------

# format -> (libsndfile container, subtype). libsndfile 1.2 (in the pinned soundfile wheel) encodes MP3 (LAME)
# and Opus in an Ogg container itself, so no ffmpeg is needed. Opus runs at 8/12/16/24/48 kHz: 24 kHz speech fits.
OUTPUT_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
    "pcm16": ("RAW", "PCM_16"),  # headerless little-endian 16-bit samples
}
_SUFFIX_FORMATS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".pcm": "pcm16",
                   ".raw": "pcm16"}


def output_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The output format for `path`: `format` when given, else from the file's suffix (.wav .flac .mp3 .opus .ogg
    .pcm .raw). ValueError naming the path for an unknown format or suffix, or a folder that does not exist:
    checked before any model work, so a long generation is never lost to a bad file name."""
    path = os.fspath(path)
    if format is None:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in _SUFFIX_FORMATS:
            raise ValueError(f"output {path!r}: cannot tell the audio format from the suffix {suffix or '(none)'!r}; "
                             f"use one of {', '.join(_SUFFIX_FORMATS)} or give the format "
                             f"({', '.join(OUTPUT_FORMATS)})")
        format = _SUFFIX_FORMATS[suffix]
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"output {path!r}: unknown audio format {format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output {path!r}: folder {folder!r} does not exist")
    container, subtype = OUTPUT_FORMATS[format]
    soundfile = require_soundfile()
    if container not in soundfile.available_formats() or subtype not in soundfile.available_subtypes(container):
        raise ValueError(f"output {path!r}: this libsndfile ({soundfile.__libsndfile_version__}) cannot write "
                         f"{format}; choose another of {', '.join(OUTPUT_FORMATS)}")
    return format


def open_audio_writer(path: str | os.PathLike, sample_rate: int, format: str | None = None):
    """A soundfile.SoundFile open for writing mono audio at `sample_rate` in `format` (see output_format); write
    float32 chunks to it as they come and close it (a streamed answer is written packet by packet)."""
    format = output_format(path, format)
    container, subtype = OUTPUT_FORMATS[format]
    endian = "LITTLE" if container == "RAW" else "FILE"
    return require_soundfile().SoundFile(os.fspath(path), "w", samplerate=int(sample_rate), channels=1,
                                         format=container, subtype=subtype, endian=endian)


def write_audio(path: str | os.PathLike, samples: np.ndarray | torch.Tensor, sample_rate: int,
                format: str | None = None) -> str:
    """samples: [num_samples] float in [-1, 1] (or int16 pcm) -> `path` in `format` (default: from the suffix).
    Returns the format written. wav/flac/pcm16 keep every sample exactly at 16 bits; mp3 and opus are lossy but
    decode back (soundfile) to the same number of samples."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"output {os.fspath(path)!r}: samples must be mono [num_samples], got shape {samples.shape}")
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    check_finite(samples, f"output {os.fspath(path)!r}")
    format = output_format(path, format)
    with open_audio_writer(path, sample_rate, format) as handle:
        handle.write(samples.astype(np.float32))
    return format
