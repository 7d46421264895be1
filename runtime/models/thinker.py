"""The thinker (MODEL_SPEC §7): audio encoder + vision encoder + Qwen3-MoE text decoder + LM head.

    input_ids [B, L] --embed_tokens--> [B, L, H]
      audio features  -> rows where id == audio_token_id   (in order, across the batch)
      image features  -> rows where id == image_token_id
      video features  -> rows where id == video_token_id
    -> decoder with TM-RoPE ids from get_rope_index (or decode_position_ids when a cache is running),
       DeepStack features added at image ∪ video rows after the first layers
    -> lm_head -> logits [B, L, V]

Children carry the checkpoint's names under `thinker.`: `audio_tower`, `visual`, `model` (`embed_tokens`,
`layers.N`, `norm`) and `lm_head`, so runtime.weights.load_weights(thinker, dir, prefix="thinker.") fills it.

Shapes: B = batch, L = tokens this call, S = cached + new tokens, H = hidden_size, V = vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from runtime.config import DecoderConfig, ThinkerConfig
from runtime.kv_cache import DynamicKVCache
from runtime.models.audio_encoder import AudioEncoder
from runtime.models.decoder import Decoder, DeepStack
from runtime.models.vision_encoder import VisionEncoder
from runtime.rope_index import decode_position_ids, get_rope_index


class ThinkerTextModel(Decoder):
    """`thinker.model.`: the shared decoder plus its token embedding (not tied to lm_head)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


@dataclass
class MultimodalInputs:
    """Encoder inputs of one prompt batch, in transformers' processor names. Items are in batch-then-sequence
    order; every field is optional.

    input_features: [num_audios, num_mel_bins, T] log-mel, right-padded to the longest audio.
    feature_attention_mask: [num_audios, T], 1 = real frame (None: every frame is real).
    pixel_values: [num_image_patches, C*temporal_patch*patch*patch]; image_grid_thw: [num_images, 3].
    pixel_values_videos, video_grid_thw: the same for videos; video_second_per_grid: [num_videos] seconds.
    use_audio_in_video: videos carry their own audio track inside their span (MODEL_SPEC §4.2).
    """

    input_features: torch.Tensor | None = None
    feature_attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_second_per_grid: torch.Tensor | None = None
    use_audio_in_video: bool = False

    def audio_frames(self) -> torch.Tensor | None:
        """[num_audios] int64 mel frames per audio."""
        if self.input_features is None:
            return None
        if self.feature_attention_mask is None:
            count, _, frames = self.input_features.shape
            return torch.full((count,), frames, dtype=torch.long, device=self.input_features.device)
        return self.feature_attention_mask.sum(-1).long()


@dataclass
class ThinkerOutput:
    logits: torch.Tensor  # [B, L or num_logits_to_keep, V]
    position_ids: torch.Tensor  # [3, B, L] fp32 TM-RoPE ids used
    rope_deltas: torch.Tensor | None  # [B, 1] fp32, set by a prefill (empty cache); pass it to decode steps
    embeddings: torch.Tensor | None = None  # [B, L, H] decoder input after the multimodal merge (hidden states asked)
    # transformers' `hidden_states` (output_hidden_states=True): [0] = embeddings, [k] = output of layer k-1
    # (before DeepStack), the last entry the final-norm output (what the talker's accept_hidden_layer indexes).
    hidden_states: tuple[torch.Tensor, ...] | None = None
    selected_hidden: torch.Tensor | None = None  # [B, L, H] hidden_states[hidden_layer] (hidden_layer given)


