"""Scale-out through Ray Serve (runtime/serve/scale.py) as a client sees it: one `python -m runtime serve
--replicas 2` subprocess (a local Ray cluster, two replicas of the tiny model on the CPU, loopback only), spoken
to with the official `openai` client and plain HTTP. The cluster is started once for the module and taken down
at its end (SIGINT; the server's own shutdown ends the Serve application and Ray), failures included.

Served answers are compared with `engine.generate` in this process as tests/test_serve.py does: tokens exactly,
pcm16 samples within its WAVE_TOL (the reason for that tolerance is in its docstring)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="needs ray[serve] (requirements-scale.txt)")
openai = pytest.importorskip("openai", reason="needs the openai client (requirements.txt)")
httpx = pytest.importorskip("httpx2", reason="needs httpx2 (installed with openai)")
pytest.importorskip("soundfile", reason="needs soundfile (requirements.txt)")

from runtime.serve.scale import REPLICA_HEADER  # noqa: E402
from tests.serve_client import Realtime, Server, health  # noqa: E402
from tests.test_serve import (  # noqa: E402 - the single server's tests' requests, references and tolerance
    LONG_TALK, MAX_TOKENS, TALKER_FRAMES, assert_same_speech, question, reference)

# A replica admits MAX_SESSIONS + MAX_QUEUE = 8 requests: eight concurrent streams never see a 429, however the
# router spreads them while its view of the replicas' load catches up with a burst.
REPLICAS, MAX_SESSIONS, MAX_QUEUE = 2, 4, 4
# Streams that outlast the test on a loaded machine: the 429 test opens 16 of them one by one through the router,
# and 1500 frames (test_serve's LONG_TALK, ~35 s of one stream alone here) could let its first streams finish first.
# 4096: the tiny talker's max_position_embeddings, which bounds its cache.
MAX_SEQ_LEN = 4096
ENDLESS_TALK = dict(LONG_TALK, talker_max_new_tokens=MAX_SEQ_LEN - 512)
SERVER_ARGS = ["--replicas", str(REPLICAS), "--max-sessions", str(MAX_SESSIONS), "--max-queue", str(MAX_QUEUE),
               "--max-seq-len", str(MAX_SEQ_LEN), "--max-tokens", str(MAX_TOKENS),
               "--talker-max-new-tokens", str(TALKER_FRAMES),
               "--health-check-period-s", "2"]
FAULT_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import OmniEngine

    engine = OmniEngine.from_pretrained("tiny")  # also writes the tiny checkpoint before the replicas read it
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def cluster(engine):
    server = Server(*SERVER_ARGS, timeout=240.0)
    try:
        yield server
    finally:
        code = server.stop(timeout=60.0)
    assert code == 0, "".join(server.output[-40:])


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", timeout=120.0, max_retries=0)


def replica_pids(cluster, want: int, timeout: float = 60.0, known: dict | None = None) -> dict[str, int]:
    """{replica id: pid} from /health (plus `known`), asked until `want` different replicas have answered."""
    seen, deadline = dict(known or {}), time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only {seen} answered /health in {timeout} s"
        state = health(cluster)
        seen[state["replica"]["id"]] = state["replica"]["pid"]
        time.sleep(0.02)
    return seen


def openai_stream(client, messages):
    """A streaming chat completion with the openai client -> (replica id, text, int16 samples, final chunk)."""
    raw = client.chat.completions.with_raw_response.create(
        model="omni-rt", messages=messages, modalities=["text", "audio"], audio={"voice": "ethan", "format": "pcm16"},
        max_tokens=MAX_TOKENS, stream=True, seed=0)
    text, pcm, final = [], [], None
    for chunk in raw.parse():
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        if delta.audio is not None and delta.audio.data:
            pcm.append(np.frombuffer(base64.b64decode(delta.audio.data), dtype="<i2"))
        if chunk.choices[0].finish_reason is not None:
            final = chunk.model_dump()
    samples = torch.from_numpy(np.concatenate(pcm).astype(np.int16)) if pcm else torch.zeros(0, dtype=torch.int16)
    return raw.headers["x-omni-replica"], "".join(text), samples, final


class SSE:
    """A streaming request read with plain HTTP, event by event (so a test can act between events)."""

    def __init__(self, cluster, messages, omni=None):
        body = {"model": "omni-rt", "messages": messages, "modalities": ["text", "audio"], "stream": True,
                "audio": {"voice": "ethan", "format": "pcm16"}, "max_tokens": MAX_TOKENS, "seed": 0,
                "omni": omni or {}}
        self.context = httpx.stream("POST", cluster.url + "/v1/chat/completions", json=body, timeout=60)
        self.response = self.context.__enter__()
        self.replica = self.response.headers.get("x-omni-replica")
        self.lines = self.response.iter_lines()
        self.chunks, self.error, self.done = [], None, False

    def next_chunk(self) -> dict | None:
        """The next data chunk; None once the stream ended ([DONE] or the connection closed)."""
        for line in self.lines:
            if line == "data: [DONE]":
                self.done = True
                return None
            if line.startswith("data: "):
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    self.error = chunk["error"]
                else:
                    self.chunks.append(chunk)
                return chunk
        return None

    def until_first_audio(self) -> None:
        while (chunk := self.next_chunk()) is not None:
            if (chunk.get("choices") or [{}])[0].get("delta", {}).get("audio", {}).get("data"):
                return
        raise AssertionError(f"the stream ended before its first audio packet: {self.error}")

    def read_all(self) -> "SSE":
        while self.next_chunk() is not None:
            pass
        return self

    def close(self) -> None:
        self.context.__exit__(None, None, None)

    def token_ids(self) -> list[int] | None:
        final = [c for c in self.chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
        return final[0]["omni"]["token_ids"] if final else None

    def samples(self) -> torch.Tensor:
        pcm = [np.frombuffer(base64.b64decode(c["choices"][0]["delta"]["audio"]["data"]), dtype="<i2")
               for c in self.chunks if c["choices"] and (c["choices"][0]["delta"].get("audio") or {}).get("data")]
        return torch.from_numpy(np.concatenate(pcm).astype(np.int16)) if pcm else torch.zeros(0, dtype=torch.int16)


# ---------------------------------------------------------------------------------------------------------------

def test_deployment_options_follow_the_engine_slots():
    from runtime.serve.scale import build_app, deployment_options, parse_autoscale

    base = {"max_sessions": 8, "max_queue": 16, "cpus_per_replica": 1.0, "gpus_per_replica": 1.0, "replicas": 3,
            "autoscale": None, "health_check_period_s": 10.0, "log_level": "warning"}
    fixed = deployment_options(base)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert fixed["max_ongoing_requests"] == 2 * 8 + 16 and "autoscaling_config" not in fixed
    scaled = deployment_options({**base, "autoscale": "2:6", "gpus_per_replica": 0.0})
    assert "num_replicas" not in scaled and "num_gpus" not in scaled["ray_actor_options"]
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 6, "initial_replicas": 2,
                                            "target_ongoing_requests": 6.0}
    for bad in ("3", "4:2", "a:b", "0:0"):
        with pytest.raises(ValueError, match="--autoscale"):
            parse_autoscale(bad)
    with pytest.raises(ValueError, match="unknown omni-rt option"):
        build_app({"max_sesions": 8})


def test_the_serve_run_config_file_is_valid_and_builds_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from runtime.serve.scale import build_app

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime/serve/serve_config.yaml")
    with open(path) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    (application,) = config.applications
    assert application.import_path == "runtime.serve.scale:build_app"
    deployment = build_app(application.args)._bound_deployment
    assert deployment.num_replicas == application.args["replicas"]
    assert deployment.max_ongoing_requests == 2 * application.args["max_sessions"] + application.args["max_queue"]


def test_the_single_process_server_does_not_import_ray():
    code = ("import sys, runtime.serve.app, runtime.serve.cli, runtime.__main__ as m; m.build_parser(); "
            "assert not [name for name in sys.modules if name == 'ray' or name.startswith('ray.')]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_check_health_fails_while_the_engine_loop_is_wedged(engine, monkeypatch):
    import asyncio
    import threading
    import types

    from runtime.serve import scale

    monkeypatch.setattr(scale, "HEALTH_TIMEOUT_S", 0.5)
    replica = types.SimpleNamespace(engine=engine)
    event_loop = asyncio.new_event_loop()  # long-lived, as a replica's (asyncio.run would wait for the wedge)
    check = lambda: event_loop.run_until_complete(scale.OmniReplica.check_health(replica))  # noqa: E731
    list(engine.stream(text="Hello.", max_new_tokens=2, return_audio=False))  # the loop runs from here on
    release = threading.Event()
    wedge = threading.Thread(target=engine.loop.call, args=(lambda scheduler: release.wait(30),))
    try:
        check()  # a loop between ticks answers at once
        wedge.start()  # the loop thread now waits inside a command: it ticks no more, as if a step hung
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="did not answer"):
            check()
        assert time.monotonic() - start < 5
        release.set()
        wedge.join(10)
        check()
    finally:
        release.set()
        event_loop.close()


def test_health_names_the_replica_and_both_answer(cluster):
    pids = replica_pids(cluster, REPLICAS)
    assert len(set(pids.values())) == REPLICAS and os.getpid() not in pids.values()
    state = health(cluster)
    assert state["slots"]["total"] == MAX_SESSIONS and state["status"] == "ok"
    response = httpx.get(cluster.url + "/metrics", timeout=30)
    assert response.headers["x-omni-replica"] in pids
    assert "omni_rt_slots_total " + f"{float(MAX_SESSIONS)}" in response.text


def test_eight_concurrent_streams_equal_generate_and_both_replicas_serve(engine, client):
    requests = [question(seed=30 + i, text=f"Request number {i}.") for i in range(8)]
    alone = [reference(engine, decoded, rate, text=f"Request number {i}.")
             for i, (_, decoded, rate) in enumerate(requests)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: openai_stream(client, r[0]), requests))
    for i, ((_, text, samples, final), (tokens, ref, ref_text)) in enumerate(zip(results, alone)):
        assert final is not None, f"request {i} has no final chunk"
        assert final["omni"]["token_ids"] == tokens, f"request {i}"
        assert text == ref_text, f"request {i}"
        assert_same_speech(samples, ref)
    replicas = {replica for replica, *_ in results}
    assert len(replicas) == REPLICAS, f"one replica served all 8 requests: {replicas}"


def test_serve_exports_its_own_metrics(cluster):
    (line,) = [line for line in cluster.output if line.startswith("serve metrics: ")]
    url, deadline = line.split()[-1], time.monotonic() + 60  # Ray's agents export every few seconds
    while "ray_serve_num_http_requests" not in (text := httpx.get(url, timeout=30).text):
        assert time.monotonic() < deadline, "no Serve request metrics on Ray's Prometheus endpoint in 60 s"
        time.sleep(1)
    assert 'deployment="OmniReplica"' in text


def test_realtime_through_serve_stays_on_one_replica(cluster):
    pids = replica_pids(cluster, REPLICAS)  # first: an open connection makes the router prefer the other replica
    rt = Realtime(cluster)
    try:
        assert rt.ws.response.headers[REPLICA_HEADER] in pids
        for turn in ("Hello.", "And then?"):  # the second response sees the first: the history is on one replica
            rt.send("session.update", session={"modalities": ["text"], "max_response_output_tokens": 4})
            rt.until("session.updated")
            rt.send("conversation.item.create", item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": turn}]})
            rt.until("conversation.item.created")
            rt.send("response.create")
            done, events = rt.until("response.done")
            assert done["response"]["status"] == "completed", done
            assert any(e["type"] == "response.text.delta" for e in events)
    finally:
        rt.ws.close()


def test_serve_latency_bench_compares_serve_with_the_single_server(cluster, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "serve_latency.py"), "--ray-url", cluster.url,
                           "--ray", "--device", "cpu", "--concurrency", "1,2", "--repeats", "1", "--max-tokens", "4",
                           "--talker-max-new-tokens", "4", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPU" in done.stdout and "ray_first_packet_over_single" in done.stdout
    (path,) = tmp_path.glob("serve_latency-cpu-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and [row["concurrency"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["without_audio"] == row["ray_without_audio"] == 0, f"{row}\n{done.stdout}\n{done.stderr[-3000:]}"
        assert row["ray_first_token_over_single"] > 0 and row["ray_first_packet_over_single"] > 0
        assert row["ray_first_packet_client_over_engine"] >= 1  # the client's clock starts first
        assert "ray_first_packet_client_ms" not in row  # absolute numbers only from a GPU


def test_beyond_the_cluster_capacity_is_the_single_servers_429(cluster):
    messages = [{"role": "user", "content": "Tell me a story."}]
    capacity = REPLICAS * (MAX_SESSIONS + MAX_QUEUE)
    streams = []
    try:
        for _ in range(capacity):  # one at a time: the router balances them, each replica gets its capacity
            streams.append(SSE(cluster, messages, ENDLESS_TALK))
            assert streams[-1].response.status_code == 200
        assert {s.replica for s in streams} == set(replica_pids(cluster, REPLICAS))
        refused = httpx.post(cluster.url + "/v1/chat/completions", timeout=30, json={
            "model": "omni-rt", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for stream in streams:
            stream.close()
    deadline = time.monotonic() + 30
    while any(health(cluster)["slots"]["open_requests"] for _ in range(4)):  # /health reaches either replica
        assert time.monotonic() < deadline, "the closed streams still hold their slots"
        time.sleep(0.2)


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_event(engine, cluster, client):
    pids = replica_pids(cluster, REPLICAS)
    victim = SSE(cluster, question(seed=50)[0], ENDLESS_TALK)
    others = []
    try:
        assert victim.response.status_code == 200 and victim.replica in pids
        victim.until_first_audio()  # it is mid-stream now
        requests = [question(seed=60 + i, text=f"Request number {i}.") for i in range(3)]
        others = [SSE(cluster, messages) for messages, _, _ in requests]  # the router prefers the idle replica
        os.kill(pids[victim.replica], signal.SIGKILL)
        killed = time.monotonic()
        with ThreadPoolExecutor(len(others) + 1) as pool:
            ended = list(pool.map(SSE.read_all, [victim, *others]))
        assert victim.error is not None and victim.error["code"] == "replica_failed", victim.error
        assert victim.done, "no data: [DONE] after the error event"
        assert time.monotonic() - killed < FAULT_DEADLINE_S
        survivors = 0
        for stream, (_, decoded, rate), i in zip(ended[1:], requests, range(3)):
            if stream.replica == victim.replica:  # it shared the victim's fate: a clean error, not a hang
                assert stream.error is not None or stream.response.status_code >= 500
                continue
            survivors += 1
            tokens, ref, _ = reference(engine, decoded, rate, text=f"Request number {i}.")
            assert stream.error is None and stream.token_ids() == tokens, f"request {i}: {stream.error}"
            assert_same_speech(stream.samples(), ref)
        assert survivors >= 1, "every request went to the replica that was killed"
    finally:
        for stream in (victim, *others):
            stream.close()
    # New requests succeed at once (on the survivor), and Serve replaces the dead replica.
    messages, decoded, rate = question(seed=70)
    tokens, ref, _ = reference(engine, decoded, rate)
    for _ in range(3):
        replica, _, samples, final = openai_stream(client, messages)
        assert replica != victim.replica and final["omni"]["token_ids"] == tokens
        assert_same_speech(samples, ref)
    restarted = replica_pids(cluster, REPLICAS + 1, timeout=120.0, known=pids)
    assert victim.replica in restarted and len(restarted) == REPLICAS + 1
