"""The talker (MODEL_SPEC §8) and its code predictor (the MTP module, §9): thinker states in, codec frames out.

    thinker embeddings / layer-`accept_hidden_layer` states --text_projection | hidden_projection--> [B, P, H]
      + codec embeddings of the 9-position assistant prefix              (build_prompt, §8.3)
    -> Qwen3-MoE decoder with shared expert, TM-RoPE -> final norm -> hidden [B, L, H] -> codec_head -> code 0
    -> code predictor on [hidden, C(code 0)]: one dense-decoder step per residual codebook -> codes 1..G-1
    -> next talker input = C(code 0) + Σ predictor embeddings of codes 1..G-1 + one text embedding (§8.4)

Children carry the checkpoint's names under `talker.`: `model` (`codec_embedding`, `layers.N`, `norm`),
`text_projection`, `hidden_projection` (`linear_fc1`, `linear_fc2`), `codec_head`, and `code_predictor`
(`model.codec_embedding.N`, `model.layers.N`, `model.norm`, `lm_head.N`), so
runtime.weights.load_weights(talker, dir, prefix="talker.") fills it.

Shapes: B = batch, L = tokens this call, S = cached + new tokens, H = talker hidden_size, Ht = thinker
hidden_size, V = codec vocab (codebook-0 codes + control ids), G = num_code_groups, Vc = codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import DecoderConfig, OmniConfig, TalkerConfig
from runtime.kv_cache import DynamicKVCache, FrameKVCache
from runtime.models.decoder import Decoder

SampleFn = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> codes [B] int64

ASSISTANT_PREFIX = 3  # `<|im_start|> assistant \n` before the first generated text token
SUPPRESSED_CONTROL_IDS = 1024  # generate never samples the top 1024 codec ids, except codec EOS (§8.2)


class ResizeMLP(nn.Module):
    """linear_fc2(silu(linear_fc1 x)), both with bias: thinker width Ht -> talker width H."""

    def __init__(self, in_features: int, intermediate_size: int, out_features: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(in_features, intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(intermediate_size, out_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class TalkerModel(Decoder):
    """`talker.model.`: the MoE decoder plus the codec embedding (not tied to codec_head)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class CodePredictorModel(Decoder):
    """`talker.code_predictor.model.`: the dense 1-D-RoPE decoder plus one embedding per residual codebook;
    codec_embedding[i] embeds codebook i+1."""

    def __init__(self, cfg: DecoderConfig, num_code_groups: int):
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.hidden_size)
                                             for _ in range(num_code_groups - 1))


