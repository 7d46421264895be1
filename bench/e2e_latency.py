"""End-to-end streaming latency: the paper's Table 2 rows at concurrency 1 / 4 / 6, for a 10 s spoken question
and a short video clip, next to the paper's numbers and to transformers' own generate on the same machine.

    python bench/e2e_latency.py                    # GPU: real 30B-A3B shapes, random bf16 weights
    python bench/e2e_latency.py --smoke            # CPU: the tiny preset, to check the script end to end
    python bench/e2e_latency.py --layers 8 --concurrency 1,4 --inputs audio --repeats 1 --no-peer
                                                   # GPU, short: released shapes, 8 thinker decoder layers

`--layers N` keeps every released shape but builds the thinker with N decoder layers (of 48) and the talker
with N * 20 // 48 (of 20, at least 1), the talker reading thinker layer N // 2 (24 of 48 in the release): a run
that fits a short GPU window. Its rows are NOT the full model's latency and say so ("model" in the JSON, the
table's title). The JSON is rewritten after each configuration (`"complete": false` until the end), so a run
stopped by a time limit keeps what it measured.

Random weights: latency depends on shapes, not trained values. Generation lengths are fixed by the request
(max_new_tokens / talker_max_new_tokens); a random model may stop earlier, so every row also reports the tokens
and frames actually produced. Each configuration runs after a warm-up request (kernel compilation, CUDA-graph
capture) and `--repeats` times; the table shows medians over sessions and repeats.

The transformers peer runs after our engine is released (both models at once do not fit an 80 GB GPU): its own
random initialisation of the same config (same shapes), `generate(return_audio=True)`, which returns audio
only when everything is done, so its first packet is its total time. Its thinker time to first token is
timed separately with `thinker.generate(max_new_tokens=1)`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.config import OmniConfig  # noqa: E402
from runtime.engine import OmniEngine  # noqa: E402
from runtime.frontend.audio import audio_token_count  # noqa: E402
from runtime.streaming import consume_together  # noqa: E402

# The paper's Table 2 (Qwen3-Omni-30B-A3B, its serving stack), milliseconds / ratio; audio input unless noted.
PAPER = {
    ("audio", 1): {"first_packet_ms": 234, "thinker_first_token_ms": 88, "mtp_per_frame_ms": 14,
                   "code2wav_per_frame_ms": 3, "rtf": 0.47},
    ("audio", 4): {"first_packet_ms": 728},
    ("audio", 6): {"first_packet_ms": 1172},
    ("video", 1): {"first_packet_ms": 547},
    ("video", 4): {"first_packet_ms": 1517},
    ("video", 6): {"first_packet_ms": 2284},
}
ROWS = ["first_packet_ms", "thinker_first_token_ms", "talker_first_frame_ms", "mtp_per_frame_ms",
        "code2wav_per_frame_ms", "rtf", "text_tokens", "frames"]


def build_request(config, kind: str, audio_seconds: float, generator: torch.Generator) -> dict:
    """Processor-style tensors of one random request: a user turn with a spoken question (log-mel frames of
    `audio_seconds`) or a short video clip (4 frames of 256x256), a few text tokens, the assistant prefix."""
    thinker = config.thinker
    ordinary = (11, 470) if thinker.text.vocab_size < 20000 else (1000, 20000)  # below every special id

    def text(n: int) -> list[int]:
        return torch.randint(*ordinary, (n,), generator=generator).tolist()

    tensors: dict = {}
    if kind == "audio":
        frames = int(audio_seconds * 100)  # 10 ms hop
        body = ([thinker.audio_start_token_id] + [thinker.audio_token_id] * audio_token_count(frames, thinker.audio.n_window)
                + text(1))
        tensors.update(input_features=torch.randn(1, thinker.audio.num_mel_bins, frames, generator=generator),
                       feature_attention_mask=torch.ones(1, frames, dtype=torch.long))
    else:
        vision = thinker.vision
        grid = torch.tensor([[2, 256 // vision.patch_size, 256 // vision.patch_size]])  # 4 frames: t = 4 / 2
        patches = int(grid.prod())
        body = ([thinker.vision_start_token_id] + [thinker.video_token_id] * (patches // vision.spatial_merge_size ** 2)
                + text(1))
        tensors.update(pixel_values_videos=torch.randn(patches, 3 * vision.temporal_patch_size * vision.patch_size ** 2,
                                                       generator=generator),
                       video_grid_thw=grid, video_second_per_grid=torch.tensor([2.0]))
    ids = ([config.im_start_token_id, config.system_token_id] + text(12) + [config.im_end_token_id]
           + [config.im_start_token_id, config.user_token_id] + body + text(8) + [config.im_end_token_id]
           + [config.im_start_token_id, config.assistant_token_id] + text(1))
    return dict(input_ids=torch.tensor([ids]), **tensors)


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def session_rows(stream, events) -> dict:
    t = stream.timings
    frames = len(t.code_predictor_per_frame)
    return {
        "first_packet_ms": _ms(t.first_packet),
        "thinker_first_token_ms": _ms(t.thinker_first_token),
        "talker_first_frame_ms": _ms(t.talker_first_frame),
        "mtp_per_frame_ms": _ms(statistics.mean(t.code_predictor_per_frame)) if frames else None,
        "code2wav_per_frame_ms": _ms(statistics.mean(t.code2wav_per_frame)) if t.code2wav_per_frame else None,
        "rtf": t.rtf,
        "text_tokens": sum(len(e.token_ids) for e in events if hasattr(e, "token_ids")),
        "frames": frames,
    }


def run_concurrent(engine, requests: list[dict], generate: dict) -> list[dict]:
    """Open one stream per request at once and consume them round-robin (the scheduler runs them together)."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    streams = [engine.stream(**request, **generate) for request in requests]
    events = consume_together(streams)
    sync()
    return [session_rows(s, e) for s, e in zip(streams, events)]


