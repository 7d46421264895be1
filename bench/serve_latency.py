"""Serving latency: first text token and first audio packet as an HTTP client sees them (POST
/v1/chat/completions with stream=true, timed from sending the request to the first SSE chunk holding text /
audio) against the same figures measured inside the engine for the same request (its StreamTimings, which the
final chunk carries under `omni.timings`), at concurrency 1 / 4 / 8.

    python bench/serve_latency.py                       # starts `python -m runtime serve` (tiny, CPU)
    python bench/serve_latency.py --checkpoint DIR --device cuda --dtype bfloat16
    python bench/serve_latency.py --url http://127.0.0.1:8000   # a server that is already running
    python bench/serve_latency.py --ray [--replicas N] [--ray-url URL]   # also through Ray Serve (scale.py)

`prepare_share` is the fraction of the client's wait the server spent before calling the engine. What the
client waits for beyond the engine: HTTP and JSON parsing, base64 audio decoding, the audio features and
tokenisation of the prompt (done by the server before the engine's clock starts), queueing on the engine
loop, SSE framing and base64 of each packet. On a CPU only the ratios client / engine are reported (labelled
CPU); absolute milliseconds only from a GPU. Each configuration runs after a warm-up request; `--repeats`
rounds; medians over requests. Table on stdout, JSON under bench/results/ (bench/README.md).

Every request carries a seed (`--seed` + its index in the round), so a run repeats the same work. A request
that asked for speech and got no audio packet (the talker may draw end-of-speech as its first code) counts in
`without_audio` and is named on stderr with its finish reason; it has no first packet, so it is left out of the
first-packet medians, and a row where every request went without audio has none.

--ray also sends the same requests through Ray Serve (`python -m runtime serve --replicas N`, started here
unless --ray-url names a running one) and adds `ray_*_over_single`: the client's median first token / first
packet through Serve over the single-process server's at the same concurrency (the proxy hop and the replica's
ASGI bridge; with N > 1 also the spread over engines), and the Serve path's own client / engine ratio.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402

CPU_LABEL = "CPU: ratios only (client / engine), not a GPU measurement"


def question(seed: int, seconds: float = 1.0, rate: int = 16000) -> list[dict]:
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, wave, rate, format="WAV", subtype="PCM_16")
    data = base64.b64encode(out.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                         {"type": "text", "text": "What do you hear?"}]}]


def timed_request(url: str, body: dict) -> dict:
    """One streaming request -> client-side first token / first audio (s) and the engine's timings."""
    import httpx2

    client_token = client_audio = final = None
    start = time.perf_counter()
    with httpx2.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter() - start
            delta = chunk["choices"][0]["delta"]
            if client_token is None and delta.get("content"):
                client_token = now
            if client_audio is None and (delta.get("audio") or {}).get("data"):
                client_audio = now
            if chunk["choices"][0]["finish_reason"] is not None:
                final = chunk
    timings = final["omni"]["timings"]
    if client_audio is None:
        print(f"no audio packet: seed {body.get('seed')}, finish_reason {final['choices'][0]['finish_reason']!r}, "
              f"{final['usage']['completion_tokens']} tokens, engine timings {timings}", file=sys.stderr)
    return {"client_first_token": client_token, "client_first_packet": client_audio,
            "engine_first_token": timings["thinker_first_token"], "engine_first_packet": timings["first_packet"],
            "server_prepare": final["omni"]["server_prepare"], "engine_total": timings["total"],
            "tokens": final["usage"]["completion_tokens"]}


def run_concurrency(url: str, concurrency: int, repeats: int, args) -> list[dict]:
    bodies = [{"model": args.model_name, "messages": question(index), "modalities": ["text", "audio"], "stream": True,
               "audio": {"voice": "ethan", "format": "pcm16"}, "max_tokens": args.max_tokens,
               "seed": args.seed + index, "omni": {"talker_max_new_tokens": args.talker_max_new_tokens}}
              for index in range(concurrency)]
    timed_request(url, bodies[0])  # warm-up
    results = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeats):
            results += list(pool.map(lambda body: timed_request(url, body), bodies))
    return results


def make_row(concurrency: int, results: list[dict], absolute: bool) -> dict:
    def median(key):
        values = [r[key] for r in results if r[key] is not None]
        return statistics.median(values) if values else None

    row = {"concurrency": concurrency, "requests": len(results), "tokens": median("tokens"),
           "without_audio": sum(r["client_first_packet"] is None for r in results)}
    for what in ("first_token", "first_packet"):
        client, engine = median(f"client_{what}"), median(f"engine_{what}")
        row[f"{what}_client_over_engine"] = client / engine if client and engine else None
        # the part of the client's wait spent preparing the prompt before the engine's clock starts
        row[f"{what}_prepare_share"] = median("server_prepare") / client if client else None
        if absolute:
            row[f"{what}_client_ms"] = None if client is None else client * 1e3
            row[f"{what}_engine_ms"] = None if engine is None else engine * 1e3
            row[f"{what}_overhead_ms"] = None if client is None or engine is None else (client - engine) * 1e3
    return row


