"""Typed configuration of Qwen3-Omni-MoE, read from the checkpoint's `config.json`.

The layout is the one transformers' `Qwen3OmniMoeConfig` writes (5.x `rope_parameters`, and the 4.57-era
`rope_theta` + `rope_scaling` spelling). Every value is read from the file: the transformers class
defaults differ from the released checkpoint in many places (MODEL_SPEC §2), so a missing required field
is an error, never a silent default. Inconsistent or unsupported fields raise `ConfigError` naming the
field by its JSON path (e.g. `thinker_config.text_config.num_key_value_heads`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MODEL_TYPE = "qwen3_omni_moe"


class ConfigError(ValueError):
    """A config.json that omni-rt cannot run: the message names the offending field."""


class _Reader:
    """Reads fields of one JSON object, remembering its path for error messages."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if not self.has(key):
            if default is ...:
                raise ConfigError(f"{self.name(key)}: required field is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if bool not in kinds and isinstance(value, bool) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.name(key)}: expected {wanted}, got {value!r}")
        return value

    def int(self, key: str, default: Any = ..., minimum: int | None = 1) -> int:
        value = self.get(key, int, default)
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"{self.name(key)}: must be >= {minimum}, got {value}")
        return value

    def float(self, key: str, default: Any = ...) -> float:
        return self.get(key, float, default)

    def int_list(self, key: str, default: Any = ...) -> tuple[int, ...]:
        value = self.get(key, (list, tuple), default)
        if value is None:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self.name(key)}: expected a list of integers, got {value!r}")
        return tuple(value)

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.get(key, dict), self.name(key))

    def require(self, key: str, allowed: tuple, default: Any) -> None:
        """Fields omni-rt implements only one way: refuse any other value instead of ignoring it."""
        value = self.data.get(key, default)
        if value not in allowed:
            raise ConfigError(f"{self.name(key)}: unsupported value {value!r} (omni-rt supports {allowed})")


def _rope(reader: _Reader, default_theta: float) -> tuple[float, tuple[int, ...] | None]:
    """(theta, mrope_section) from 5.x `rope_parameters` or 4.57 `rope_theta` + `rope_scaling`."""
    if reader.has("rope_parameters"):
        rope = reader.sub("rope_parameters")
    elif reader.has("rope_scaling"):
        rope = reader.sub("rope_scaling")
    else:
        rope = _Reader({}, reader.name("rope_parameters"))
    rope_type = rope.data.get("rope_type", rope.data.get("type", "default"))
    if rope_type not in ("default", "axial", "mrope"):
        raise ConfigError(f"{rope.name('rope_type')}: unsupported rope type {rope_type!r} (omni-rt supports default)")
    theta = rope.float("rope_theta", reader.float("rope_theta", default_theta))
    section = rope.int_list("mrope_section", None)
    if section is not None and len(section) != 3:
        raise ConfigError(f"{rope.name('mrope_section')}: expected 3 entries (t, h, w), got {list(section)}")
    return theta, section