def median_rows(samples: list[dict]) -> dict:
    out = {}
    for row in ROWS:
        values = [s[row] for s in samples if s[row] is not None]
        out[row] = statistics.median(values) if values else None
    return out


def to_device(request: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in request.items()}


RELEASED_LAYERS = {"thinker": 48, "talker": 20, "accept_hidden_layer": 24}  # runtime/presets.py qwen3-omni-30b-a3b


def model_config(preset: str, layers: int | None) -> tuple[OmniConfig, str]:
    """The preset's config, with `layers` thinker decoder layers (talker scaled alike) when given, and a label
    saying which model the rows measure."""
    from runtime.presets import PRESETS
    from runtime.tiny import ensure_tiny_checkpoint

    if layers is None:
        name = os.fspath(ensure_tiny_checkpoint()) if preset == "tiny" else preset
        return OmniConfig.from_pretrained(name), f"{preset} (all layers)"
    if preset not in PRESETS or preset == "tiny":
        raise ValueError(f"--layers builds a reduced copy of a released preset, not of {preset!r}")
    full = RELEASED_LAYERS
    if not 3 <= layers <= full["thinker"]:  # DeepStack adds vision features to the first 3 thinker layers
        raise ValueError(f"--layers must be within 3..{full['thinker']}, got {layers}")
    data = PRESETS[preset]()
    talker_layers = max(1, layers * full["talker"] // full["thinker"])
    data["thinker_config"]["text_config"]["num_hidden_layers"] = layers
    data["talker_config"]["text_config"]["num_hidden_layers"] = talker_layers
    data["talker_config"]["accept_hidden_layer"] = layers * full["accept_hidden_layer"] // full["thinker"]
    label = (f"{preset} with {layers} of {full['thinker']} thinker and {talker_layers} of {full['talker']} talker "
             "decoder layers: NOT the full model")
    return OmniConfig.from_dict(data), label


def build_engine(args, device, dtype) -> OmniEngine:
    config, _ = model_config(args.preset, args.layers)
    # vision graphs only as large as build_request's video frames (256 x 256 pixels): capture time and memory
    frame_patches = (256 // config.thinker.vision.patch_size) ** 2 if "video" in args.inputs else 16
    scheduler = dict(max_sessions=max(args.concurrency), prefill_chunk=args.prefill_chunk,
                     max_vision_patches=max(frame_patches, 16))
    if args.graphs is not None:
        scheduler["use_graphs"] = args.graphs == "on"
    if args.layers is None:
        return OmniEngine.from_pretrained(args.preset, device=device, dtype=dtype, seed=0, scheduler=scheduler)
    from runtime.weights import init_random

    return OmniEngine(config, init_random(config, device, dtype, seed=0), None, device, dtype, scheduler=scheduler)


def measure_ours(args, device, dtype, on_config=lambda results: None) -> dict:
    """Table 2 rows of our engine per (input kind, concurrency); `on_config(results)` after each one."""
    engine = build_engine(args, device, dtype)
    generate = dict(max_new_tokens=args.max_new_tokens, talker_max_new_tokens=args.talker_max_new_tokens,
                    return_audio=True)
    generator = torch.Generator().manual_seed(1)
    seeds = iter(range(args.seed, args.seed + 1_000_000))  # the talker samples: seeded, a run repeats exactly
    results = {"graphs": None, "model": model_config(args.preset, args.layers)[1], "configs": {}}
    warm = to_device(build_request(engine.config, "audio", args.audio_seconds, generator), device)
    run_concurrent(engine, [dict(warm, seed=next(seeds))], generate)  # warm-up: compilation, graph capture
    results["graphs"] = engine.scheduler.graphs is not None
    for kind in args.inputs:
        for concurrency in args.concurrency:
            samples = []
            for _ in range(args.repeats):
                requests = [dict(to_device(build_request(engine.config, kind, args.audio_seconds, generator), device),
                                 seed=next(seeds)) for _ in range(concurrency)]
                samples += run_concurrent(engine, requests, generate)
            key = f"{kind}/c={concurrency}"
            results["configs"][key] = {"median": median_rows(samples), "sessions": samples,
                                       "model": results["model"]}
            first_packet = results["configs"][key]["median"]["first_packet_ms"]
            print(f"  ours {key}: first packet " + ("-" if first_packet is None else f"{first_packet:.1f} ms")
                  + f" ({results['model']})", flush=True)
            on_config(results)
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def measure_transformers(args, device, dtype) -> dict:
    """transformers' generate on its own random init of the same config; first packet = total time."""
    try:
        import transformers
        from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
    except ImportError as error:
        return {"skipped": f"transformers with qwen3_omni_moe not installed ({error})"}
    prompt_config, _ = model_config(args.preset, args.layers)
    hf_config = Qwen3OmniMoeConfig(**prompt_config.to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(hf_config, dtype=dtype)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {"version": transformers.__version__, "configs": {}}
    for kind in args.inputs:
        samples = []
        for attempt in range(args.repeats + 1):  # the first is warm-up
            request = to_device(build_request(prompt_config, kind, args.audio_seconds, generator), device)
            with torch.inference_mode():
                sync()
                start = time.perf_counter()
                model.thinker.generate(**request, max_new_tokens=1, do_sample=False)
                sync()
                ttft = time.perf_counter() - start
                start = time.perf_counter()
                out = model.generate(**request, return_audio=True, thinker_max_new_tokens=args.max_new_tokens,
                                     thinker_do_sample=False, talker_do_sample=False,
                                     talker_max_new_tokens=args.talker_max_new_tokens, talker_repetition_penalty=1.0,
                                     speaker="Ethan", thinker_eos_token_id=prompt_config.im_end_token_id)
                sync()
                total = time.perf_counter() - start
            wave = out[1] if isinstance(out, tuple) else None
            seconds = (wave.numel() / 24000) if wave is not None else 0.0
            if attempt:
                samples.append({"first_packet_ms": total * 1e3, "thinker_first_token_ms": ttft * 1e3,
                                "talker_first_frame_ms": None, "mtp_per_frame_ms": None,
                                "code2wav_per_frame_ms": None, "rtf": total / seconds if seconds else None,
                                "text_tokens": int(out[0].shape[1] - request["input_ids"].shape[1])
                                if isinstance(out, tuple) else None, "frames": None})
        results["configs"][f"{kind}/c=1"] = {"median": median_rows(samples), "sessions": samples}
    del model
    gc.collect()
    return results


def print_table(ours: dict, peer: dict, args) -> None:
    print(f"model: {ours.get('model')}")
    header = f"{'config':<12}{'row':<24}{'omni-rt':>12}{'transformers':>14}{'paper':>10}"
    print(header)
    print("-" * len(header))
    for key, measured in ours["configs"].items():
        kind, c = key.split("/c=")
        paper = PAPER.get((kind, int(c)), {})
        theirs = peer.get("configs", {}).get(key, {}).get("median", {})
        for row in ROWS:
            value = measured["median"][row]
            fmt = (lambda v: "-" if v is None else (f"{v:.3f}" if row == "rtf" else f"{v:.1f}"))
            print(f"{key:<12}{row:<24}{fmt(value):>12}{fmt(theirs.get(row)):>14}{fmt(paper.get(row)):>10}")


def device_info(device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        info["commit"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, short requests (checks the script)")
    parser.add_argument("--preset", default="qwen3-omni-30b-a3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--concurrency", default="1,4,6")
    parser.add_argument("--inputs", default="audio,video")
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--talker-max-new-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed of the first request; each next request takes the next one (repeatable)")
    parser.add_argument("--layers", type=int, default=None,
                        help="thinker decoder layers (talker scaled alike; default: the preset's); rows say so")
    parser.add_argument("--graphs", choices=["on", "off"], default=None, help="default: on where possible")
    parser.add_argument("--backend", default="triton", help="kernel backend to select (torch, triton, cuda)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' generate")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.device, args.dtype = "tiny", "cpu", "float32"
        args.audio_seconds, args.max_new_tokens, args.talker_max_new_tokens, args.repeats = 2.0, 6, 8, 1
        args.concurrency, args.backend = "1,2", "torch"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.inputs = args.inputs.split(",")
    if args.layers is not None:
        try:
            model_config(args.preset, args.layers)  # a bad --layers fails before any weights are built
        except ValueError as exc:
            parser.error(str(exc))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/e2e_latency.py needs a CUDA GPU for real measurements; run with --smoke on a CPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    kernels = nullcontext()
    if args.backend != "torch":
        from runtime import dispatch

        kernels = dispatch.using(args.backend)  # this thread's choice; the engine's loop thread runs in a copy
    info = device_info(device)
    print(f"# e2e latency on {info['device']} ({args.preset}, {args.dtype}); "
          + ("CPU smoke run: these are NOT GPU measurements" if device.type == "cpu" else "GPU measurement"), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    slug = info["device"].replace(" ", "_").replace("(", "").replace(")", "")
    path = Path(args.out) / f"e2e_latency-{'smoke-' if args.smoke else ''}{slug}-{info['date'][:10]}.json"

    def save(ours: dict, peer: dict, complete: bool) -> None:  # after each configuration: a stopped run keeps it
        payload = {"info": info, "args": vars(args), "complete": complete,
                   "paper": {f"{k}/c={c}": v for (k, c), v in PAPER.items()}, "omni_rt": ours, "transformers": peer}
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        os.replace(partial, path)

    pending = {"skipped": "not run yet"}
    with kernels:
        ours = measure_ours(args, device, dtype, on_config=lambda results: save(results, pending, False))
    peer = {"skipped": "--no-peer"} if args.no_peer else measure_transformers(args, device, dtype)
    save(ours, peer, True)
    print_table(ours, peer, args)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