def ray_columns(single: list[dict], through_serve: list[dict], absolute: bool) -> dict:
    """The Serve path against the single-process server at one concurrency (medians over requests)."""
    def median(results, key):
        values = [r[key] for r in results if r[key] is not None]
        return statistics.median(values) if values else None

    out = {"ray_without_audio": sum(r["client_first_packet"] is None for r in through_serve)}
    for what in ("first_token", "first_packet"):
        ours, theirs = median(through_serve, f"client_{what}"), median(single, f"client_{what}")
        out[f"ray_{what}_over_single"] = ours / theirs if ours and theirs else None
    client, engine = median(through_serve, "client_first_packet"), median(through_serve, "engine_first_packet")
    out["ray_first_packet_client_over_engine"] = client / engine if client and engine else None
    if absolute:
        out["ray_first_packet_client_ms"] = None if client is None else client * 1e3
    return out


def format_table(rows: list[dict], absolute: bool, title: str) -> str:
    cols = ["concurrency", "requests", "without_audio", "first_token_client_over_engine", "first_packet_client_over_engine",
            "first_packet_prepare_share"]
    if absolute:
        cols += ["first_token_client_ms", "first_token_engine_ms", "first_packet_client_ms", "first_packet_engine_ms",
                 "first_packet_overhead_ms"]
    cols += [c for c in ("ray_without_audio", "ray_first_token_over_single", "ray_first_packet_over_single",
                         "ray_first_packet_client_over_engine", "ray_first_packet_client_ms") if c in rows[0]]
    cell = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def start_server(args, *extra: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "runtime", "serve", "--port", "0", "--checkpoint", args.checkpoint,
               "--device", args.device, "--dtype", args.dtype, "--model-name", args.model_name,
               "--max-sessions", str(max(args.concurrency)), "--max-queue", str(max(args.concurrency)), *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        print(line, end="", file=sys.stderr)
        if line.startswith("ready: "):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
            return process, line.split()[1]
    raise RuntimeError(f"the server exited ({process.wait()}) before its ready line")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--checkpoint", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--model-name", default="omni-rt")
    parser.add_argument("--concurrency", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--talker-max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="request i of a round is sent with seed + i")
    parser.add_argument("--out", help="results folder (default: bench/results)")
    parser.add_argument("--ray", action="store_true", help="also through Ray Serve (`serve --replicas N`)")
    parser.add_argument("--ray-url", help="a running Ray Serve endpoint for --ray (default: start one)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the Serve endpoint --ray starts")
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="GPUs per replica --ray starts (default: 1 on cuda, else 0)")
    args = parser.parse_args(argv)

    absolute = args.device.startswith("cuda")
    process, url = (None, args.url) if args.url else start_server(args)
    ray_process, ray_url = None, args.ray_url
    if args.ray and ray_url is None:
        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(absolute)
        try:
            ray_process, ray_url = start_server(args, "--replicas", str(args.replicas), "--gpus-per-replica", str(gpus))
        except BaseException:
            if process is not None:  # the single server started above: not left running
                process.terminate()
                process.wait(30)
            raise
    info = common.device_info(torch.device(args.device if absolute else "cpu"))
    info.update(checkpoint=args.checkpoint, server=url, label=None if absolute else CPU_LABEL)
    if ray_url:
        info.update(ray_server=ray_url, ray_replicas=None if args.ray_url else args.replicas)
    rows, path = [], None
    try:
        for concurrency in args.concurrency:
            single = run_concurrency(url, concurrency, args.repeats, args)
            rows.append(make_row(concurrency, single, absolute))
            if ray_url:
                through_serve = run_concurrency(ray_url, concurrency, args.repeats, args)
                rows[-1].update(ray_columns(single, through_serve, absolute))
            path = common.write_results("serve_latency", info, {}, rows, args.out, smoke=not absolute, path=path,
                                        complete=False)
        path = common.write_results("serve_latency", info, {}, rows, args.out, smoke=not absolute, path=path,
                                    complete=True)
    finally:
        for server in (process, ray_process):
            if server is not None:
                server.terminate()
                server.wait(60)
    title = (f"serve latency, {info['device']}, {args.checkpoint}" + ("" if absolute else f" [{CPU_LABEL}]"))
    print(format_table(rows, absolute, title))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
