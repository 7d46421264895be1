"""Speech generation offline: thinker states -> talker frames -> codec codes -> waveform (MODEL_SPEC §8-11).

Frame loop (greedy, as transformers' `generate(..., talker_do_sample=False, talker_repetition_penalty=1.0)`):
    prefill the talker prompt -> logits of its last position -> code 0 (control ids suppressed)
    per frame k: code predictor fills codebooks 1..G-1 from (talker hidden, code 0)
                 next talker input = frame_input(codes_k, text_for_frame(k)) -> one cached talker step -> code 0
    stop when every row has emitted codec EOS or after `max_new_tokens` code-0 tokens.
A frame whose code 0 is EOS gets no residual codes and is not returned; a code 0 that is never followed by
a talker step (the max-token cut) gets none either, so `max_new_tokens` tokens give at most
`max_new_tokens - 1` frames, exactly as transformers counts them.

Shapes: B = batch, P = talker prompt length, G = num_code_groups, F = frames.
"""

from __future__ import annotations

import torch

from runtime.models.talker import Talker, TalkerPrompt, code0_suppress_mask
from runtime.rope_index import get_rope_index


def talker_position_ids(prompt: TalkerPrompt, config, image_grid_thw=None, video_grid_thw=None,
                        audio_seqlens=None, video_second_per_grid=None, use_audio_in_video: bool = False):
    """[3, B, P] prefill positions: plain real-token counts, or TM-RoPE ids of the talker input ids when the prompt
    has images or videos (get_rope_index with the talker's own ids and rates, as transformers does).

    Audio and an image/video in one prompt (MODEL_SPEC §14.16): transformers 5.23 raises AttributeError there (its
    talker's get_rope_index reads `config.audio_config.n_window`, which the talker config lacks). We count audio
    tokens with the thinker's n_window, the count the prompt's audio placeholders were made with (4.57.1 used the
    default 50, which is the released value); this equals 5.23 with the thinker's audio config given to its talker.
    """
    if image_grid_thw is None and video_grid_thw is None:
        return prompt.text_position_ids()
    positions, _ = get_rope_index(prompt.input_ids, prompt.attention_mask, image_grid_thw, video_grid_thw,
                                  audio_seqlens, video_second_per_grid, use_audio_in_video,
                                  config=_talker_view(config))
    return positions


def _talker_view(config):
    """A ThinkerConfig whose ids, rates and merge size are the talker's (get_rope_index reads them from there)."""
    from dataclasses import replace

    talker, thinker = config.talker, config.thinker
    return replace(thinker, audio_token_id=talker.audio_token_id, image_token_id=talker.image_token_id,
                   video_token_id=talker.video_token_id, audio_start_token_id=talker.audio_start_token_id,
                   vision_start_token_id=talker.vision_start_token_id,
                   position_id_per_seconds=talker.position_id_per_seconds,
                   vision=replace(thinker.vision, spatial_merge_size=talker.spatial_merge_size))


@torch.inference_mode()
def talker_generate(talker: Talker, prompt: TalkerPrompt, position_ids: torch.Tensor, *,
                    max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt: from Talker.build_prompt; position_ids: [3, B, P] from talker_position_ids.

    Returns (codes [B, G, F] int64, lengths [B] int64): frames before each row's codec EOS; in a batch, the
    frames of a row past its own EOS are zeros (transformers keeps generating them until every row stops).
    """
    if max_new_tokens < 1:
        raise ValueError(f"talker max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = talker.cfg
    batch = prompt.inputs_embeds.shape[0]
    device = prompt.inputs_embeds.device
    suppress = code0_suppress_mask(cfg, device)
    cache = talker.new_cache()
    mask = prompt.attention_mask
    logits, hidden = talker(prompt.inputs_embeds, position_ids, mask, cache, num_logits_to_keep=1)
    positions = position_ids[:, :, -1:]  # [3, B, 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    frames = []
    for step in range(max_new_tokens):
        code0 = logits[:, -1].masked_fill(suppress, float("-inf")).argmax(-1)  # [B]
        finished |= code0 == cfg.codec_eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        lengths += (~finished).long()
        codes = talker.predict_frame(hidden[:, -1], code0)  # [B, G]
        frames.append(codes)
        mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
        positions = positions + 1
        logits, hidden = talker(talker.frame_input(codes, prompt.text_for_frame(step)), positions, mask, cache)
    if not frames:
        return torch.zeros(batch, cfg.num_code_groups, 0, dtype=torch.long, device=device), lengths
    codes = torch.stack(frames, dim=-1)  # [B, G, F]
    frame_index = torch.arange(codes.shape[-1], device=device)
    return codes.masked_fill((frame_index >= lengths[:, None])[:, None], 0), lengths
