"""The talker's side of a scheduler tick (MODEL_SPEC §8-11): a session's talker prompt and prefill, its frames
(code 0 -> code predictor -> Code2Wav, made before code 0 is read, settled after) and the talker decode step that
follows each frame.

Frame loop of one session (as transformers' `generate`, sampled with the request's talker and code-predictor
parameters inside the runner's steps; greedy = `talker_do_sample=False, talker_repetition_penalty=1.0`):
    prefill the talker prompt -> logits of its last position -> code 0 (control ids suppressed, sampled)
    per frame k: the code predictor fills codebooks 1..G-1 from (talker hidden, code 0: both on the device by
                 slot); Code2Wav decodes the frame's final samples from the session's streaming state. Both are
                 launched right behind the step that sampled code 0, before it is read (`make_frames`)
                 next talker input = frame_input(codes_k, text of frame k) -> one talker step -> code 0, the
                 input built inside that step from per-slot device state (runtime/decode_inputs.py), its text (a
                 fed token, tts_eos or tts_pad) read there from the thinker's token history; the host only
                 decides when the text is ready (runtime/session.py text_ready) and, once, that it has ended
                 (`end_text`)
    code 0 reaches the host with the tick's one read-back (runtime/scheduler.py): the frame made from it is then
    kept, or dropped at codec EOS or at the last allowed step (`settle_frame`; runtime/session.py holds the rules).

Shapes: B = sessions in one batched step, P = talker prompt length, G = num_code_groups, H = hidden size.
"""

from __future__ import annotations

import torch

from runtime.models.talker import TalkerPrompt
from runtime.prefill import talker_prefill
from runtime.rope_index import get_rope_index
from runtime.session import Session, TalkerProgress


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


def start_talker(runner, session: Session) -> None:
    """The talker prompt of a session whose thinker prefill has just given t1 (MODEL_SPEC §8.3: it needs only
    the prompt's states and t1), prefilled into the session's talker slot: code 0 of the first frame."""
    model, cfg = runner.model, runner.config
    prompt, th = session.request.prompt, session.thinker
    embeds = torch.cat([e for e, _ in th.states], dim=1)  # [1, L, Ht]
    accepted = torch.cat([a for _, a in th.states], dim=1)
    th.states = []
    if runner.talker_stream is not None:  # made on the main stream, read on the talker's: keep their memory
        for tensor in (embeds, accepted, th.next_token):  # until the talker stream is done with it
            tensor.record_stream(runner.talker_stream)
    embed_tokens = model.thinker.model.embed_tokens
    # the layout from the prompt's ids on the host (runtime/engine.py Prompt), the states gathered on the device
    talker_prompt = model.talker.build_prompt(cfg, prompt.input_ids, prompt.input_ids, embeds, accepted, embed_tokens,
                                              session.options.speaker or "ethan",
                                              first_token_embeds=embed_tokens(th.next_token),
                                              upload=runner.transfers.upload)
    inputs = prompt.inputs
    positions = runner.transfers.upload(talker_position_ids(  # from the host ids too
        talker_prompt, cfg, inputs.image_grid_thw, inputs.video_grid_thw, inputs.audio_frames(),
        inputs.video_second_per_grid, inputs.use_audio_in_video))
    logits, hidden = talker_prefill(runner, talker_prompt.inputs_embeds, positions, session.slot)
    runner.talker_inputs.start(session.slot, positions[:, :, -1], th.prompt_len)
    runner.first_code0(logits, hidden, session.slot)
    session.talker = TalkerProgress(talker_prompt.inputs_embeds.shape[1], drawn=True)


def make_frames(runner, sessions: list[Session]) -> None:
    """Each session's next frame, launched right behind the talker step (or prefill) that sampled its code 0, before
    that code 0 is read: the code predictor's frame (one batch) and Code2Wav (sessions on their first frame in one
    batch, the others in another) run on the device from code 0 where it is, and leave the frame's codes and
    samples in the slot's state there. Each frame waits (`TalkerProgress.pending`) until the tick's read-back says
    whether code 0 ended the speech (`settle_frame`), so a packet is out at the end of the tick that sampled its
    code 0. The model work comes first and the sessions change only after it all succeeded, so a failed batch can
    be retried row by row (Code2Wav's conv states are the exception: they update in place, layer by layer)."""
    predictor_span = runner.timer.start()  # GPU time on a GPU: CUDA events on this stream (runtime/timing.py)
    runner.code_predictor_frame([s.slot for s in sessions])  # code 0 and its talker state are on the device by slot
    predictor_span.stop()
    spans = [None] * len(sessions)
    for first in (True, False):
        rows = [r for r, s in enumerate(sessions) if (s.talker.frame == 0) == first]
        if rows:
            span = runner.timer.start()
            runner.code2wav_frame([sessions[r].slot for r in rows], first)  # the frames the code predictor left
            span.stop()
            for r in rows:
                spans[r] = span
    for row, session in enumerate(sessions):
        session.talker.pending = (runner.frame(session.slot, first=session.talker.frame == 0), predictor_span,
                                  spans[row])


def settle_frame(session: Session) -> None:
    """Once a frame's code 0 is read: the frame waiting in the slot's state becomes the session's next frame (its
    codes and samples start their copy to the host), or is dropped when code 0 ends the speech (codec EOS, or the
    last allowed step: as if it had never been made)."""
    tk = session.talker
    (codes, samples), predictor_span, code2wav_span = tk.pending
    tk.pending = None
    if session.speech_ends(tk.code0_value):
        session.end_speech()
        return
    tk.drawn, tk.code0_value, tk.ready = False, None, True
    session.add_frame(codes, samples, predictor_span, code2wav_span)


def talker_decode(runner, sessions: list[Session]) -> None:
    """One talker step for every session whose last frame and its text are ready: code 0 of its next frame. The
    step builds each input on the device from the slot's last frame, position and text (runtime/decode_inputs.py)."""
    longest = max(s.talker.prompt_len + s.talker.frame for s in sessions)
    runner.talker_decode([s.slot for s in sessions], longest)
    for session in sessions:
        session.talker.ready, session.talker.drawn = False, True