class CodePredictor(nn.Module):
    """Predicts codebooks 1..G-1 of one frame from the talker's hidden state and code 0 (MODEL_SPEC §9).
    lm_head[i] predicts codebook i+1."""

    def __init__(self, cfg: DecoderConfig, num_code_groups: int):
        super().__init__()
        if cfg.mrope_section is not None:
            raise ValueError("the code predictor uses plain 1-D RoPE; its config must not carry an mrope_section")
        self.cfg = cfg
        self.num_code_groups = num_code_groups
        self.model = CodePredictorModel(cfg, num_code_groups)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                                     for _ in range(num_code_groups - 1))

    def new_cache(self) -> DynamicKVCache:
        return self.model.new_cache()

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: DynamicKVCache | None,
                head_index: int) -> torch.Tensor:
        """inputs_embeds: [B, L, H]; position_ids: [B, L] 1-D positions (0, 1 for the prefill, then g+1);
        cache: appended in place; head_index: which lm_head (predicts codebook head_index+1).
        Returns logits [B, L, Vc]."""
        hidden = self.model(inputs_embeds, position_ids, None, cache).hidden
        return self.lm_head[head_index](hidden)

    def _last_logits(self, inputs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view,
                     head_index: int) -> torch.Tensor:
        """The decoder over a FrameKVCache step with precomputed cos/sin [B, L, D] (Decoder.forward's layer loop,
        minus its per-call RoPE and mask), then lm_head[head_index] of the last position's final-norm hidden,
        the norm fused into the head's GEMM. inputs: [B, L, H] -> logits [B, Vc]."""
        x, residual = inputs, None
        for index, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, None, view, index)
        return self.model.norm.add_norm_linear(x[:, -1], residual[:, -1], self.lm_head[head_index].weight)[0]

    def _rope_table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, N] -> (cos, sin) [B, N, D]: kernels.rope.rope_cos_sin_ref's 1-D math (fp32 angles, then
        the activation dtype) without its `inv_freq.to(device=...)`, which tests/test_sampling_engine.py's
        host-traffic check counts as a device read on the CPU (this runs outside any module call)."""
        angles = positions.float()[..., None] * self.model.inv_freq.float()  # [B, N, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def frame_cache(self, batch: int, dtype: torch.dtype, device) -> FrameKVCache:
        """The static cache of one frame's G positions per row, with the RoPE cos/sin of positions 0..G-1 [B, G, D]
        (a static cache needs no mask). A runner keeps one per batch size and passes it to every frame (nothing
        is allocated or recomputed per frame); predict_frame makes one per call otherwise."""
        cache = FrameKVCache.for_decoder(self.cfg, batch, self.num_code_groups, dtype, device)
        cos, sin = self._rope_table(cache.positions[None], dtype)  # [1, G, D]
        cache.cos, cache.sin = cos.expand(batch, -1, -1).contiguous(), sin.expand(batch, -1, -1).contiguous()
        return cache

    def predict_frame(self, talker_hidden: torch.Tensor, code0_embed: torch.Tensor, sample_fn: SampleFn | None = None,
                      return_logits: bool = False, frame_cache: FrameKVCache | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The whole per-frame loop: one prefill of [talker_hidden, code0_embed] at positions 0, 1, then G-2
        single steps feeding back each new code.

        talker_hidden: [B, H] the talker's final-norm hidden state at the position that produced code 0.
        code0_embed: [B, H] the *talker's* codec_embedding(code 0) (Talker.predict_frame looks it up).
        sample_fn: logits [B, Vc] -> codes [B] int64; None = greedy (argmax, first index on ties).
        frame_cache: `frame_cache(B, dtype, device)`, reused from frame to frame; None = one made for this call.
        Returns residual codes [B, G-1] int64 (codebooks 1..G-1), and with return_logits also the logits each
        step sampled from, [B, G-1, Vc].
        """
        batch, groups = talker_hidden.shape[0], self.num_code_groups
        device, dtype = talker_hidden.device, talker_hidden.dtype
        choose = sample_fn or (lambda logits: logits.argmax(-1))
        # An exported backend plugged in as `forward` (export/backends.py) keeps its past in a DynamicKVCache and
        # takes positions; the PyTorch path's steps slice the frame cache and its RoPE table and attend with the
        # fused decode attention.
        exported = "forward" in self.__dict__
        if exported:
            past = self.new_cache()
        else:
            cache = frame_cache if frame_cache is not None else self.frame_cache(batch, dtype, device)
            if cache.keys.shape[1] != batch or cache.keys.dtype != dtype:
                raise ValueError(f"frame_cache holds {cache.keys.shape[1]} rows of {cache.keys.dtype}; this frame has "
                                 f"{batch} rows of {dtype}")
            cos, sin = cache.cos, cache.sin  # [B, G, D] each
        inputs = torch.stack((talker_hidden, code0_embed.to(dtype)), dim=1)  # [B, 2, H]
        start, codes, all_logits = 0, [], []
        for step in range(groups - 1):
            length = inputs.shape[1]
            if exported:
                positions = torch.arange(start, start + length, device=device).expand(batch, -1)
                logits = self(inputs, positions, past, step)[:, -1]  # [B, Vc]
            else:
                logits = self._last_logits(inputs, cos[:, start:start + length], sin[:, start:start + length],
                                           cache.step(start, length), step)  # [B, Vc]
            code = choose(logits)  # [B]
            codes.append(code)
            if return_logits:
                all_logits.append(logits)
            start += length
            if step < groups - 2:  # the last code is never fed back (§9)
                inputs = self.model.codec_embedding[step](code)[:, None]  # [B, 1, H]
        residual = torch.stack(codes, dim=1)  # [B, G-1]
        return (residual, torch.stack(all_logits, dim=1)) if return_logits else residual