class Thinker(nn.Module):
    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio)
        self.visual = VisionEncoder(cfg.vision)
        self.model = ThinkerTextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def new_cache(self) -> DynamicKVCache:
        return self.model.new_cache()

    # ------------------------------------------------------------------ encoders

    def encode_audio(self, inputs: MultimodalInputs) -> torch.Tensor:
        """[sum of audio tokens, H]: every audio's encoder output, concatenated in order. The valid frames of
        all audios go through the encoder in one call, as transformers does (the chunk padding, and so the
        result, depends on the whole batch: runtime.models.audio_encoder)."""
        features = inputs.input_features  # [num_audios, mel, T]
        if features.dim() != 3:
            raise ValueError(f"input_features must be [num_audios, num_mel_bins, frames], got {tuple(features.shape)}")
        mask = inputs.feature_attention_mask
        mask = torch.ones(features.shape[0], features.shape[2], dtype=torch.bool, device=features.device) \
            if mask is None else mask.bool()  # [num_audios, T]
        frames = features.transpose(1, 2)[mask].transpose(0, 1)  # [mel, valid frames of all audios]
        return self.audio_tower(frames, mask.sum(-1))

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeds [tokens, H], DeepStack levels, each [tokens, H]) for images or videos."""
        return self.visual(pixel_values, grid_thw)

    # ------------------------------------------------------------------ embedding merge

    def _scatter(self, embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor | None, what: str,
                 required: bool, upload: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """embeds [B, L, H]; mask [B, L] (where the ids are): write features [count, H] into the masked rows, in
        order, through the rows' flat indices (`upload`ed: no boolean mask on the device, whose size is a read)."""
        count = int(mask.sum())
        if features is None:
            if required and count:
                raise ValueError(f"the prompt has {count} {what} placeholder tokens but no {what} input was given")
            return embeds
        if features.shape[0] != count:
            raise ValueError(f"{what}: the prompt has {count} placeholder tokens but the encoder gave "
                             f"{features.shape[0]} {what} features")
        rows = upload(mask.reshape(-1).nonzero().squeeze(1))  # [count], row-major as a boolean mask takes them
        embeds = embeds.clone()
        embeds.view(-1, embeds.shape[-1])[rows] = features.to(embeds.dtype)
        return embeds

    def embed(self, input_ids: torch.Tensor, inputs: MultimodalInputs | None = None,
              required: bool = True, upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
              encode_vision: Callable | None = None) -> tuple[torch.Tensor, DeepStack | None]:
        """input_ids [B, L] -> (embeddings [B, L, H] with audio/image/video features scattered in,
        DeepStack over the visual rows or None).

        required: placeholders without the matching input are an error (prefill); decode steps embed any
        generated placeholder id as an ordinary token, as transformers does.
        upload: a tensor where the ids are -> the model's device (default `.to`). The placeholders are found
        where the ids are: the engine keeps a prompt's ids on the host, so counting and placing them reads
        nothing back from the device (runtime/prefill.py passes a pinned, non-blocking upload).
        encode_vision: (pixels, grid_thw) -> (embeds, DeepStack levels), default `self.encode_vision`
        (runtime/prefill.py passes the runner's captured stage).
        Raises ValueError when a modality's placeholder count differs from its feature count.
        """
        cfg = self.cfg
        inputs = inputs or MultimodalInputs()
        device = self.model.embed_tokens.weight.device
        upload = upload or (lambda t: t.to(device))
        embeds = self.model.embed_tokens(upload(input_ids))  # [B, L, H]

        audio = self.encode_audio(inputs) if inputs.input_features is not None else None
        embeds = self._scatter(embeds, input_ids == cfg.audio_token_id, audio, "audio", required, upload)

        levels: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (row mask [B, L], DeepStack levels)
        for what, pixels, grid, token in (("image", inputs.pixel_values, inputs.image_grid_thw, cfg.image_token_id),
                                          ("video", inputs.pixel_values_videos, inputs.video_grid_thw, cfg.video_token_id)):
            mask = input_ids == token
            if pixels is None:
                embeds = self._scatter(embeds, mask, None, what, required, upload)
                continue
            if grid is None:
                raise ValueError(f"{what} pixel values were given without their grid_thw")
            features, deepstack = (encode_vision or self.encode_vision)(pixels, grid)
            embeds = self._scatter(embeds, mask, features, what, required, upload)
            levels.append((upload(mask), deepstack))  # DeepStack adds by this mask on the device

        if not levels:
            return embeds, None
        # One visual mask over images and videos; each DeepStack level's rows laid out in sequence order.
        visual_mask = levels[0][0] if len(levels) == 1 else levels[0][0] | levels[1][0]  # [B, L]
        if len(levels) == 1:
            return embeds, DeepStack(visual_mask, list(levels[0][1]))
        joint = []
        for image_level, video_level in zip(levels[0][1], levels[1][1]):
            level = image_level.new_zeros(int(visual_mask.sum()), image_level.shape[-1])  # [visual tokens, H]
            level[levels[0][0][visual_mask]] = image_level
            level[levels[1][0][visual_mask]] = video_level
            joint.append(level)
        return embeds, DeepStack(visual_mask, joint)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inputs: MultimodalInputs | None = None, *, cache: DynamicKVCache | None = None,
                position_ids: torch.Tensor | None = None, rope_deltas: torch.Tensor | None = None,
                output_hidden_states: bool = False, hidden_layer: int | None = None,
                num_logits_to_keep: int | None = None) -> ThinkerOutput:
        """input_ids: [B, L]; attention_mask: [B, S] (1 = real token, left padding), covering the cache too;
        inputs: encoder inputs (prefill only); cache: appended in place.

        Positions: given, or from get_rope_index on a prefill (empty or no cache), or, for decode steps on a
        running cache, `decode_position_ids` from the prefill's `rope_deltas` (required then).
        output_hidden_states: every hidden state (`hidden_states`); hidden_layer: only hidden_states[k]
        (`selected_hidden`, what generation records for the talker). Either also sets `embeddings`.
        num_logits_to_keep: compute logits for the last k positions only (generation needs 1).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        inputs = inputs or MultimodalInputs()
        past = cache.seq_len if cache is not None else 0
        length = input_ids.shape[1]
        if attention_mask is not None and attention_mask.shape != (input_ids.shape[0], past + length):
            raise ValueError(f"attention_mask must be [batch, cached + new] = {[input_ids.shape[0], past + length]}, "
                             f"got {list(attention_mask.shape)}")
        if past + length > self.cfg.text.max_position_embeddings:
            raise ValueError(f"{past + length} tokens exceed the thinker's max_position_embeddings "
                             f"{self.cfg.text.max_position_embeddings}")

        embeds, deepstack = self.embed(input_ids, inputs, required=past == 0)
        if position_ids is None:
            if past == 0:
                position_ids, rope_deltas = get_rope_index(
                    input_ids, attention_mask, inputs.image_grid_thw, inputs.video_grid_thw, inputs.audio_frames(),
                    inputs.video_second_per_grid, inputs.use_audio_in_video, config=self.cfg)
            elif rope_deltas is None:
                raise ValueError("decoding on a running cache needs the prefill's rope_deltas (or position_ids)")
            else:
                position_ids = decode_position_ids(rope_deltas, past, length, attention_mask)

        every = list(range(self.cfg.text.num_layers + 1)) if output_hidden_states else []
        selected = [] if hidden_layer is None else [hidden_layer]
        logits, states = self.decode(embeds, position_ids, attention_mask, cache, deepstack,
                                     hidden_layers=every + selected, num_logits_to_keep=num_logits_to_keep)
        return ThinkerOutput(
            logits=logits,
            position_ids=position_ids,
            rope_deltas=rope_deltas,
            embeddings=embeds if every or selected else None,
            hidden_states=tuple(states[:len(every)]) if every else None,
            selected_hidden=states[-1] if selected else None,
        )

    def decode(self, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: DynamicKVCache | None = None, deepstack: DeepStack | None = None, *,
               hidden_layers: Sequence[int] = (), num_logits_to_keep: int | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The decoder step after the multimodal merge: the part export/wrappers.ThinkerStep exports and an
        `ort` backend (export/ort.py) replaces.

        embeds: [B, L, H]; position_ids: [3, B, L]; attention_mask: [B, S] or None; cache: appended in place;
        deepstack: DeepStack or None; hidden_layers: which of transformers' hidden_states to return.
        Returns (logits [B, k or L, V], [hidden_states[k] ([B, L, H]) for k in hidden_layers]).
        """
        num_layers = self.cfg.text.num_layers
        out = self.model(embeds, position_ids, attention_mask, cache, deepstack,
                         output_layers=any(0 < k < num_layers for k in hidden_layers))
        states = [embeds if k == 0 else out.hidden if k == num_layers else out.layer_outputs[k - 1]
                  for k in hidden_layers]
        hidden = out.hidden if num_logits_to_keep is None else out.hidden[:, -num_logits_to_keep:]
        return self.lm_head(hidden), states