@dataclass(frozen=True)
class AudioEncoderConfig:
    """AuT: 3 stride-2 Conv2d over the log-mel, then a windowed pre-LN transformer (MODEL_SPEC §5)."""

    num_mel_bins: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    output_dim: int
    n_window: int
    n_window_infer: int
    downsample_hidden_size: int
    max_source_positions: int

    @staticmethod
    def read(r: _Reader) -> "AudioEncoderConfig":
        r.require("activation_function", ("gelu",), "gelu")
        cfg = AudioEncoderConfig(
            num_mel_bins=r.int("num_mel_bins"),
            d_model=r.int("d_model"),
            num_layers=r.int("encoder_layers"),
            num_heads=r.int("encoder_attention_heads"),
            ffn_dim=r.int("encoder_ffn_dim"),
            output_dim=r.int("output_dim"),
            n_window=r.int("n_window"),
            n_window_infer=r.int("n_window_infer"),
            downsample_hidden_size=r.int("downsample_hidden_size"),
            max_source_positions=r.int("max_source_positions", 1500),
        )
        if cfg.d_model % cfg.num_heads:
            raise ConfigError(f"{r.name('d_model')}: {cfg.d_model} is not divisible by encoder_attention_heads {cfg.num_heads}")
        if cfg.n_window_infer % (2 * cfg.n_window):
            raise ConfigError(f"{r.name('n_window_infer')}: {cfg.n_window_infer} is not a multiple of 2*n_window = {2 * cfg.n_window}")
        return cfg

    def to_hf(self) -> dict:
        return {
            "model_type": "qwen3_omni_moe_audio_encoder", "activation_function": "gelu",
            "num_mel_bins": self.num_mel_bins, "d_model": self.d_model, "encoder_layers": self.num_layers,
            "encoder_attention_heads": self.num_heads, "encoder_ffn_dim": self.ffn_dim, "output_dim": self.output_dim,
            "n_window": self.n_window, "n_window_infer": self.n_window_infer,
            "downsample_hidden_size": self.downsample_hidden_size, "max_source_positions": self.max_source_positions,
        }


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Qwen3-VL ViT with DeepStack taps (MODEL_SPEC §6)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @staticmethod
    def read(r: _Reader) -> "VisionEncoderConfig":
        theta, _ = _rope(r, 10000.0)
        cfg = VisionEncoderConfig(
            depth=r.int("depth"),
            hidden_size=r.int("hidden_size"),
            intermediate_size=r.int("intermediate_size"),
            num_heads=r.int("num_heads"),
            in_channels=r.int("in_channels", 3),
            patch_size=r.int("patch_size"),
            temporal_patch_size=r.int("temporal_patch_size"),
            spatial_merge_size=r.int("spatial_merge_size"),
            out_hidden_size=r.int("out_hidden_size"),
            num_position_embeddings=r.int("num_position_embeddings"),
            deepstack_visual_indexes=r.int_list("deepstack_visual_indexes"),
            hidden_act=r.get("hidden_act", str, "gelu_pytorch_tanh"),
            rope_theta=theta,
        )
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu", "quick_gelu", "silu"):
            raise ConfigError(f"{r.name('hidden_act')}: unsupported activation {cfg.hidden_act!r}")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ConfigError(f"{r.name('hidden_size')}: {cfg.hidden_size} / num_heads {cfg.num_heads} must be a multiple of 4 (2-D rotary)")
        side = int(round(cfg.num_position_embeddings ** 0.5))
        if side * side != cfg.num_position_embeddings:
            raise ConfigError(f"{r.name('num_position_embeddings')}: {cfg.num_position_embeddings} is not a square grid")
        bad = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ConfigError(f"{r.name('deepstack_visual_indexes')}: {bad} outside the {cfg.depth} blocks")
        return cfg

    def to_hf(self) -> dict:
        return {
            "model_type": "qwen3_omni_moe_vision_encoder", "depth": self.depth, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_heads": self.num_heads, "in_channels": self.in_channels,
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size, "out_hidden_size": self.out_hidden_size,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes), "hidden_act": self.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