@dataclass
class TalkerPrompt:
    """The talker's prefill and the text it consumes while decoding (MODEL_SPEC §8.3).

    inputs_embeds: [B, P, H] user part (right-aligned, P = longest user part + 9) then the 9 assistant positions.
    input_ids: [B, P] thinker ids of the user part, then tts_pad for the assistant positions; used only for
      TM-RoPE positions (get_rope_index when the prompt has images or videos).
    attention_mask: [B, P] int64, 0 at the leading slots of rows with a shorter user part.
    trailing_text_hidden: [B, T, H] projected text for frames 0..T-1: t2, t3, ..., then tts_eos (per row, after
      its own thinker EOS when one was given), tts_pad past it.
    tts_pad_embed: [H] projected tts_pad, the text input of every frame from T on.
    """

    inputs_embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    trailing_text_hidden: torch.Tensor
    tts_pad_embed: torch.Tensor

    def text_for_frame(self, frame: int) -> torch.Tensor:
        """[B, H] the text embedding added to the talker input that follows frame `frame` (0-based)."""
        if frame < self.trailing_text_hidden.shape[1]:
            return self.trailing_text_hidden[:, frame]
        return self.tts_pad_embed.expand(self.inputs_embeds.shape[0], -1)

    def text_position_ids(self) -> torch.Tensor:
        """[3, B, P] prefill positions of a prompt without images or videos (audio spans number their tokens one
        by one, so they land here too): the count of real tokens before each one, padding at 0, equal on all
        three axes. Decode steps continue at the last position + 1."""
        mask = self.attention_mask.long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, P]
        return positions.unsqueeze(0).expand(3, -1, -1)


