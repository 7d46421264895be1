"""Client-side helpers for tests/test_serve.py: a `python -m runtime serve` subprocess, plain-HTTP looks at
/health and /metrics, a small Realtime WebSocket client, wav encoding."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    """A `python -m runtime serve --port 0` subprocess; `url` from its ready line."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self.process = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--port", "0", *args], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited {self.process.returncode}:\n{''.join(self.output)}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"no ready line in {timeout} s:\n{''.join(self.output)}") from None
                continue
            if line.startswith("ready: "):
                self.url = line.split()[1]
                break

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def stop(self, sig=signal.SIGINT, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def wav_b64(waveform: np.ndarray, rate: int, subtype: str = "PCM_16") -> str:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, waveform, rate, format="WAV", subtype=subtype)
    return base64.b64encode(out.getvalue()).decode()


def health(server) -> dict:
    import httpx2 as httpx

    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = health(server)
        if state["slots"]["in_use"] == 0 and state["slots"]["open_requests"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def metric(server, name: str, **labels) -> float:
    import httpx2 as httpx

    text = httpx.get(server.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Realtime:
    def __init__(self, server):
        from websockets.sync import client as ws_client

        self.ws = ws_client.connect(server.url.replace("http://", "ws://") + "/v1/realtime", open_timeout=30,
                                    max_size=None)
        assert self.next()["type"] == "session.created"

    def send(self, kind: str, **fields) -> None:
        self.ws.send(json.dumps({"type": kind, **fields}))

    def next(self) -> dict:
        return json.loads(self.ws.recv(timeout=60))

    def until(self, kind: str) -> tuple[dict, list[dict]]:
        seen = []
        while (event := self.next())["type"] != kind:
            assert event["type"] != "error", event
            seen.append(event)
        return event, seen
