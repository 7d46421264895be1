"""The HTTP server (runtime/serve/) as a client sees it: one real `python -m runtime serve` subprocess on a free
loopback port, spoken to with the official `openai` client, plain HTTP (httpx2, which openai brings) and a
WebSocket (websockets). The tiny default checkpoint; every wait is bounded.

Served speech equals `engine.generate` on the same request: the tokens exactly, the pcm16 samples within
WAVE_TOL relative. Streamed and offline speech agree to 1e-5 on the oracle weights (README "Use"); the tiny
default checkpoint's random Code2Wav runs at large activations (most samples clip) and magnifies fp32
summation-order differences between batch compositions, so the engine's own tests hold it to 5e-4
(tests/test_streaming.py), and so does this file."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai", reason="needs the openai client (requirements.txt)")
httpx = pytest.importorskip("httpx2", reason="needs httpx2 (installed with openai)")
soundfile = pytest.importorskip("soundfile", reason="needs soundfile (requirements.txt)")
ws_client = pytest.importorskip("websockets.sync.client", reason="needs websockets (requirements.txt)")

from runtime.streaming import pcm16  # noqa: E402
from tests.oracle import rel_err  # noqa: E402
from tests.serve_client import ROOT, Realtime, Server, health, metric, wait_idle, wav_b64  # noqa: E402

MAX_TOKENS, TALKER_FRAMES, MAX_SEQ_LEN, MAX_SESSIONS, MAX_QUEUE = 10, 12, 2048, 8, 4
# 2 minutes of speech: only a cancel ends it in a test. Greedy with a repetition penalty below 1, which favours the
# codes already drawn: the random talker's codec EOS, never drawn before, loses more each frame (a sampled one draws
# it after ~57 frames, a plain greedy one after 25-112 frames for short prompts on the tiny model). The talker is
# greedy (temperature 0); the code predictor still samples (the serving API turns talker_do_sample on with any
# talker temperature), so each stream carries a seed: unseeded, some runs drew a path that ended a stream within
# a few frames (the 429 test then found a free place).
LONG_TALK = {"talker_max_new_tokens": 1500, "talker_temperature": 0, "talker_repetition_penalty": 0.5}
LONG_TALK_SEED = 300  # streams seeded 300, 301, ... keep talking (0 + i and 100 + i did not: one ended early)
BODY_LIMIT_MB = 1
WAVE_TOL = 5e-4
SERVER_ARGS = ["--max-sessions", str(MAX_SESSIONS), "--max-queue", str(MAX_QUEUE), "--max-seq-len", str(MAX_SEQ_LEN),
               "--max-body-mb", str(BODY_LIMIT_MB), "--max-tokens", str(MAX_TOKENS),
               "--talker-max-new-tokens", str(TALKER_FRAMES)]


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import OmniEngine

    engine = OmniEngine.from_pretrained("tiny")  # also writes the tiny checkpoint before the server reads it
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    server = Server(*SERVER_ARGS)
    yield server
    assert server.stop() == 0, "".join(server.output)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60.0, max_retries=0)


def question(seed: int, text: str = "What do you hear?", rate: int = 22050) -> tuple[list[dict], np.ndarray, int]:
    """A user turn with a 0.5 s noisy tone (wav at `rate`) and text -> (messages, the decoded waveform, rate)."""
    rng = np.random.default_rng(seed)
    t = np.arange(rate // 2) / rate
    wave = (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    b64 = wav_b64(wave, rate)
    decoded, _ = soundfile.read(io.BytesIO(base64.b64decode(b64)), dtype="float32")  # what the server reads
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                                             {"type": "text", "text": text}]}]
    return messages, decoded, rate


def reference(engine, decoded: np.ndarray, rate: int, text: str = "What do you hear?", voice: str = "ethan",
              talker_frames: int = TALKER_FRAMES):
    """engine.generate on the same request, with the seed the served requests send (0) -> (token ids without the
    EOS, int16 samples)."""
    result = engine.generate(text=text, audio=decoded, sample_rate=rate, max_new_tokens=MAX_TOKENS,
                             talker_max_new_tokens=talker_frames, speaker=voice, return_audio=True, seed=0)
    prompt_len = engine.prepare(text=text, audio=decoded, sample_rate=rate).input_ids.shape[1]
    tokens = result.sequences[0, prompt_len:].tolist()
    eos = engine.config.im_end_token_id
    tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens  # the served token_ids stop before the EOS
    samples = pcm16(result.waveform[0, :int(result.num_samples[0])])
    return tokens, samples, result.text[0]


def assert_same_speech(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.numel() == ref.numel() > 0, (ours.numel(), ref.numel())
    err = rel_err(ours.float(), ref.float())
    diff = (ours.to(torch.int32) - ref.to(torch.int32)).abs().max().item()
    assert err <= WAVE_TOL, f"pcm16 rel err {err:.2e} > {WAVE_TOL}; max |diff| {diff} steps"


def stream_request(client, messages, voice="ethan", omni=None):
    """A streaming chat completion -> (text, int16 samples, final chunk as a dict, number of audio deltas)."""
    chunks = client.chat.completions.create(
        model="omni-rt", messages=messages, modalities=["text", "audio"], audio={"voice": voice, "format": "pcm16"},
        max_tokens=MAX_TOKENS, stream=True, seed=0, extra_body={"omni": omni or {}})
    text, pcm, final, audio_deltas = [], [], None, 0
    for chunk in chunks:
        delta = chunk.choices[0].delta
        if delta.content:
            text.append(delta.content)
        if delta.audio is not None and delta.audio.data:
            pcm.append(np.frombuffer(base64.b64decode(delta.audio.data), dtype="<i2"))
            audio_deltas += 1
        if chunk.choices[0].finish_reason is not None:
            final = chunk.model_dump()
    samples = torch.from_numpy(np.concatenate(pcm).astype(np.int16)) if pcm else torch.zeros(0, dtype=torch.int16)
    return "".join(text), samples, final, audio_deltas


# ---------------------------------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["omni-rt"]
    state = health(server)
    assert state["status"] == "ok" and state["slots"]["total"] == MAX_SESSIONS and state["slots"]["free"] == MAX_SESSIONS


def test_non_streaming_audio_in_speech_out_equals_generate(engine, client):
    messages, decoded, rate = question(seed=1)
    answer = client.chat.completions.create(
        model="omni-rt", messages=messages, modalities=["text", "audio"], audio={"voice": "chelsie", "format": "wav"},
        max_tokens=MAX_TOKENS, seed=0)
    tokens, ref, ref_text = reference(engine, decoded, rate, voice="chelsie")
    assert answer.model_extra["omni"]["token_ids"] == tokens
    assert answer.choices[0].message.content == ref_text
    assert answer.choices[0].message.audio.transcript == ref_text
    assert answer.choices[0].finish_reason == ("length" if len(tokens) == MAX_TOKENS else "stop")
    assert answer.usage.completion_tokens == len(tokens) and answer.usage.prompt_tokens > 0
    samples, sample_rate = soundfile.read(io.BytesIO(base64.b64decode(answer.choices[0].message.audio.data)),
                                          dtype="int16")
    assert sample_rate == 24000
    assert_same_speech(torch.from_numpy(samples), ref)


def test_image_data_url_and_a_multi_turn_conversation_equal_generate(engine, client):
    from PIL import Image

    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
    answer = client.chat.completions.create(model="omni-rt", messages=messages, max_tokens=MAX_TOKENS)
    ours = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    prompt = engine.prepare(messages=ours)
    result = engine.generate(input_ids=prompt.input_ids, pixel_values=prompt.inputs.pixel_values,
                             image_grid_thw=prompt.inputs.image_grid_thw, max_new_tokens=MAX_TOKENS,
                             return_audio=False)
    tokens = result.sequences[0, prompt.input_ids.shape[1]:].tolist()
    eos = engine.config.im_end_token_id
    assert answer.model_extra["omni"]["token_ids"] == (tokens[:tokens.index(eos)] if eos in tokens else tokens)
    assert answer.usage.prompt_tokens == prompt.input_ids.shape[1]
    assert answer.choices[0].message.audio is None  # text only unless modalities asks for audio


def test_video_data_url_equals_generate_on_the_file(engine, client, tmp_path):
    av = pytest.importorskip("av", reason="needs PyAV to write and decode a video")
    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(9)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(12):  # 3 s at 4 fps
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    answer = client.chat.completions.create(model="omni-rt", messages=messages, max_tokens=MAX_TOKENS)
    result = engine.generate(text="What happens?", videos=[str(path)], max_new_tokens=MAX_TOKENS, return_audio=False)
    prompt_len = engine.prepare(text="What happens?", videos=[str(path)]).input_ids.shape[1]
    tokens = result.sequences[0, prompt_len:].tolist()
    eos = engine.config.im_end_token_id
    assert answer.usage.prompt_tokens == prompt_len
    assert answer.model_extra["omni"]["token_ids"] == (tokens[:tokens.index(eos)] if eos in tokens else tokens)


def test_every_output_format_decodes_to_the_same_speech(client):
    messages, _, _ = question(seed=7)
    decoded = {}
    for fmt in ("wav", "flac", "pcm16", "mp3", "opus"):
        answer = client.chat.completions.create(model="omni-rt", messages=messages, modalities=["text", "audio"],
                                                audio={"voice": "ethan", "format": fmt}, max_tokens=MAX_TOKENS,
                                                seed=0)  # the same sampled speech each time
        data = base64.b64decode(answer.choices[0].message.audio.data)
        if fmt == "pcm16":
            decoded[fmt] = np.frombuffer(data, dtype="<i2")
        else:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
            assert rate == 24000, fmt
            decoded[fmt] = samples
    assert np.array_equal(decoded["wav"], decoded["flac"]) and np.array_equal(decoded["wav"], decoded["pcm16"])
    for lossy in ("mp3", "opus"):  # codec delay and framing: the length within 100 ms
        assert abs(len(decoded[lossy]) - len(decoded["wav"])) <= 2400, (lossy, len(decoded[lossy]))


def test_streaming_speech_equals_generate(engine, client):
    messages, decoded, rate = question(seed=2)
    text, samples, final, audio_deltas = stream_request(client, messages)
    tokens, ref, ref_text = reference(engine, decoded, rate)
    assert text == ref_text
    assert final["omni"]["token_ids"] == tokens
    assert final["usage"]["completion_tokens"] == len(tokens)
    assert audio_deltas == TALKER_FRAMES - 1  # one delta per 80 ms packet (the last talker step emits no frame)
    assert_same_speech(samples, ref)
    timings = final["omni"]["timings"]
    assert 0 < timings["thinker_first_token"] <= timings["first_packet"] <= timings["total"]


def test_eight_concurrent_streams_each_get_what_they_get_alone(engine, server, client):
    requests = [question(seed=10 + i, text=f"Request number {i}.") for i in range(8)]
    alone = [reference(engine, decoded, rate, text=f"Request number {i}.")
             for i, (_, decoded, rate) in enumerate(requests)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: stream_request(client, r[0]), requests))
    for i, ((text, samples, final, _), (tokens, ref, ref_text)) in enumerate(zip(results, alone)):
        assert final["omni"]["token_ids"] == tokens, f"request {i}"
        assert text == ref_text, f"request {i}"
        assert_same_speech(samples, ref)
    assert wait_idle(server)["slots"]["in_use"] == 0


def _open_stream(server, messages, omni, seed: int = LONG_TALK_SEED):
    body = {"model": "omni-rt", "messages": messages, "modalities": ["text", "audio"], "stream": True,
            "audio": {"voice": "ethan", "format": "pcm16"}, "max_tokens": MAX_TOKENS, "omni": omni, "seed": seed}
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60)


def test_disconnect_after_first_audio_chunk_frees_its_slot(server, client):
    before = metric(server, "omni_rt_requests_total", endpoint="chat", outcome="disconnected")
    messages, _, _ = question(seed=3)
    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(stream_request, client, question(seed=20 + i)[0]) for i in range(3)]
        with _open_stream(server, messages, LONG_TALK) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and '"data": "' in line:
                    break  # the first audio packet: now walk away
            assert health(server)["slots"]["in_use"] >= 1
        finished = [f.result(timeout=120) for f in others]
    assert all(final is not None and samples.numel() > 0 for _, samples, final, _ in finished)
    state = wait_idle(server)
    assert state["slots"]["in_use"] == 0 and state["slots"]["open_requests"] == 0, state
    assert metric(server, "omni_rt_requests_total", endpoint="chat", outcome="disconnected") == before + 1


def test_admission_beyond_the_queue_is_429_with_retry_after(server):
    messages, _, _ = question(seed=4)
    capacity = MAX_SESSIONS + MAX_QUEUE
    # seeded (see LONG_TALK): LONG_TALK_SEED + i keep all of them talking
    contexts = [_open_stream(server, messages, LONG_TALK, seed=LONG_TALK_SEED + i) for i in range(capacity)]
    try:
        responses = [c.__enter__() for c in contexts]
        assert [r.status_code for r in responses] == [200] * capacity
        refused = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": "omni-rt", "messages": [{"role": "user", "content": "hi"}]})
        # (a failure says what the server held then: a stream that ended early frees its place)
        assert refused.status_code == 429, (refused.status_code, refused.text[:300], health(server))
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for c in contexts:
            c.__exit__(None, None, None)
    state = wait_idle(server)
    assert state["slots"]["in_use"] == 0 and state["slots"]["open_requests"] == 0, state


def test_realtime_barge_in_then_a_second_response_sees_the_history(engine, server):
    from runtime.serve.inputs import audio_part, build_prompt, decode_pcm16

    rt = Realtime(server)
    for bad, code in ((b"\x00binary", "invalid_event"), ("{not json", "invalid_json"), ('{"type": "dance"}', "invalid_event"),
                      ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_value"),
                      ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
                      ('{"type": "session.update", "session": {"voice": "hal9000"}}', "invalid_value")):
        rt.ws.send(bad)  # each answered with an error event; the connection goes on
        event = rt.next()
        assert event["type"] == "error" and event["error"]["code"] == code, (bad, event)
    instructions = "Answer briefly."
    rt.send("session.update", session={"voice": "aiden", "instructions": instructions, "max_response_output_tokens": 8,
                                       "omni": LONG_TALK})
    assert rt.until("session.updated")[0]["session"]["voice"] == "aiden"
    rng = np.random.default_rng(5)
    speech = (0.2 * rng.standard_normal(12000) * 32767 * 0.3).astype("<i2").tobytes()  # 0.5 s at 24 kHz
    for piece in (speech[:8000], speech[8000:16000], speech[16000:]):
        rt.send("input_audio_buffer.append", audio=base64.b64encode(piece).decode())
    rt.send("input_audio_buffer.commit")
    rt.until("input_audio_buffer.committed")
    rt.until("conversation.item.created")
    rt.send("response.create")
    rt.until("response.created")
    assert rt.next()["type"] == "response.output_item.added"
    audio = 0
    while audio < 2:
        event = rt.next()
        audio += event["type"] == "response.audio.delta"
        assert event["type"] in ("response.audio.delta", "response.audio_transcript.delta"), event
    rt.send("response.cancel")  # barge-in
    done, _ = rt.until("response.done")
    first = done["response"]
    assert first["status"] == "cancelled"
    assert wait_idle(server)["slots"]["in_use"] == 0
    heard = first["output"][0]["content"][0]["text"] if first["output"] else ""

    # greedy with the penalty that keeps the random talker from ending early (LONG_TALK): exactly 5 frames
    rt.send("session.update", session={"omni": dict(LONG_TALK, talker_max_new_tokens=6)})
    rt.until("session.updated")
    rt.send("conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And then?"}]})
    rt.until("conversation.item.created")
    rt.send("response.create")
    done, events = rt.until("response.done")
    second = done["response"]
    assert second["status"] == "completed", second
    assert sum(e["type"] == "response.audio.delta" for e in events) == 5
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
    assert second["output"][0]["content"][0]["text"] == transcript
    # The second prompt is the whole conversation: instructions, the audio turn, the interrupted answer as far as
    # it got, the new text turn.
    turns = [{"role": "system", "content": [{"type": "text", "text": instructions}]},
             {"role": "user", "content": [audio_part(decode_pcm16(speech, 24000, "audio"))]}]
    if first["output"]:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": heard}]})
    turns.append({"role": "user", "content": [{"type": "text", "text": "And then?"}]})
    assert second["usage"]["input_tokens"] == build_prompt(engine, turns, 8)[1] > first["usage"]["input_tokens"]
    rt.send("response.create", response={"modalities": ["text"], "max_output_tokens": 4})
    done, events = rt.until("response.done")
    assert done["response"]["status"] == "completed"
    kinds = {e["type"] for e in events}
    assert "response.text.delta" in kinds and "response.text.done" in kinds and "response.audio.delta" not in kinds
    assert done["response"]["usage"]["input_tokens"] > second["usage"]["input_tokens"]  # it saw the second answer
    rt.send("response.cancel")  # nothing in progress: an error event, and the connection goes on
    assert rt.next()["type"] == "error"
    rt.ws.close()


def _nan_wav() -> str:
    wave = np.zeros(4000, np.float32)
    wave[100] = np.nan
    return wav_b64(wave, 16000, subtype="FLOAT")


def _audio_message(data: str, fmt: str = "wav") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]


HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # (name, body: dict | raw bytes, status, param)
    ("malformed json", b'{"model": "omni-rt", "messages": [', 400, None),
    ("not an object", b'["omni-rt"]', 400, None),
    ("nan in json", b'{"model": "omni-rt", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, None),
    ("wrong type", {"model": "omni-rt", "messages": HI, "max_tokens": "8"}, 400, "max_tokens"),
    ("audio part without data", {"model": "omni-rt", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"format": "wav"}}]}]}, 400, "messages[0].content[0].input_audio.data"),
    ("unknown part type", {"model": "omni-rt", "messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
     400, "messages[0].content[0]"),
    ("empty messages", {"model": "omni-rt", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "omni-rt", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("empty prompt", {"model": "omni-rt", "messages": [{"role": "user", "content": " "}]}, 400, "messages"),
    ("unknown voice", {"model": "omni-rt", "messages": HI, "modalities": ["text", "audio"],
                       "audio": {"voice": "hal9000", "format": "wav"}}, 400, "audio.voice"),
    ("unsupported format", {"model": "omni-rt", "messages": HI, "modalities": ["text", "audio"],
                            "audio": {"voice": "ethan", "format": "aac"}}, 400, "audio.format"),
    ("streamed wav", {"model": "omni-rt", "messages": HI, "modalities": ["text", "audio"], "stream": True,
                      "audio": {"voice": "ethan", "format": "wav"}}, 400, "audio.format"),
    ("corrupt base64", {"model": "omni-rt", "messages": _audio_message("UklGR!!!not base64")}, 400,
     "messages[0].content[0].input_audio.data"),
    ("not audio", {"model": "omni-rt", "messages": _audio_message(base64.b64encode(b"hello world" * 20).decode())},
     400, "messages[0].content[0].input_audio.data"),
    ("nan audio", {"model": "omni-rt", "messages": _audio_message(_nan_wav())}, 400,
     "messages[0].content[0].input_audio.data"),
    ("unknown model", {"model": "gpt-9", "messages": HI}, 404, "model"),
    ("too many tokens", {"model": "omni-rt", "messages": HI, "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("prompt too long", {"model": "omni-rt", "messages": [{"role": "user", "content": "word " * MAX_SEQ_LEN}]}, 400,
     "messages"),
    ("temperature out of range", {"model": "omni-rt", "messages": HI, "temperature": 5.0}, 400, "temperature"),
    ("two choices", {"model": "omni-rt", "messages": HI, "n": 2}, 400, "n"),
    ("talker too long", {"model": "omni-rt", "messages": HI, "modalities": ["text", "audio"],
                         "omni": {"talker_max_new_tokens": 10 ** 5}}, 400, "omni.talker_max_new_tokens"),
    ("remote image", {"model": "omni-rt", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("local image refused", {"model": "omni-rt", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}, 400, "messages[0].content[0].image_url.url"),
    ("undecodable video", {"model": "omni-rt", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"no video").decode()}}]}]},
     400, "messages[0].content[0].video_url.url"),
    ("huge body", b'{"model": "omni-rt", "pad": "' + b"x" * (BODY_LIMIT_MB * 1024 * 1024 + 10) + b'"}', 413, None),
]


@pytest.mark.parametrize("name, body, status, param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error_naming_the_field(server, name, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["message"] and "\n" not in error["message"] and error["type"]


def _mutations(seed: int, count: int):
    """Valid bodies with one field (at any depth) replaced by a value of another kind, reproducibly."""
    rng = np.random.default_rng(seed)
    junk = [None, 0, -1, 2 ** 40, 0.5, "", "x" * 300, [], [1, "a"], {}, {"type": "text"}, True]
    for _ in range(count):
        body = {"model": "omni-rt", "max_tokens": 3, "modalities": ["text", "audio"], "omni": {"talker_max_new_tokens": 3},
                "audio": {"voice": "ethan", "format": "wav"},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                          {"type": "input_audio", "input_audio": {
                                                              "data": wav_b64(np.zeros(800, np.float32), 8000),
                                                              "format": "wav"}}]}]}
        paths, stack = [], [((), body)]
        while stack:  # every (container, key) in the body
            path, node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for key, value in items:
                paths.append(path + (key,))
                stack.append((path + (key,), value))
        target = paths[rng.integers(len(paths))]
        node = body
        for key in target[:-1]:
            node = node[key]
        node[target[-1]] = junk[rng.integers(len(junk))]
        yield target, body


def test_mutated_requests_never_crash_the_server(server):
    seed = 11
    for target, body in _mutations(seed, 60):
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code in (200, 400, 404), (seed, target, response.status_code, response.text[:300])
        if response.status_code != 200:
            assert "\n" not in response.json()["error"]["message"], (target, response.text[:300])
    assert wait_idle(server)["slots"]["in_use"] == 0


def test_server_still_serves_after_the_bad_requests(server, client):
    text = client.chat.completions.create(model="omni-rt", messages=HI, max_tokens=4).choices[0].message.content
    assert isinstance(text, str)
    assert health(server)["status"] == "ok"
    assert metric(server, "omni_rt_time_to_first_audio_seconds_count") > 0
    assert re.search(r'omni_rt_stage_seconds_count\{stage="code2wav"\}|omni_rt_frame_seconds_count\{stage="code2wav"\}',
                     httpx.get(server.url + "/metrics", timeout=10).text)


def test_sigterm_ends_open_streams_with_an_error_event_and_exits_cleanly(engine):
    server = Server(*SERVER_ARGS)
    try:
        messages, _, _ = question(seed=6)
        with _open_stream(server, messages, LONG_TALK) as response:
            lines = response.iter_lines()
            for line in lines:
                if '"data": "' in line:
                    break
            server.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "cancelled"
        assert server.process.wait(30) == 0
        assert any(line.startswith("stopped") for line in server.output)
    finally:
        server.stop(signal.SIGKILL)


def test_serve_latency_bench_against_the_running_server(server, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve_latency.py"), "--url", server.url,
                           "--device", "cpu", "--concurrency", "1,2", "--repeats", "1", "--max-tokens", "4",
                           "--talker-max-new-tokens", "4", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "CPU" in done.stdout and "first_token_client_over_engine" in done.stdout
    (path,) = tmp_path.glob("serve_latency-cpu-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and [row["concurrency"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["without_audio"] == 0, f"{row}\n{done.stdout}\n{done.stderr[-3000:]}"
        # The client's clock starts before the engine's and its events arrive after: never under 1.
        assert row["first_token_client_over_engine"] >= 1 and row["first_packet_client_over_engine"] >= 1
        assert 0 < row["first_packet_prepare_share"] < 1
        assert "first_packet_client_ms" not in row  # absolute numbers only from a GPU


def test_serve_latency_rows_count_requests_without_audio():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from serve_latency import make_row

    def result(packet):
        return {"client_first_token": 0.2, "client_first_packet": packet, "engine_first_token": 0.1,
                "engine_first_packet": None if packet is None else packet / 2, "server_prepare": 0.05, "tokens": 4}

    row = make_row(3, [result(0.8), result(None), result(0.4)], absolute=False)
    assert row["without_audio"] == 1 and row["first_packet_client_over_engine"] == pytest.approx(2.0)
    silent = make_row(1, [result(None)], absolute=False)
    assert silent["without_audio"] == 1 and silent["first_packet_client_over_engine"] is None