def code0_suppress_mask(cfg: TalkerConfig, device=None) -> torch.Tensor:
    """[V] bool, True for the codec ids that generate never samples as code 0: the top 1024 ids except codec EOS
    (MODEL_SPEC §8.2). Apply as logits.masked_fill(mask, -inf) before choosing code 0."""
    vocab = cfg.text.vocab_size
    ids = torch.arange(vocab, device=device)
    return (ids >= vocab - SUPPRESSED_CONTROL_IDS) & (ids != cfg.codec_eos_token_id)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        self.model = TalkerModel(text)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, text.intermediate_size, text.hidden_size)
        self.codec_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor, cfg.num_code_groups)
        # the G codec embeddings stacked, for frame_input's one gather (derived from the parameters: fold_parameters)
        self.register_buffer("codec_tables", torch.empty(0), persistent=False)  # [V + (G-1)·Vc, H]
        self.register_buffer("codec_offsets", torch.empty(0, dtype=torch.long), persistent=False)  # [G]
        self.fold_parameters()

    def new_cache(self) -> DynamicKVCache:
        return self.model.new_cache()

    def fold_parameters(self) -> None:
        """codec_tables: code 0's table (talker vocab) then the code predictor's G-1 tables stacked, and
        codec_offsets [G] the first row of each, so frame_input embeds a frame's G codes with one gather. A copy of
        the parameters (~69 MB in bf16 at the released shapes), rebuilt after every load (runtime/weights.py
        refresh_folded)."""
        tables = [self.model.codec_embedding.weight, *(e.weight for e in self.code_predictor.model.codec_embedding)]
        self.codec_tables = torch.cat([table.detach() for table in tables])
        starts = [0]
        for table in tables[:-1]:
            starts.append(starts[-1] + table.shape[0])
        self.codec_offsets = torch.tensor(starts, dtype=torch.long, device=self.codec_tables.device)

    reset_buffers = fold_parameters  # after `to_empty` (runtime/weights.py): rebuilt again once the weights load

    # ------------------------------------------------------------------ inputs

    def project_text(self, thinker_embeds: torch.Tensor) -> torch.Tensor:
        """[..., Ht] thinker input embeddings (layer-0 input) -> [..., H]."""
        return self.text_projection(thinker_embeds)

    def project_hidden(self, thinker_hidden: torch.Tensor) -> torch.Tensor:
        """[..., Ht] thinker hidden states of layer `accept_hidden_layer` (multimodal positions) -> [..., H]."""
        return self.hidden_projection(thinker_hidden)

    def frame_input(self, codes: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
        """The talker input after one frame (MODEL_SPEC §8.4): the G code embeddings summed, plus the text.

        codes: [B, G] int64, code 0 (talker vocab) then codebooks 1..G-1; text_embed: [B, H] from
        TalkerPrompt.text_for_frame. Returns [B, 1, H].
        """
        embedded = F.embedding(codes + self.codec_offsets, self.codec_tables)  # [B, G, H], one gather
        # Summed over the frame in sequence order (code 0 first), as transformers does: fp32 matches bit for bit.
        summed = embedded.sum(1)
        return (summed + text_embed.to(summed.dtype))[:, None]

    def build_prompt(self, cfg: OmniConfig, input_ids: torch.Tensor, sequences: torch.Tensor,
                     thinker_embeds: torch.Tensor, thinker_hidden: torch.Tensor,
                     thinker_embedding: Callable[[torch.Tensor], torch.Tensor], speaker: str | int = "ethan",
                     attention_mask: torch.Tensor | None = None,
                     thinker_eos_token_id: int | Sequence[int] | None = None, *,
                     first_token_embeds: torch.Tensor | None = None,
                     upload: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TalkerPrompt:
        """The talker prefill from a finished (or running) thinker generation, as transformers' omni `generate`
        builds it (MODEL_SPEC §8.3).

        cfg: the whole model's config (chat and tts token ids live at its top level).
        input_ids: [B, L] the thinker prompt, left-padded, ending in `<|im_start|>assistant\\n`.
        sequences: [B, L + n] prompt + generated ids.
        thinker_embeds: [B, N, Ht] thinker layer-0 input (after the multimodal merge) of every position fed through
          the thinker (N = L + n - 1 after a finished generation; at least L + 1, i.e. t1 was fed).
        thinker_hidden: [B, N, Ht] thinker output of layer accept_hidden_layer - 1 (transformers'
          `hidden_states[accept_hidden_layer]`) at the same positions.
        thinker_embedding: the thinker's token embedding (thinker.model.embed_tokens), for tts_bos/eos/pad.
        speaker: a name in cfg.talker.speaker_id (any case) or a codec id.
        attention_mask: [B, L], 1 = real token; None = nothing padded.
        thinker_eos_token_id: the thinker's EOS id(s). Given, each row's trailing text ends with tts_eos right
          after its own first EOS and tts_pad from there (needed for batches whose rows stop at different steps).
        first_token_embeds: [B, Ht] the thinker embedding of t1, for a generation that has just begun (the
          scheduler's sessions): thinker_embeds / thinker_hidden then cover the prompt only (N = L), and
          `sequences` may be the prompt alone; the trailing text is then just tts_eos (a session feeds its
          text frame by frame, runtime/session.py).
        upload: host tensor -> the states' device (default `.to`). The layout (which positions are user, which
          multimodal, where the assistant turn starts) is read from the ids where they are: on the host, as the
          engine keeps them, nothing here waits for the device; the states are then gathered by index tensors
          that `upload` sends over (runtime/transfers.py: pinned, non-blocking). input_ids, attention_mask and
          sequences on the same device; the returned input_ids and attention_mask stay there.
        """
        talker_cfg = self.cfg
        batch, length = input_ids.shape
        device, states_device = input_ids.device, thinker_embeds.device
        upload = upload or (lambda t: t.to(states_device))
        if first_token_embeds is not None:
            # t1 is a text token: its embedding is its token embedding, and its hidden state is never read
            # (only multimodal user positions read thinker_hidden), so a zero row stands in for it.
            thinker_embeds = torch.cat((thinker_embeds, first_token_embeds[:, None].to(thinker_embeds.dtype)), dim=1)
            thinker_hidden = torch.cat((thinker_hidden, thinker_hidden.new_zeros(batch, 1, thinker_hidden.shape[-1])),
                                       dim=1)
        if sequences.shape[0] != batch or sequences.shape[1] < length:
            raise ValueError(f"sequences {tuple(sequences.shape)} must start with the prompt {tuple(input_ids.shape)}")
        if thinker_embeds.shape[:2] != thinker_hidden.shape[:2]:
            raise ValueError(f"thinker_embeds {tuple(thinker_embeds.shape)} and thinker_hidden "
                             f"{tuple(thinker_hidden.shape)} must cover the same positions")
        speaker_id = self._speaker_id(speaker)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

        # ---- user part: every token of every user turn, from its <|im_start|> to the next one.
        positions = torch.arange(length, device=device).expand(batch, -1)  # [B, L]
        turn_start = torch.where(input_ids == cfg.im_start_token_id, positions, -1).cummax(-1).values.clamp_min(0)
        role = input_ids.gather(1, (turn_start + 1).clamp_max(length - 1))  # [B, L] token after the turn's start
        is_user = (role == cfg.user_token_id) & mask  # [B, L]
        user_lengths = is_user.sum(-1)  # [B]
        width = int(user_lengths.max())
        # Right-align each row's user tokens in `width` slots, in order: sort user positions after all others and
        # keep the last `width`. A shorter row's leading (masked) slots then hold its last non-user positions, as
        # in transformers; their values never reach an unmasked output.
        order = torch.where(is_user, positions + length, positions).argsort(dim=-1, stable=True)[:, length - width:]

        multimodal = torch.isin(sequences[:, :length], torch.tensor(
            [cfg.thinker.audio_token_id, cfg.thinker.image_token_id, cfg.thinker.video_token_id], device=device))
        user_mm = multimodal.gather(1, order)  # [B, U]
        # Rows of the flattened states [B·N] each user slot reads, and the slots [B·U] they fill: multimodal ones
        # through the hidden projection, the others through the text projection, each set in row-major order (as
        # boolean-mask indexing takes them), all in one upload.
        source = (torch.arange(batch, device=device)[:, None] * thinker_embeds.shape[1] + order).reshape(-1)
        target = torch.arange(batch * width, device=device)
        picked = user_mm.reshape(-1)
        mm_count = int(picked.sum())
        text_count = batch * width - mm_count
        indices = upload(torch.cat((source[picked], target[picked], source[~picked], target[~picked])))
        mm_source, mm_target, text_source, text_target = indices.split([mm_count, mm_count, text_count, text_count])
        hidden_size = thinker_embeds.shape[-1]
        user_embeds = thinker_embeds.new_empty(batch * width, talker_cfg.text.hidden_size)  # [B·U, H]
        user_embeds[mm_target] = self.project_hidden(thinker_hidden.reshape(-1, hidden_size)[mm_source])
        user_embeds[text_target] = self.project_text(thinker_embeds.reshape(-1, hidden_size)[text_source])
        user_embeds = user_embeds.view(batch, width, -1)  # [B, U, H]
        user_ids = input_ids.gather(1, order)  # [B, U]
        user_mask = (torch.arange(width, device=device) >= (width - user_lengths)[:, None]).long()  # [B, U]

        # ---- assistant part: the last `<|im_start|> assistant` of the prompt (the same column in every row).
        starts = (input_ids[:, :-1] == cfg.im_start_token_id) & (input_ids[:, 1:] == cfg.assistant_token_id)
        if not starts.any(-1).all():
            raise ValueError("every prompt row must contain `<|im_start|>assistant` (the turn the talker speaks)")
        last_start = torch.where(starts, positions[:, :-1], -1).max(-1).values  # [B]
        if (last_start != last_start[0]).any():
            raise ValueError(f"the assistant turn starts at different columns per row ({last_start.tolist()}); "
                             "left-pad the prompt so that every row ends with it")
        start = int(last_start[0])
        if thinker_embeds.shape[1] < start + ASSISTANT_PREFIX + 1:
            raise ValueError(f"the thinker states cover {thinker_embeds.shape[1]} positions; the talker prompt needs "
                             f"{start + ASSISTANT_PREFIX + 1} (through the first generated text token)")

        # the tts text ids (thinker vocab), then the assistant prefix's codec ids: one upload
        ids = upload(torch.tensor([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id,
                                   talker_cfg.codec_nothink_id, talker_cfg.codec_think_bos_id,
                                   talker_cfg.codec_think_eos_id, speaker_id, talker_cfg.codec_pad_id,
                                   talker_cfg.codec_bos_id]))
        special, codec_ids = ids[:3], ids[3:]
        tts_bos, tts_eos, tts_pad = self.project_text(thinker_embedding(special)).to(user_embeds.dtype)  # 3 × [H]
        assistant_text = self.project_text(thinker_embeds[:, start:])  # [B, 3 + fed text tokens, H]
        text_side = torch.cat((
            assistant_text[:, :ASSISTANT_PREFIX],  # <|im_start|> assistant \n
            tts_pad.expand(batch, 4, -1),
            tts_bos.expand(batch, 1, -1),
            assistant_text[:, ASSISTANT_PREFIX:ASSISTANT_PREFIX + 1],  # t1
        ), dim=1)  # [B, 9, H]
        codec_side = self.model.codec_embedding(codec_ids).to(user_embeds.dtype)  # [6, H]
        assistant_embeds = text_side + torch.cat((codec_side.new_zeros(ASSISTANT_PREFIX, codec_side.shape[-1]),
                                                  codec_side))  # [B, 9, H]

        trailing = torch.cat((assistant_text[:, ASSISTANT_PREFIX + 1:], tts_eos.expand(batch, 1, -1)), dim=1)  # [B, T, H]
        if thinker_eos_token_id is not None:
            # trailing[j] is generated token j+1; a row whose first EOS is generated token e gets tts_eos at j = e.
            generated = sequences[:, length:]  # [B, n]
            eos_ids = torch.as_tensor(thinker_eos_token_id, device=device).reshape(-1)
            steps = torch.arange(generated.shape[1], device=device)
            first_eos = torch.where(torch.isin(generated, eos_ids), steps, generated.shape[1]).min(-1).values  # [B]
            slots = torch.arange(trailing.shape[1], device=device)[None, :, None]  # [1, T, 1]
            after, at = upload(torch.stack((slots > first_eos[:, None, None], slots == first_eos[:, None, None])))
            trailing = torch.where(after, tts_pad, trailing)
            trailing = torch.where(at, tts_eos, trailing)

        return TalkerPrompt(
            inputs_embeds=torch.cat((user_embeds, assistant_embeds), dim=1),
            input_ids=torch.cat((user_ids, user_ids.new_full((batch, 9), cfg.tts_pad_token_id)), dim=1),
            attention_mask=torch.cat((user_mask, user_mask.new_ones(batch, 9)), dim=1),
            trailing_text_hidden=trailing,
            tts_pad_embed=tts_pad,
        )

    def _speaker_id(self, speaker: str | int) -> int:
        if isinstance(speaker, int):
            return speaker
        speaker_id = self.cfg.speaker_id.get(speaker.lower())
        if speaker_id is None:
            raise ValueError(f"unknown speaker {speaker!r}; this checkpoint has {', '.join(sorted(self.cfg.speaker_id))}")
        return speaker_id

    # ------------------------------------------------------------------ forward

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: DynamicKVCache | None = None,
                num_logits_to_keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds: [B, L, H]; position_ids: [3, B, L] TM-RoPE (t, h, w) ids; attention_mask: [B, S]
        (1 = real token, left padding) covering the cache too, None when nothing is padded; cache: appended in
        place; num_logits_to_keep: logits for the last k positions only (generation needs 1).

        Returns (logits [B, L or k, V], hidden [B, L, H] after the final norm: the code predictor's input).
        """
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, batch, seq] TM-RoPE ids, got {tuple(position_ids.shape)}")
        hidden = self.model(inputs_embeds, position_ids, attention_mask, cache).hidden
        kept = hidden if num_logits_to_keep is None else hidden[:, -num_logits_to_keep:]
        return self.codec_head(kept), hidden

    def predict_frame(self, talker_hidden: torch.Tensor, code0: torch.Tensor, sample_fn: SampleFn | None = None,
                      return_logits: bool = False, frame_cache: FrameKVCache | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """talker_hidden: [B, H] final-norm hidden state that produced code0; code0: [B] int64 (talker vocab).
        Returns codes [B, G] (code0, then the code predictor's codebooks 1..G-1), and with return_logits the
        predictor's per-step logits [B, G-1, Vc]. sample_fn and frame_cache as in CodePredictor.predict_frame."""
        out = self.code_predictor.predict_frame(talker_hidden, self.model.codec_embedding(code0), sample_fn,
                                                return_logits, frame_cache)
        residual, logits = out if return_logits else (out, None)
        codes = torch.cat((code0[:, None], residual), dim=1)
        return (codes, logits) if return_logits else codes
