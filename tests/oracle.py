"""The parity oracle: transformers' own Qwen3-Omni-MoE (pinned in requirements-test.txt) on tiny random
configs. Two configurations: `pow2` (power-of-two dims) and `odd` (dims that are not powers of two).

`build_oracle(variant, tmp_dir)` builds transformers' model with random weights, `save_pretrained`s it to
`tmp_dir` (the Hub layout: per-expert tensors, HF names) and returns it in eval mode with eager attention
and eager experts, so fp32 comparisons are exact up to summation order (MODEL_SPEC §14.15).
"""

from __future__ import annotations

import copy

import torch


def _rope(theta, section=None):
    rope = {"rope_type": "default", "rope_theta": theta}
    if section is not None:
        rope.update(mrope_section=section, interleaved=True, mrope_interleaved=True)
    return rope


_IDS = dict(im_start_token_id=498, im_end_token_id=499, system_token_id=497, user_token_id=496,
            assistant_token_id=495, tts_pad_token_id=494, tts_bos_token_id=493, tts_eos_token_id=492)
_THINKER_IDS = dict(audio_token_id=480, image_token_id=481, video_token_id=482, audio_start_token_id=483,
                    audio_end_token_id=484, vision_start_token_id=485, vision_end_token_id=486,
                    position_id_per_seconds=13)

VARIANTS = {
    "pow2": dict(
        text=dict(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, rope_parameters=_rope(1e6, [1, 1, 2]), max_position_embeddings=4096),
        audio=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2, num_mel_bins=128,
                   downsample_hidden_size=32, n_window=50, n_window_infer=200, output_dim=32),
        vision=dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=16, temporal_patch_size=2,
                    spatial_merge_size=2, deepstack_visual_indexes=[0, 1], out_hidden_size=32, num_position_embeddings=64),
        talker_text=dict(vocab_size=1088, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=True, rope_parameters=_rope(1e6, [1, 1, 2]), max_position_embeddings=4096),
        code_predictor=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_code_groups=4,
                            rope_parameters=_rope(1e6), max_position_embeddings=64),
        code2wav=dict(codebook_size=64, num_quantizers=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, sliding_window=8, decoder_dim=32,
                      upsample_rates=[4, 3], upsampling_ratios=[2, 2]),
        talker=dict(accept_hidden_layer=3, num_code_groups=4),
    ),
    # Not powers of two: hidden 36, 3 heads of 12, 6 experts top-3, odd sections, 5 code groups.
    "odd": dict(
        text=dict(vocab_size=500, hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=12, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3,
                  norm_topk_prob=True, rope_parameters=_rope(5e5, [2, 2, 1]), max_position_embeddings=4096),
        audio=dict(d_model=36, encoder_attention_heads=3, encoder_ffn_dim=44, encoder_layers=3, num_mel_bins=128,
                   downsample_hidden_size=20, n_window=50, n_window_infer=300, output_dim=36),
        vision=dict(depth=4, hidden_size=24, num_heads=3, intermediate_size=44, patch_size=16, temporal_patch_size=2,
                    spatial_merge_size=2, deepstack_visual_indexes=[1, 2], out_hidden_size=36, num_position_embeddings=49),
        talker_text=dict(vocab_size=1100, hidden_size=36, intermediate_size=44, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=12, moe_intermediate_size=20,
                         shared_expert_intermediate_size=28, num_experts=6, num_experts_per_tok=3,
                         norm_topk_prob=True, rope_parameters=_rope(1e6, [2, 2, 1]), max_position_embeddings=4096),
        code_predictor=dict(vocab_size=60, hidden_size=36, intermediate_size=44, num_hidden_layers=3,
                            num_attention_heads=3, num_key_value_heads=3, head_dim=12, num_code_groups=5,
                            rope_parameters=_rope(1e6), max_position_embeddings=64),
        code2wav=dict(codebook_size=60, num_quantizers=5, hidden_size=36, intermediate_size=44, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=3, sliding_window=5, decoder_dim=24,
                      upsample_rates=[3, 5], upsampling_ratios=[2, 3]),
        talker=dict(accept_hidden_layer=2, num_code_groups=5),
    ),
}


def hf_config_dict(variant: str) -> dict:
    """The kwargs of transformers' Qwen3OmniMoeConfig for a tiny variant."""
    v = copy.deepcopy(VARIANTS[variant])
    hidden = v["text"]["hidden_size"]
    return dict(
        **_IDS,
        thinker_config=dict(**_THINKER_IDS, user_token_id=_IDS["user_token_id"], text_config=v["text"],
                            audio_config=v["audio"], vision_config=v["vision"]),
        talker_config=dict(
            **v["talker"], thinker_hidden_size=hidden, spatial_merge_size=2,
            codec_pad_id=1060, codec_bos_id=1061, codec_eos_token_id=1062, codec_nothink_id=1063,
            codec_think_bos_id=1064, codec_think_eos_id=1065, speaker_id={"ethan": 1070, "chelsie": 1071},
            audio_token_id=480, image_token_id=481, video_token_id=482, vision_start_token_id=485,
            audio_start_token_id=483, position_id_per_seconds=13,
            text_config=v["talker_text"], code_predictor_config=v["code_predictor"]),
        code2wav_config=v["code2wav"],
    )


def build_oracle(variant: str, tmp_dir, seed: int | None = None):
    """transformers' Qwen3OmniMoeForConditionalGeneration with random weights, saved to `tmp_dir`,
    reloaded with eager attention and eager experts. Returns the model (fp32, eval)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    if seed is not None:
        torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**hf_config_dict(variant)))
    # transformers initialises some weights (norms, LayerScale, snake params) to constants; perturb every
    # tensor so that a transposed or misrouted parameter shows up as an error.
    with torch.no_grad():
        # transformers 5.23 leaves the talker's routed experts as torch.empty memory (occasionally ~1e36):
        # give them real values before perturbing everything.
        for name, param in model.talker.named_parameters():
            if ".experts." in name:
                param.normal_(0.0, 0.05)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_dir)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tmp_dir, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    return model.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()