@dataclass(frozen=True)
class DecoderConfig:
    """A Qwen3 decoder: the thinker and talker text models (MoE) and the code predictor (dense).

    `num_experts == 0` means a dense SiLU-gated MLP of width `intermediate_size` in every layer.
    `shared_expert_intermediate_size > 0` adds the talker's sigmoid-gated shared expert.
    `mrope_section is None` means plain 1-D RoPE.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None
    max_position_embeddings: int
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0

    @staticmethod
    def read(r: _Reader, *, moe: bool, shared_expert: bool, default_theta: float) -> "DecoderConfig":
        r.require("hidden_act", ("silu",), "silu")
        r.require("attention_bias", (False,), False)
        r.require("use_sliding_window", (False,), False)
        r.require("tie_word_embeddings", (False,), False)
        theta, section = _rope(r, default_theta)
        num_heads = r.int("num_attention_heads")
        hidden = r.int("hidden_size")
        kwargs: dict[str, Any] = {}
        if moe:
            r.require("decoder_sparse_step", (1,), 1)
            if r.data.get("mlp_only_layers"):
                raise ConfigError(f"{r.name('mlp_only_layers')}: dense layers inside the MoE stack are not supported")
            experts_key = "num_experts" if r.has("num_experts") else "num_local_experts"
            kwargs = dict(
                num_experts=r.int(experts_key),
                top_k=r.int("num_experts_per_tok"),
                moe_intermediate_size=r.int("moe_intermediate_size"),
                norm_topk_prob=r.get("norm_topk_prob", bool),
            )
            if kwargs["top_k"] > kwargs["num_experts"]:
                raise ConfigError(f"{r.name('num_experts_per_tok')}: top-k {kwargs['top_k']} exceeds {kwargs['num_experts']} experts")
            if shared_expert:
                kwargs["shared_expert_intermediate_size"] = r.int("shared_expert_intermediate_size")
        cfg = DecoderConfig(
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            num_layers=r.int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=r.int("num_key_value_heads", num_heads),
            head_dim=r.int("head_dim", hidden // num_heads),
            intermediate_size=r.int("intermediate_size"),
            rms_norm_eps=r.float("rms_norm_eps"),
            rope_theta=theta,
            mrope_section=section if moe else None,
            max_position_embeddings=r.int("max_position_embeddings"),
            **kwargs,
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"{r.name('num_key_value_heads')}: {cfg.num_kv_heads} does not divide num_attention_heads {cfg.num_heads}")
        if cfg.head_dim % 2:
            raise ConfigError(f"{r.name('head_dim')}: rotary embedding needs an even head_dim, got {cfg.head_dim}")
        if moe and cfg.mrope_section is None:
            raise ConfigError(f"{r.name('rope_parameters')}.mrope_section: required for TM-RoPE")
        return cfg

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_hf(self, model_type: str) -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.mrope_section is not None:
            rope.update(mrope_section=list(self.mrope_section), interleaved=True, mrope_interleaved=True)
        out = {
            "model_type": model_type, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "rope_parameters": rope,
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        }
        if self.num_experts:
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.top_k,
                       moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=1, mlp_only_layers=[])
        if self.shared_expert_intermediate_size:
            out["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return out


@dataclass(frozen=True)
class ThinkerConfig:
    text: DecoderConfig
    audio: AudioEncoderConfig
    vision: VisionEncoderConfig
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    vision_start_token_id: int
    position_id_per_seconds: int

    @staticmethod
    def read(r: _Reader) -> "ThinkerConfig":
        text = DecoderConfig.read(r.sub("text_config"), moe=True, shared_expert=False, default_theta=1e6)
        audio = AudioEncoderConfig.read(r.sub("audio_config"))
        vision = VisionEncoderConfig.read(r.sub("vision_config"))
        cfg = ThinkerConfig(
            text=text, audio=audio, vision=vision,
            audio_token_id=r.int("audio_token_id", minimum=0),
            image_token_id=r.int("image_token_id", minimum=0),
            video_token_id=r.int("video_token_id", minimum=0),
            audio_start_token_id=r.int("audio_start_token_id", minimum=0),
            vision_start_token_id=r.int("vision_start_token_id", minimum=0),
            position_id_per_seconds=r.int("position_id_per_seconds"),
        )
        if audio.output_dim != text.hidden_size:
            raise ConfigError(f"{r.name('audio_config.output_dim')}: {audio.output_dim} != thinker hidden_size {text.hidden_size}")
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(f"{r.name('vision_config.out_hidden_size')}: {vision.out_hidden_size} != thinker hidden_size {text.hidden_size}")
        for key in ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id", "vision_start_token_id"):
            if getattr(cfg, key) >= text.vocab_size:
                raise ConfigError(f"{r.name(key)}: {getattr(cfg, key)} is outside the vocabulary of {text.vocab_size}")
        if len(vision.deepstack_visual_indexes) > text.num_layers:
            raise ConfigError(f"{r.name('vision_config.deepstack_visual_indexes')}: more DeepStack levels than thinker layers")
        return cfg

    def to_hf(self) -> dict:
        return {
            "model_type": "qwen3_omni_moe_thinker", "text_config": self.text.to_hf("qwen3_omni_moe_text"),
            "audio_config": self.audio.to_hf(), "vision_config": self.vision.to_hf(),
            "audio_token_id": self.audio_token_id, "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id, "audio_start_token_id": self.audio_start_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "position_id_per_seconds": self.position_id_per_seconds,
        }


@dataclass(frozen=True)
class TalkerConfig:
    text: DecoderConfig
    code_predictor: DecoderConfig
    num_code_groups: int
    thinker_hidden_size: int
    accept_hidden_layer: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    speaker_id: dict[str, int]
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    vision_start_token_id: int
    position_id_per_seconds: int
    spatial_merge_size: int

    CODEC_IDS = ("codec_pad_id", "codec_bos_id", "codec_eos_token_id", "codec_nothink_id",
                 "codec_think_bos_id", "codec_think_eos_id")

    @staticmethod
    def read(r: _Reader) -> "TalkerConfig":
        text = DecoderConfig.read(r.sub("text_config"), moe=True, shared_expert=True, default_theta=1e6)
        predictor = DecoderConfig.read(r.sub("code_predictor_config"), moe=False, shared_expert=False, default_theta=1e4)
        speakers = r.get("speaker_id", dict)
        if not speakers or not all(isinstance(v, int) for v in speakers.values()):
            raise ConfigError(f"{r.name('speaker_id')}: expected a non-empty map of speaker name to codec id")
        cfg = TalkerConfig(
            text=text, code_predictor=predictor,
            num_code_groups=r.int("num_code_groups", minimum=2),
            thinker_hidden_size=r.int("thinker_hidden_size"),
            accept_hidden_layer=r.int("accept_hidden_layer", minimum=0),
            **{key: r.int(key, minimum=0) for key in TalkerConfig.CODEC_IDS},
            speaker_id={name.lower(): v for name, v in speakers.items()},
            audio_token_id=r.int("audio_token_id", minimum=0),
            image_token_id=r.int("image_token_id", minimum=0),
            video_token_id=r.int("video_token_id", minimum=0),
            audio_start_token_id=r.int("audio_start_token_id", minimum=0),
            vision_start_token_id=r.int("vision_start_token_id", minimum=0),
            position_id_per_seconds=r.int("position_id_per_seconds"),
            spatial_merge_size=r.int("spatial_merge_size"),
        )
        sub = r.sub("code_predictor_config")
        if sub.int("num_code_groups") != cfg.num_code_groups:
            raise ConfigError(f"{sub.name('num_code_groups')}: {sub.data['num_code_groups']} != talker num_code_groups {cfg.num_code_groups}")
        ids = {key: getattr(cfg, key) for key in TalkerConfig.CODEC_IDS} | {f"speaker_id.{k}": v for k, v in cfg.speaker_id.items()}
        for key, value in ids.items():
            if value >= text.vocab_size:
                raise ConfigError(f"{r.name(key)}: {value} is outside the talker vocabulary of {text.vocab_size}")
        return cfg

    def to_hf(self) -> dict:
        out = {key: getattr(self, key) for key in (
            "num_code_groups", "thinker_hidden_size", "accept_hidden_layer", *TalkerConfig.CODEC_IDS,
            "audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id",
            "vision_start_token_id", "position_id_per_seconds", "spatial_merge_size")}
        predictor = self.code_predictor.to_hf("qwen3_omni_moe_talker_code_predictor")
        predictor["num_code_groups"] = self.num_code_groups
        return {"model_type": "qwen3_omni_moe_talker", "text_config": self.text.to_hf("qwen3_omni_moe_talker_text"),
                "code_predictor_config": predictor, "speaker_id": dict(self.speaker_id), **out}


@dataclass(frozen=True)
class Code2WavConfig:
    """Codes → 24 kHz waveform: sliding-window transformer, causal upsampling ConvNet (MODEL_SPEC §10)."""

    codebook_size: int
    num_quantizers: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    sliding_window: int
    layer_scale_initial_scale: float
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    decoder_dim: int

    SAMPLE_RATE = 24000

    @staticmethod
    def read(r: _Reader) -> "Code2WavConfig":
        r.require("hidden_act", ("silu",), "silu")
        r.require("attention_bias", (False,), False)
        theta, _ = _rope(r, 10000.0)
        cfg = Code2WavConfig(
            codebook_size=r.int("codebook_size"),
            num_quantizers=r.int("num_quantizers"),
            hidden_size=r.int("hidden_size"),
            num_layers=r.int("num_hidden_layers"),
            num_heads=r.int("num_attention_heads"),
            num_kv_heads=r.int("num_key_value_heads"),
            intermediate_size=r.int("intermediate_size"),
            sliding_window=r.int("sliding_window"),
            layer_scale_initial_scale=r.float("layer_scale_initial_scale", 0.01),
            rms_norm_eps=r.float("rms_norm_eps"),
            rope_theta=theta,
            max_position_embeddings=r.int("max_position_embeddings"),
            upsample_rates=r.int_list("upsample_rates"),
            upsampling_ratios=r.int_list("upsampling_ratios"),
            decoder_dim=r.int("decoder_dim"),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"{r.name('hidden_size')}: {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
        if cfg.decoder_dim % (2 ** len(cfg.upsample_rates)):
            raise ConfigError(f"{r.name('decoder_dim')}: {cfg.decoder_dim} must halve {len(cfg.upsample_rates)} times")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def samples_per_frame(self) -> int:
        total = 1
        for rate in (*self.upsampling_ratios, *self.upsample_rates):
            total *= rate
        return total

    def to_hf(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "rope_theta"}
        out.update(upsample_rates=list(self.upsample_rates), upsampling_ratios=list(self.upsampling_ratios),
                   num_hidden_layers=out.pop("num_layers"), num_attention_heads=out.pop("num_heads"),
                   num_key_value_heads=out.pop("num_kv_heads"), hidden_act="silu", attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return out


@dataclass(frozen=True)
class OmniConfig:
    """The whole model. `talker`/`code2wav` are None in a thinker-only checkpoint (enable_audio_output false)."""

    thinker: ThinkerConfig
    talker: TalkerConfig | None
    code2wav: Code2WavConfig | None
    im_start_token_id: int
    im_end_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    TOKEN_IDS = ("im_start_token_id", "im_end_token_id", "system_token_id", "user_token_id",
                 "assistant_token_id", "tts_pad_token_id", "tts_bos_token_id", "tts_eos_token_id")

    @staticmethod
    def from_dict(data: dict) -> "OmniConfig":
        r = _Reader(data, "")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"model_type: this is a config of another model ({model_type!r}); omni-rt runs {MODEL_TYPE!r}")
        thinker = ThinkerConfig.read(r.sub("thinker_config"))
        audio_out = r.get("enable_audio_output", bool, True)
        talker = TalkerConfig.read(r.sub("talker_config")) if audio_out else None
        code2wav = Code2WavConfig.read(r.sub("code2wav_config")) if audio_out else None
        cfg = OmniConfig(
            thinker=thinker, talker=talker, code2wav=code2wav,
            **{key: r.int(key, minimum=0) for key in OmniConfig.TOKEN_IDS},
            dtype=r.get("dtype", str, r.get("torch_dtype", str, "bfloat16")),
        )
        for key in OmniConfig.TOKEN_IDS:
            if getattr(cfg, key) >= thinker.text.vocab_size:
                raise ConfigError(f"{key}: {getattr(cfg, key)} is outside the thinker vocabulary of {thinker.text.vocab_size}")
        if talker is not None:
            cfg._check_audio_output()
        return cfg

    def _check_audio_output(self) -> None:
        talker, code2wav = self.talker, self.code2wav
        if talker.thinker_hidden_size != self.thinker.text.hidden_size:
            raise ConfigError(f"talker_config.thinker_hidden_size: {talker.thinker_hidden_size} != thinker hidden_size {self.thinker.text.hidden_size}")
        if talker.accept_hidden_layer > self.thinker.text.num_layers:
            raise ConfigError(f"talker_config.accept_hidden_layer: {talker.accept_hidden_layer} > thinker layers {self.thinker.text.num_layers}")
        if code2wav.num_quantizers != talker.num_code_groups:
            raise ConfigError(f"code2wav_config.num_quantizers: {code2wav.num_quantizers} != talker num_code_groups {talker.num_code_groups}")
        if talker.code_predictor.vocab_size != code2wav.codebook_size:
            raise ConfigError(f"talker_config.code_predictor_config.vocab_size: {talker.code_predictor.vocab_size} != code2wav codebook_size {code2wav.codebook_size}")
        # generate() suppresses the top 1024 talker ids except EOS; codebook-0 codes must lie below them.
        if code2wav.codebook_size > talker.text.vocab_size - 1024:
            raise ConfigError(f"talker_config.text_config.vocab_size: {talker.text.vocab_size} leaves no room for {code2wav.codebook_size} codes below the 1024 suppressed control ids")
        for key in TalkerConfig.CODEC_IDS:
            if getattr(talker, key) < code2wav.codebook_size:
                raise ConfigError(f"talker_config.{key}: {getattr(talker, key)} collides with codec codes [0, {code2wav.codebook_size})")

    @staticmethod
    def from_pretrained(path: str | os.PathLike) -> "OmniConfig":
        """Read `config.json` from a checkpoint directory (or the file itself) or a preset name."""
        from runtime.presets import PRESETS

        path = os.fspath(path)
        if path in PRESETS:
            return OmniConfig.from_dict(PRESETS[path]())
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {path!r} (and it is not a preset: {', '.join(sorted(PRESETS))})")
        with open(file) as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{file}: not valid JSON ({err})") from err
        return OmniConfig.from_dict(data)

    def to_dict(self) -> dict:
        """The config.json transformers' `Qwen3OmniMoeConfig` reads."""
        out = {"model_type": MODEL_TYPE, "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
               "thinker_config": self.thinker.to_hf(), "enable_audio_output": self.talker is not None,
               "dtype": self.dtype, **{key: getattr(self, key) for key in OmniConfig.TOKEN_IDS}}
        out["thinker_config"]["user_token_id"] = self.user_token_id
        if self.talker is not None:
            out["talker_config"] = self.talker.to_hf()
            out["code2wav_config"] = self.code2wav.to_hf()
        return out

    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
