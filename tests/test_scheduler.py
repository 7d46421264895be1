"""The scheduler: sessions in slots of static KV caches, advanced together.

Each session, whatever runs beside it (other prompts and lengths, chunked prefills, sessions that wait for a
slot, one that is cancelled or fails, a slot left dirty by its last user), produces exactly what it gives
alone (`generate` of that one request; tests/test_generate.py checks that against transformers). The
requests sample with the checkpoint's defaults (the talker and code predictor sample) and a seed each: a
sampled session is as independent of its neighbours as a greedy one.
"""

import pytest
import torch

from runtime.engine import OmniEngine
from runtime.kv_cache import DynamicKVCache, StaticKVCache
from runtime.runner import prefill_buckets
from runtime.scheduler import Scheduler
from runtime.streaming import AudioChunk, TextDelta, consume_together
from tests.oracle import build_oracle, rel_err
from tests.test_generate import (ORACLE_SEEDS, VISION_END, _audio_prompt, _audio_span, _chat, _text,
                                 audio_request, image_request, speech_request, video_request)

THINKER_TOKENS, TALKER_TOKENS = 7, 11


@pytest.fixture(scope="module", params=["pow2", "odd"])
def engine(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_oracle(request.param, path, seed=ORACLE_SEEDS[request.param])  # weights whose talker speaks
    return OmniEngine.from_pretrained(path)


def _sharing(engine, **scheduler_options) -> OmniEngine:
    """The same model behind a fresh scheduler with these options."""
    return OmniEngine(engine.config, engine.model, engine.tokenizer, engine.device, engine.dtype, scheduler_options)


def _requests(engine, count: int) -> list[tuple[dict, object]]:
    """`count` different prompts (audio, image, audio + image; different lengths) with their offline results;
    the first three speak at least 2 frames, the last one asks for text only."""
    makers = [audio_request, image_request, lambda cfg: image_request(cfg, with_audio=True), audio_request]
    pairs = []
    for i in range(count):
        kwargs = dict(max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS, seed=1000 + i)
        if i == count - 1:
            request = dict(makers[i % len(makers)](engine.config), **kwargs)
            pairs.append((dict(request, return_audio=False), engine.generate(**request, return_audio=False)))
        else:
            pairs.append(speech_request(engine, min_frames=2, make_request=makers[i % len(makers)], **kwargs))
    return pairs


def _check_alone(engine, request, offline, events):
    """Streamed tokens, codes and audio equal the offline result of the request alone."""
    prompt_len = request["input_ids"].shape[1]
    streamed = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    assert streamed == [t for t in offline.sequences[0, prompt_len:].tolist() if t != engine.config.im_end_token_id]
    audio = [e for e in events if isinstance(e, AudioChunk)]
    if request.get("return_audio", True) is False:
        assert not audio
        return
    assert torch.equal(torch.cat([c.codes for c in audio], dim=-1), offline.codes[0])
    wave = torch.cat([c.samples for c in audio])
    assert wave.numel() == offline.waveform.shape[-1]
    assert rel_err(wave, offline.waveform[0]) <= 1e-5


def test_concurrent_sessions_each_equal_alone(engine):
    pairs = _requests(engine, 4)
    served = _sharing(engine, max_sessions=4, prefill_chunk=8)
    streams = [served.stream(**request, chunk_frames=2) for request, _ in pairs]
    for (request, offline), events in zip(pairs, consume_together(streams)):
        _check_alone(engine, request, offline, events)
    scheduler = served.scheduler
    assert scheduler.idle and sorted(scheduler.free_slots) == list(range(4))


def test_more_sessions_than_slots_wait_their_turn(engine):
    pairs = _requests(engine, 4)
    served = _sharing(engine, max_sessions=2)
    streams = [served.stream(**request) for request, _ in pairs]
    # Read on the engine loop's thread, after one tick that has seen all four requests.
    live, waiting = served.loop.call(lambda scheduler: (len(scheduler.live), len(scheduler.waiting)), after_tick=True)
    assert live == 2 and waiting == 2
    for (request, offline), events in zip(pairs, consume_together(streams)):
        _check_alone(engine, request, offline, events)


def test_chunked_prefill_equals_one_prefill(engine):
    """Prefill chunks of a few tokens (DeepStack features sliced per chunk for the image) change nothing."""
    for prefill_chunk in (1, 5):
        request, offline = speech_request(engine, min_frames=2, make_request=image_request,
                                          max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS, seed=11)
        events = list(_sharing(engine, prefill_chunk=prefill_chunk).stream(**request))
        _check_alone(engine, request, offline, events)


def test_prefill_buckets():
    assert prefill_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_buckets(40) == [16, 32, 40]
    assert prefill_buckets(7) == [7]


def test_static_prefill_chunks_equal_offline(engine):
    """Prefill chunks front-padded to static buckets (what the CUDA graphs capture; DeepStack additions dense)
    change nothing, alone and beside other sessions."""
    request, offline = speech_request(engine, min_frames=2, make_request=image_request,
                                      max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS, seed=12)
    prompt_len = request["input_ids"].shape[1]
    assert prompt_len > 24 and prompt_len % 24 not in (0, 16), "the last chunk must need padding"
    for prefill_chunk in (24, prompt_len + 5):  # several chunks, the last padded / one padded chunk
        served = _sharing(engine, prefill_chunk=prefill_chunk, static_prefill=True)
        assert served.scheduler.runner.prefill_buckets[-1] == prefill_chunk
        _check_alone(engine, request, offline, list(served.stream(**request)))
    pairs = [(request, offline)] + _requests(engine, 2)
    served = _sharing(engine, max_sessions=3, prefill_chunk=24, static_prefill=True)
    for (each, alone), events in zip(pairs, consume_together([served.stream(**r) for r, _ in pairs])):
        _check_alone(engine, each, alone, events)


def test_graphs_need_static_prefill(engine):
    with pytest.raises(ValueError, match="use_graphs=True needs static_prefill=True"):
        Scheduler(engine, use_graphs=True, static_prefill=False)


def test_cancelled_session_frees_its_slot_others_unaffected(engine):
    pairs = _requests(engine, 2)
    served = _sharing(engine, max_sessions=2)
    scheduler = served.scheduler
    doomed = served.stream(**pairs[0][0])
    kept = served.stream(**pairs[1][0])
    doomed_events, kept_events = iter(doomed), []
    kept_iter = iter(kept)
    next(doomed_events)
    kept_events.append(next(kept_iter))
    doomed_slot = doomed.session.slot  # admitted: it has produced an event
    doomed.cancel()
    assert doomed.session.state == "cancelled" and doomed.session.slot is None
    # read on the loop's thread; the kept session may have finished meanwhile, and then its slot is free too
    free, kept_slot = served.loop.call(lambda scheduler: (sorted(scheduler.free_slots), kept.session.slot))
    assert doomed_slot in free and len(free) == 2 - (kept_slot is not None)
    with pytest.raises(StopIteration):
        next(doomed_events)
    kept_events.extend(kept_iter)
    _check_alone(engine, pairs[1][0], pairs[1][1], kept_events)
    assert scheduler.idle and sorted(scheduler.free_slots) == [0, 1]


def test_failed_session_raises_and_the_engine_keeps_serving(engine, monkeypatch):
    pairs = _requests(engine, 2)
    served = _sharing(engine, max_sessions=2)
    audio_tower = engine.model.thinker.audio_tower
    real_forward = audio_tower.forward
    failures = []

    def fail_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected encoder fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(audio_tower, "forward", fail_once)
    failing = served.stream(**pairs[0][0])  # an audio prompt: its prefill runs the encoder first
    other = served.stream(**pairs[1][0])
    with pytest.raises(RuntimeError, match="injected encoder fault"):
        list(failing)
    assert failing.session.state == "failed"
    _check_alone(engine, pairs[1][0], pairs[1][1], list(other))
    again = served.stream(**pairs[0][0])  # the same request now succeeds: nothing was left behind
    _check_alone(engine, pairs[0][0], pairs[0][1], list(again))
    assert served.scheduler.idle and len(served.scheduler.free_slots) == 2


def test_a_failing_row_fails_alone_beside_three_good_sessions(engine, monkeypatch):
    """A batched thinker step that raises for one session is retried row by row: that session fails with its
    error, the three beside it finish exactly as alone, and the engine keeps serving."""
    pairs = _requests(engine, 4)
    served = _sharing(engine, max_sessions=4)
    scheduler = served.scheduler
    runner = scheduler.runner
    real_decode = runner.thinker_decode
    poisoned = 2  # the third request (session ids count submits)
    failed_batches = []

    def decode(slots, longest):  # runs on the engine loop's thread, beside the scheduler
        if any(s.id == poisoned and s.slot in slots for s in scheduler.live):
            failed_batches.append(len(slots))
            raise RuntimeError(f"injected fault in session {poisoned}")
        return real_decode(slots, longest)

    monkeypatch.setattr(runner, "thinker_decode", decode)
    streams = [served.stream(**request) for request, _ in pairs]
    for i, ((request, offline), stream) in enumerate(zip(pairs, streams)):
        if i == poisoned:
            with pytest.raises(RuntimeError, match="injected fault in session 2"):
                list(stream)
            assert stream.session.state == "failed"
        else:
            _check_alone(engine, request, offline, list(stream))
    assert max(failed_batches) > 1 and failed_batches[-1] == 1, "it failed in a batch first, then alone"
    monkeypatch.setattr(runner, "thinker_decode", real_decode)
    request, offline = pairs[poisoned]
    _check_alone(engine, request, offline, list(served.stream(**request)))
    assert served.loop.call(lambda scheduler: (scheduler.idle, sorted(scheduler.free_slots))) == (True, [0, 1, 2, 3])


def test_a_slot_is_reset_on_admission(engine):
    """Whatever a slot's last user left (KV lengths, a Code2Wav stream mid-way, sampling steps, seeds and
    histories), a new session starts clean."""
    pairs = _requests(engine, 2)
    served = _sharing(engine, max_sessions=2)
    runner = served.scheduler.runner  # the loop has not started: nothing else touches the runner yet
    runner.thinker_cache.lengths.fill_(7)
    runner.talker_cache.lengths.fill_(5)
    runner.code2wav_slots.frames.fill_(3)
    for pool in (*runner.code2wav_slots.conv.values(), *runner.code2wav_slots.tails.values()):
        pool.normal_()
    for state in runner.sampling.values():
        state.steps.fill_(9)
        state.seeds.fill_(5)
        state.history.fill_(3)
        state.filled.fill_(2)
        state.params.temperature.fill_(7.0)
    for (request, offline), events in zip(pairs, consume_together([served.stream(**r) for r, _ in pairs])):
        _check_alone(engine, request, offline, events)


def test_requests_that_cannot_fit_are_refused_before_any_work(engine, monkeypatch):
    served = _sharing(engine, max_sessions=1, max_seq_len=64)
    calls = []
    monkeypatch.setattr(engine.model.thinker.model, "forward", lambda *a, **k: calls.append(1))
    request = audio_request(engine.config)
    length = request["input_ids"].shape[1]
    with pytest.raises(ValueError, match="exceeds the scheduler's 64 tokens per session"):
        served.stream(**request, max_new_tokens=64)
    assert length > 64 or not calls
    short = dict(input_ids=torch.tensor([_chat(engine.config, _text(2), system=False)]))
    with pytest.raises(ValueError, match="talker needs up to"):
        served.stream(**short, max_new_tokens=4, return_audio=True, talker_max_new_tokens=200)
    assert not calls and served.scheduler.idle


# ---------------------------------------------------------------------------------------------- static cache


@torch.no_grad()
def test_static_cache_equals_dynamic_and_padded_rows_touch_nothing(engine):
    """Two sessions in slots 2 and 0 of a static cache, decoded in one batch with a padded row: logits equal
    each session decoded alone on a dynamic cache; the padded row writes only the scratch slot."""
    thinker, cfg = engine.model.thinker, engine.config.thinker.text
    cache = StaticKVCache.for_decoder(cfg, 3, 40, torch.float32, "cpu")
    prompts = [torch.randint(11, 470, (1, n)) for n in (9, 4)]
    slots = [2, 0]
    alone, last = [], []
    for ids, slot in zip(prompts, slots):
        dynamic = thinker.new_cache()
        out = thinker(ids, cache=dynamic, num_logits_to_keep=1)
        view = cache.view(torch.tensor([slot]), ids.shape[1], ids.shape[1])
        static_out = thinker.model(thinker.model.embed_tokens(ids), out.position_ids, None, view)
        view.commit()
        assert rel_err(thinker.lm_head(static_out.hidden[:, -1]), out.logits[:, -1]) <= 1e-5
        token = out.logits[:, -1].argmax(-1)
        positions = out.position_ids[:, :, -1:] + 1
        alone.append(thinker(token[:, None], cache=dynamic, position_ids=positions).logits[0, -1])
        last.append((token, positions))
    untouched = cache.keys[:, 1].clone()
    tokens = torch.cat([t for t, _ in last] + [last[0][0]])
    positions = torch.cat([p for _, p in last] + [last[0][1]], dim=1)
    view = cache.view(torch.tensor(slots + [-1]), 1, 10)
    hidden = thinker.model(thinker.model.embed_tokens(tokens[:, None]), positions, None, view).hidden
    view.commit()
    logits = thinker.lm_head(hidden[:, -1])
    for row in range(2):
        assert rel_err(logits[row], alone[row]) <= 1e-5
    assert cache.lengths.tolist() == [5, 0, 10, 0]
    assert torch.equal(cache.keys[:, 1], untouched), "a padded row wrote into a free slot"


def test_static_cache_refuses_overflow():
    cache = StaticKVCache(1, 2, 8, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="9 tokens exceed this cache's 8 tokens per session"):
        cache.view(torch.tensor([0]), 1, 9)
    assert isinstance(DynamicKVCache(1).seq_len, int)


def test_each_frame_is_made_in_the_tick_that_samples_its_code_0(engine, monkeypatch):
    """Every frame (code predictor, Code2Wav) is launched right behind the step that sampled its code 0, before
    that code 0 is read, and settled by the same tick's read-back: the first one behind the talker prefill,
    ahead of that tick's thinker step; later ones behind the talker step, after the thinker step they overlap.
    Each packet is out at the end of the tick that sampled its code 0. The output is the same."""
    from runtime import scheduler as scheduler_module

    request, offline = speech_request(engine, min_frames=3, max_new_tokens=THINKER_TOKENS,
                                      talker_max_new_tokens=TALKER_TOKENS, seed=2024)
    order = []
    speech = scheduler_module.speech
    make_frames, talker_decode, settle = speech.make_frames, speech.talker_decode, speech.settle_frame
    thinker_decode, step = Scheduler._thinker_decode, Scheduler.step
    monkeypatch.setattr(speech, "make_frames", lambda runner, sessions: order.append(
        ("frames", min(s.talker.frame for s in sessions))) or make_frames(runner, sessions))
    monkeypatch.setattr(speech, "talker_decode", lambda runner, sessions: order.append(("talker", None))
                        or talker_decode(runner, sessions))
    monkeypatch.setattr(speech, "settle_frame", lambda session: order.append(("settled", session.talker.frame))
                        or settle(session))
    monkeypatch.setattr(Scheduler, "_thinker_decode", lambda self, sessions, ahead=0: order.append(("thinker", None))
                        or thinker_decode(self, sessions, ahead))
    monkeypatch.setattr(Scheduler, "step", lambda self: order.append(("tick", None)) or step(self))
    events = list(_sharing(engine).stream(**request))
    _check_alone(engine, request, offline, events)
    ticks, current = [], None
    for event in order:
        if event[0] == "tick":
            current = []
            ticks.append(current)
        else:
            current.append(event)
    first = next(t for t in ticks if ("frames", 0) in t)
    assert first == [("frames", 0), ("thinker", None), ("settled", 0)], first  # ahead of the thinker, then read
    later = [t for t in ticks if any(e[0] == "frames" and e[1] > 0 for e in t)]
    assert len(later) >= 2, "lengthen the request"
    for tick in later:  # the thinker steps (while text goes on), the talker step, its frame, the read settling it
        frame = next(e[1] for e in tick if e[0] == "frames")
        assert tick[-3:] == [("talker", None), ("frames", frame), ("settled", frame)], tick
        assert set(tick[:-3]) <= {("thinker", None)}, tick
    assert any(tick[0] == ("thinker", None) for tick in later), "no frame beside a thinker step: lengthen the request"
    assert [e.frame for e in events if isinstance(e, AudioChunk)] == list(range(offline.codes.shape[-1]))


def test_the_talker_starts_before_the_first_token_is_read(engine, monkeypatch):
    """At the prompt's end the talker's prompt and prefill are launched before t1 is read back, and that read
    does not wait for the talker's stream: on a GPU the talker prefill queues right behind the thinker's."""
    from runtime import scheduler as scheduler_module

    request, offline = speech_request(engine, min_frames=2, max_new_tokens=THINKER_TOKENS,
                                      talker_max_new_tokens=TALKER_TOKENS, seed=77)
    served = _sharing(engine)
    runner = served.scheduler.runner  # the loop has not started: nothing else touches the runner yet
    order = []
    start_talker, read_tick = scheduler_module.speech.start_talker, runner.read_tick
    monkeypatch.setattr(scheduler_module.speech, "start_talker",
                        lambda *args: order.append("start_talker") or start_talker(*args))
    monkeypatch.setattr(runner, "read_tick", lambda talker=True: order.append(("read", talker))
                        or read_tick(talker=talker))
    _check_alone(engine, request, offline, list(served.stream(**request)))
    assert order[:2] == ["start_talker", ("read", False)], order[:4]
    assert ("read", True) in order[2:]  # the ticks' reads, with the talker's code 0, wait for its stream


def test_a_text_that_ends_at_its_first_token_speaks_nothing(engine, monkeypatch):
    """t1 = EOS: the talker, started before t1 was read, is dropped; no audio, no text, the slot is freed and
    the next request in it is served as alone."""
    request, offline = speech_request(engine, min_frames=2, max_new_tokens=THINKER_TOKENS,
                                      talker_max_new_tokens=TALKER_TOKENS, seed=78)
    served = _sharing(engine, max_sessions=1)
    runner = served.scheduler.runner
    first_token, eos = runner.first_token, engine.config.im_end_token_id

    def ends_at_once(logits, slot, last_positions):  # t1 = EOS, where the talker and the read-back find it
        token = first_token(logits, slot, last_positions).fill_(eos)
        runner.thinker_inputs.tokens[slot] = runner.thinker_inputs.ring[0, slot] = eos
        return token

    monkeypatch.setattr(runner, "first_token", ends_at_once)
    stream = served.stream(**request)
    assert list(stream) == [] and stream.session.state == "finished"
    assert stream.session.talker is not None and stream.session.talker.done  # it had started
    monkeypatch.setattr(runner, "first_token", first_token)
    _check_alone(engine, request, offline, list(served.stream(**request)))
    assert served.loop.call(lambda scheduler: (scheduler.idle, scheduler.free_slots)) == (True, [0])


@pytest.mark.parametrize("frames", [83, 100, 250, 420])
def test_static_prefill_encodes_one_audio_in_its_chunk_bucket(engine, monkeypatch, frames):
    """With static prefill (what CUDA graphs capture) a prompt's audio goes through the `audio_encoder` stage of
    its chunk bucket (zero-padded whole chunks, padded slots masked: AudioEncoder.forward_chunks), and the
    session equals the offline result, which encodes it the general way. An audio shorter than a chunk is
    encoded eagerly: transformers pads it to its own length, not to a full chunk, so the stage's layout would
    differ."""
    cfg = engine.config
    request = dict(input_ids=_audio_prompt(cfg, frames),
                   input_features=torch.randn(1, cfg.thinker.audio.num_mel_bins, frames),
                   feature_attention_mask=torch.ones(1, frames, dtype=torch.long), max_new_tokens=THINKER_TOKENS,
                   talker_max_new_tokens=TALKER_TOKENS, seed=5)
    offline = engine.generate(**request, return_audio=True)
    served = _sharing(engine, static_prefill=True)
    runner = served.scheduler.runner
    stages, run = [], runner.run
    monkeypatch.setattr(runner, "run", lambda name, inputs: stages.append(
        (name, inputs[0].shape[1] if name == "audio_encoder" else None)) or run(name, inputs))
    events = list(served.stream(**request))
    chunk = 2 * cfg.thinker.audio.n_window
    bucket = next(size for size in runner.audio_buckets if size * chunk >= frames)
    encoded = [stage for stage in stages if stage[0] == "audio_encoder"]
    assert encoded == ([("audio_encoder", bucket)] if frames >= chunk else []), encoded
    _check_alone(engine, request, offline, events)


@pytest.mark.parametrize("frames", [(250, 40), (30, 3330)])
def test_static_prefill_encodes_several_and_long_audios_in_pieces(engine, monkeypatch, frames):
    """Several audios in one prompt (one shorter than a chunk), and one longer than the largest chunk
    bucket, go through the `audio_encoder` stage too: each audio in pieces of whole attention windows, each piece
    in its bucket; the session equals the offline result, whose encoder takes all audios in one padded batch
    as transformers does."""
    cfg = engine.config
    audio, longest = cfg.thinker.audio, max(frames)
    mask = torch.zeros(len(frames), longest, dtype=torch.long)
    for row, length in enumerate(frames):
        mask[row, :length] = 1
    features = torch.randn(len(frames), audio.num_mel_bins, longest) * mask[:, None]
    user = [t for length in frames for t in _audio_span(cfg, length)] + _text(4)
    request = dict(input_ids=torch.tensor([_chat(cfg, user)]), input_features=features, feature_attention_mask=mask,
                   max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS, seed=6)
    offline = engine.generate(**request, return_audio=True)
    served = _sharing(engine, static_prefill=True)
    runner = served.scheduler.runner
    pieces, run = [], runner.run
    monkeypatch.setattr(runner, "run", lambda name, inputs: (pieces.append(inputs[0].shape[1])
                                                             if name == "audio_encoder" else None) or run(name, inputs))
    events = list(served.stream(**request))
    chunk, largest = 2 * audio.n_window, runner.audio_buckets[-1]
    want = []
    for length in frames:
        for start in range(0, length, largest * chunk):
            count = -(-min(largest * chunk, length - start) // chunk)
            want.append(next(size for size in runner.audio_buckets if size >= count))
    assert pieces == want and len(pieces) >= len(frames) + (max(frames) > largest * chunk), pieces
    _check_alone(engine, request, offline, events)


def _two_images(cfg) -> dict:
    """A user turn with two random images of different sizes (4 x 6 and 2 x 4 patches)."""
    first, second = image_request(cfg), image_request(cfg)
    vision = cfg.thinker.vision
    merge, patch_dim = vision.spatial_merge_size, second["pixel_values"].shape[1]
    small = torch.tensor([[1, merge, 2 * merge]])
    span = ([cfg.thinker.vision_start_token_id] + [cfg.thinker.image_token_id] * (int(small.prod()) // merge ** 2)
            + [VISION_END])
    ids = first["input_ids"][0].tolist()
    at = ids.index(cfg.thinker.vision_start_token_id)
    return dict(input_ids=torch.tensor([ids[:at] + span + ids[at:]]),
                pixel_values=torch.cat((torch.randn(int(small.prod()), patch_dim), first["pixel_values"])),
                image_grid_thw=torch.cat((small, first["image_grid_thw"])))


@pytest.mark.parametrize("make_request", [image_request, lambda cfg: image_request(cfg, with_audio=True),
                                          video_request, _two_images], ids=["image", "image+audio", "video", "2 images"])
def test_static_prefill_encodes_each_vision_frame_in_its_patch_bucket(engine, monkeypatch, make_request):
    """With static prefill every frame of every image or video goes through the `vision_encoder` stage of its
    patch bucket (zero-padded patches masked as keys: VisionEncoder.forward_segment), and the session equals the
    offline result, whose encoder takes all items in one call; a frame past max_vision_patches is encoded
    eagerly."""
    request, offline = speech_request(engine, min_frames=2, make_request=make_request, max_new_tokens=THINKER_TOKENS,
                                      talker_max_new_tokens=TALKER_TOKENS, seed=8)
    grid = request.get("image_grid_thw", request.get("video_grid_thw")).tolist()
    for limit in (64, 16):  # every frame fits; only 4 x 4 frames fit (the video's)
        buckets = [size for size in (16, 32, 64) if size <= limit]
        fits = max(h * w for _, h, w in grid) <= limit
        want = [next(b for b in buckets if b >= h * w) for t, h, w in grid for _ in range(t)] if fits else []
        served = _sharing(engine, static_prefill=True, max_vision_patches=limit)
        runner = served.scheduler.runner
        stages, run = [], runner.run
        monkeypatch.setattr(runner, "run", lambda name, inputs: (stages.append(inputs[0].shape[1])
                                                                 if name == "vision_encoder" else None) or run(name, inputs))
        events = list(served.stream(**request))
        assert stages == want, (limit, stages)
        _check_alone(engine, request, offline, events)


def test_a_first_frame_made_from_an_end_of_speech_code_0_is_dropped_and_stays_in_the_codebook(engine, monkeypatch):
    """The first frame is made before its code 0 is read; when that code 0 is the codec's end of speech the
    frame is dropped: no audio, the text unchanged, the session finishes and its slot is served again. Code2Wav
    met the end-of-speech id there (past its codebook: an embedding lookup out of range, a device assert on a
    GPU): code 0 stands in for it inside the codebook (ModelRunner.in_codebook)."""
    request, offline = speech_request(engine, min_frames=2, max_new_tokens=THINKER_TOKENS,
                                      talker_max_new_tokens=TALKER_TOKENS, seed=79)
    served = _sharing(engine, max_sessions=1)
    runner = served.scheduler.runner
    codec_eos = engine.model.talker.cfg.codec_eos_token_id
    assert codec_eos >= engine.config.code2wav.codebook_size
    first_code0, code2wav_frame, made = runner.first_code0, runner.code2wav_frame, []

    def end_of_speech(logits, hidden, slot):  # the sampled code 0 is the end of speech, where the frame reads it
        first_code0(logits, hidden, slot)
        runner.talker_inputs.code0[slot] = codec_eos

    monkeypatch.setattr(runner, "first_code0", end_of_speech)
    monkeypatch.setattr(runner, "code2wav_frame", lambda *args: made.append(1) or code2wav_frame(*args))
    events = list(served.stream(**request))
    assert made and not any(isinstance(e, AudioChunk) for e in events)  # made, then dropped
    prompt_len = request["input_ids"].shape[1]
    assert [t for e in events for t in e.token_ids] == [
        t for t in offline.sequences[0, prompt_len:].tolist() if t != engine.config.im_end_token_id]
    monkeypatch.setattr(runner, "first_code0", first_code0)
    monkeypatch.setattr(runner, "code2wav_frame", code2wav_frame)
    _check_alone(engine, request, offline, list(served.stream(**request)))


@pytest.mark.parametrize("return_audio", [True, False])
def test_the_thinker_runs_ahead_on_ticks_without_talker_work(engine, monkeypatch, return_audio):
    """A tick with talker work steps the thinker once (it overlaps the talker's frame and stays a token ahead of
    it); a tick without (text only, or after a short speech has ended) steps it up to `thinker_steps` times, read
    together, never past max_new_tokens (the cut exercised: 9 tokens); the tick that ends the prompt steps once.
    Tokens, codes and audio equal one step per tick and the offline result."""
    from runtime import scheduler as scheduler_module

    max_new = 9
    request, offline = speech_request(engine, min_frames=2, max_new_tokens=max_new, talker_max_new_tokens=3,
                                      seed=81)  # two frames: the speech ends well before the text
    request = dict(request, return_audio=return_audio)
    generated = offline.sequences.shape[1] - request["input_ids"].shape[1]  # EOS included, if it came
    assert generated > 5, "lengthen the text"
    prompt_len = request["input_ids"].shape[1]
    talker_decode = scheduler_module.speech.talker_decode
    for steps_per_tick in (4, 1):
        served = _sharing(engine, max_sessions=1, thinker_steps=steps_per_tick)
        runner, ticks = served.scheduler.runner, []  # per tick: [thinker cache lengths, talker stepped]
        thinker_decode, step = runner.thinker_decode, Scheduler.step
        monkeypatch.setattr(runner, "thinker_decode", lambda slots, longest: ticks[-1][0].append(longest)
                            or thinker_decode(slots, longest))
        monkeypatch.setattr(scheduler_module.speech, "talker_decode", lambda runner, sessions: ticks[-1].__setitem__(
            1, True) or talker_decode(runner, sessions))
        monkeypatch.setattr(Scheduler, "step", lambda self: ticks.append([[], False]) or step(self))
        _check_alone(engine, request, offline, list(served.stream(**request)))
        ticks = [tick for tick in ticks if tick[0]]
        want, known = [1], 2  # the prompt's tick: t1 from the prefill, then one step
        for _, talked in ticks[1:]:
            want.append(1 if talked else min(steps_per_tick, max_new - known))
            known += want[-1]
        assert [len(lengths) for lengths, _ in ticks] == want and known >= generated, (steps_per_tick, ticks)
        assert return_audio == any(talked for _, talked in ticks)
        if steps_per_tick > 1:
            assert max(want) > 1, "the thinker never ran ahead"
        lengths = [n for tick, _ in ticks for n in tick]  # the cache length after each step: one more each time,
        start = prompt_len + 1  # the last feeding the generation's last token but one
        assert lengths == list(range(start, start + len(lengths))) and lengths[-1] <= prompt_len + max_new - 1
        monkeypatch.setattr(Scheduler, "step", step)
