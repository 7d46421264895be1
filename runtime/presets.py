"""Named configurations, written as the config.json dicts they stand for so they go through the same reader.

- `qwen3-omni-30b-a3b`: the released Qwen3-Omni-30B-A3B-Instruct shapes and ids (MODEL_SPEC §2), for
  benchmarks with random weights and for checking a downloaded checkpoint's config against.
- `tiny`: a CPU-sized model with every module and every mechanism of the real one (MoE with top-k < E,
  interleaved TM-RoPE with all three axes, DeepStack, shared expert, several code groups, sliding window),
  used by the demo and by tests. Its ids match the tiny tokenizer that `runtime.tiny` writes.
"""

from __future__ import annotations


def _rope(theta: float, section: list[int] | None = None) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta}
    if section is not None:
        rope.update(mrope_section=section, interleaved=True, mrope_interleaved=True)
    return rope


def qwen3_omni_30b_a3b() -> dict:
    thinker_ids = dict(audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                       audio_start_token_id=151669, vision_start_token_id=151652, position_id_per_seconds=13)
    return {
        "model_type": "qwen3_omni_moe", "dtype": "bfloat16", "enable_audio_output": True,
        "im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948, "user_token_id": 872,
        "assistant_token_id": 77091, "tts_pad_token_id": 151671, "tts_bos_token_id": 151672,
        "tts_eos_token_id": 151673,
        "thinker_config": {
            **thinker_ids, "audio_end_token_id": 151670, "vision_end_token_id": 151653, "user_token_id": 872,
            "text_config": dict(
                vocab_size=152064, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, intermediate_size=768, rms_norm_eps=1e-6,
                max_position_embeddings=65536, rope_parameters=_rope(1e6, [24, 20, 20]), num_experts=128,
                num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
            "audio_config": dict(
                num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                encoder_ffn_dim=5120, output_dim=2048, n_window=50, n_window_infer=800,
                downsample_hidden_size=480, max_source_positions=1500),
            "vision_config": dict(
                depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
        },
        "talker_config": {
            **thinker_ids, "num_code_groups": 16, "thinker_hidden_size": 2048, "accept_hidden_layer": 24,
            "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150, "codec_nothink_id": 2155,
            "codec_think_bos_id": 2156, "codec_think_eos_id": 2157, "spatial_merge_size": 2,
            "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
            "text_config": dict(
                vocab_size=3072, hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                num_key_value_heads=2, head_dim=128, intermediate_size=2048, rms_norm_eps=1e-6,
                max_position_embeddings=65536, rope_parameters=_rope(1e6, [24, 20, 20]), num_experts=128,
                num_experts_per_tok=6, moe_intermediate_size=384, norm_topk_prob=True,
                shared_expert_intermediate_size=768),
            "code_predictor_config": dict(
                vocab_size=2048, hidden_size=1024, num_hidden_layers=5, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6,
                max_position_embeddings=32768, rope_parameters=_rope(1e6), num_code_groups=16),
        },
        "code2wav_config": dict(
            codebook_size=2048, num_quantizers=16, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=3072, sliding_window=72, layer_scale_initial_scale=0.01,
            rms_norm_eps=1e-5, rope_parameters=_rope(1e4), max_position_embeddings=8000,
            upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=1536),
    }


# Tiny vocabulary: byte-level BPE ids below TINY_FIRST_SPECIAL, special tokens above (runtime.tiny).
TINY_VOCAB_SIZE = 640
TINY_SPECIAL_TOKENS = {
    "<|im_start|>": 620, "<|im_end|>": 621, "system": 622, "user": 623, "assistant": 624,
    "<tts_pad>": 625, "<tts_text_bos>": 626, "<tts_text_eod>": 627,
    "<|audio_start|>": 628, "<|audio_end|>": 629, "<|audio_pad|>": 630,
    "<|vision_start|>": 631, "<|vision_end|>": 632, "<|image_pad|>": 633, "<|video_pad|>": 634,
    "<|endoftext|>": 635,
}
TINY_FIRST_SPECIAL = min(TINY_SPECIAL_TOKENS.values())


def tiny() -> dict:
    ids = TINY_SPECIAL_TOKENS
    thinker_ids = dict(audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"],
                       video_token_id=ids["<|video_pad|>"], audio_start_token_id=ids["<|audio_start|>"],
                       vision_start_token_id=ids["<|vision_start|>"], position_id_per_seconds=13)
    return {
        "model_type": "qwen3_omni_moe", "dtype": "float32", "enable_audio_output": True,
        "im_start_token_id": ids["<|im_start|>"], "im_end_token_id": ids["<|im_end|>"],
        "system_token_id": ids["system"], "user_token_id": ids["user"], "assistant_token_id": ids["assistant"],
        "tts_pad_token_id": ids["<tts_pad>"], "tts_bos_token_id": ids["<tts_text_bos>"],
        "tts_eos_token_id": ids["<tts_text_eod>"],
        "thinker_config": {
            **thinker_ids, "audio_end_token_id": ids["<|audio_end|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "user_token_id": ids["user"],
            "text_config": dict(
                vocab_size=TINY_VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=96, rms_norm_eps=1e-6,
                max_position_embeddings=4096, rope_parameters=_rope(1e6, [2, 3, 3]), num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
            "audio_config": dict(
                num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                output_dim=64, n_window=50, n_window_infer=800, downsample_hidden_size=32,
                max_source_positions=1500),
            "vision_config": dict(
                depth=3, hidden_size=32, intermediate_size=48, num_heads=4, in_channels=3, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=2304,
                deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh"),
        },
        "talker_config": {
            **thinker_ids, "num_code_groups": 4, "thinker_hidden_size": 64, "accept_hidden_layer": 3,
            "codec_pad_id": 1060, "codec_bos_id": 1061, "codec_eos_token_id": 1062, "codec_nothink_id": 1063,
            "codec_think_bos_id": 1064, "codec_think_eos_id": 1065, "spatial_merge_size": 2,
            "speaker_id": {"chelsie": 1070, "ethan": 1071, "aiden": 1072},
            "text_config": dict(
                vocab_size=1088, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=48, rms_norm_eps=1e-6,
                max_position_embeddings=4096, rope_parameters=_rope(1e6, [1, 1, 2]), num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                shared_expert_intermediate_size=24),
            "code_predictor_config": dict(
                vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=48, rms_norm_eps=1e-6,
                max_position_embeddings=64, rope_parameters=_rope(1e6), num_code_groups=4),
        },
        "code2wav_config": dict(
            codebook_size=64, num_quantizers=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=48, sliding_window=8, layer_scale_initial_scale=0.01,
            rms_norm_eps=1e-5, rope_parameters=_rope(1e4), max_position_embeddings=8000,
            upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=32),
    }


PRESETS = {"qwen3-omni-30b-a3b": qwen3_omni_30b_a3b, "tiny": tiny}
