"""Kernels, host syncs, host copies and weight bytes per stage at the released 30B-A3B shapes, on the CPU.

What cannot be timed without a GPU can be counted: each stage the runtime captures (ModelRunner.capture_plan,
Code2Wav's first frame `code2wav_first` among them) runs once on the meta device in bf16 with the chosen
kernels under runtime/graph_audit.py's StepAudit (its docstring has the counting rules). The table and bench/results/launches.json give, per stage: kernel launches, host syncs, H2D and
D2H copies, the weight bytes it reads, and two floors — the bytes at nominal HBM bandwidth of an H100 SXM and an
H200, and the launches at 1.5 µs per dependent graph node — then the totals of a steady-state tick and of the
first-packet path, the eager host glue of one steady tick between its graphs (`tick_glue`) and the eager work
around the first packet's graphs (`first_packet_glue`, a text prompt: the audio encoder cannot run on meta).

    python bench/launches.py                        # Triton kernels (what the GPU runs), JSON to bench/results/
    python bench/launches.py --kernels torch --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")  # nothing launches on meta tensors; no GPU needed to import

import torch  # noqa: E402

from runtime import dispatch, speech  # noqa: E402
from runtime.config import OmniConfig  # noqa: E402
from runtime.graph_audit import meta_model  # noqa: E402
from runtime.options import GenerationOptions, Request, SchedulerConfig  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.session import Session, TalkerProgress  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # nominal (SXM): the floors are lower bounds
NODE_SECONDS = 1.5e-6  # a dependent kernel in a replayed CUDA graph: ~1.5-2 µs each on Hopper
PROMPT_BUCKET = 256  # its prompt (~130 audio tokens + the chat template) fits one 256-token prefill chunk
AUDIO_CHUNKS = 16  # a 10 s question: 10 one-second chunks, in the 16-chunk bucket of the audio encoder's graphs
VISION_PATCHES = 1024  # a 512 x 512 image: 32 x 32 patches of 16 pixels, the 1024-patch vision encoder bucket
IMAGE_PROMPT_BUCKET = 512  # its prompt (256 image tokens + the question and the chat template) fits one 512 chunk


def _row(name: str, report, note: str = "") -> dict:
    row = dict(stage=name, **report.as_dict(), note=note)
    for device, rate in HBM_BYTES_PER_S.items():
        row[f"bytes_floor_us_{device}"] = report.weight_bytes / rate * 1e6
    row["launch_floor_us"] = report.kernels * NODE_SECONDS * 1e6
    return row


def _total(name: str, rows: list[dict], parts: list[str], note: str) -> dict:
    picked = [next(r for r in rows if r["stage"] == part) for part in parts]
    total = dict(stage=name, note=note + " = " + " + ".join(parts))
    for key in ("kernels", "weight_bytes", "h2d_copies", "d2h_copies", "host_syncs", "launch_floor_us",
                *(f"bytes_floor_us_{d}" for d in HBM_BYTES_PER_S)):
        total[key] = sum(r[key] for r in picked)
    return total


def measure(kernels: str, slots: int) -> list[dict]:
    config = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    model = meta_model(config, torch.bfloat16)
    rows = []
    with dispatch.using(kernels):
        runner = ModelRunner(model.model, config, SchedulerConfig(max_sessions=slots, max_seq_len=4096,
                                                                  use_graphs=False, static_prefill=True))
        for spec in runner.capture_plan():
            encoder = {"audio_encoder": AUDIO_CHUNKS, "vision_encoder": VISION_PATCHES}.get(spec.name)
            if encoder is not None and spec.size != encoder:
                continue
            prompts = (PROMPT_BUCKET, IMAGE_PROMPT_BUCKET) if "prefill" in spec.name else ()
            if encoder is None and (spec.size not in (1, slots, *prompts)
                                    or (spec.size == slots and "prefill" in spec.name)):
                continue
            report, _ = model.audit(spec.fn, spec.example_inputs, strict=False)
            unit = ("tokens" if "prefill" in spec.name else "chunks" if spec.name == "audio_encoder"
                    else "patches (one frame)" if spec.name == "vision_encoder" else "rows")
            rows.append(_row(f"{spec.name}[{spec.size}]", report, f"captured; {spec.size} {unit}"))
        rows.append(_row("steady-state tick glue (1 session)", tick_glue(model, runner),
                         "eager, between the graphs: one steady session's thinker step (runtime/scheduler.py), "
                         "talker step and the frame of its code 0 (runtime/speech.py: settled, its samples and "
                         "codes copied to the host without blocking: the D2H column) minus the captured stages, "
                         "each replay counted as the copies it makes (inputs into its graph buffers; the decode "
                         "stages have no outputs: they write per-slot state)"))

        rows.append(_row("first-packet glue (1 session)", first_packet_glue(model, runner),
                         f"eager, outside the first packet's graph stages: a text prompt of {PROMPT_BUCKET} tokens "
                         "embedded and its TM-RoPE ids made, the thinker prefill's host side (the lm_head on its "
                         "last position, the first token drawn and read), the talker prompt built and its prefill "
                         "launched, the first code 0 drawn and read, the first frame's host side and its packet"))

    rows.append(_total("steady-state tick (1 session)", rows,
                       ["thinker_decode[1]", "talker_decode[1]", "code_predictor[1]", "code2wav[1]"],
                       "graph stages only; the eager glue between them is the 'steady-state tick glue' row"))
    rows.append(_total("first packet (1 session)", rows,
                       [f"audio_encoder[{AUDIO_CHUNKS}]", f"thinker_prefill[{PROMPT_BUCKET}]",
                        f"talker_prefill[{PROMPT_BUCKET}]", "code_predictor[1]", "code2wav_first[1]"],
                       "graph stages of a 10 s spoken question; the eager work around them is the 'first-packet "
                       "glue' row (counted for a text prompt)"))
    rows.append(_total("first packet, image question (1 session)", rows,
                       [f"vision_encoder[{VISION_PATCHES}]", f"thinker_prefill[{IMAGE_PROMPT_BUCKET}]",
                        f"talker_prefill[{IMAGE_PROMPT_BUCKET}]", "code_predictor[1]", "code2wav_first[1]"],
                       "graph stages of a question about a 512 x 512 image; the eager work around them as in the "
                       "'first-packet glue' row plus the merge of the image's features"))
    return rows


def tick_glue(model, runner):
    """StepReport of what one steady tick runs eagerly for one session past its first frame, outside its graphs:
    the scheduler's thinker step, runtime/speech.py's talker step and the frame of its code 0 (code predictor,
    Code2Wav, settled: its codes and samples copied to the host), with runner.run standing in for each replay:
    its inputs copied into graph buffers by runtime/graphs.py's own copy_inputs (the decode stages have no
    outputs: they write per-slot state). The second of two ticks is counted: the first uploads the batch's slot
    ids, which a steady batch then reuses. The tick's read-back is not counted here (its one copy is the
    'steady-state tick' row's blocking read)."""
    from runtime.graphs import copy_inputs
    from runtime.runner import BATCHED
    from runtime.scheduler import Scheduler

    cfg = runner.config
    request = Request(SimpleNamespace(input_ids=torch.zeros(1, 40, dtype=torch.long)), GenerationOptions())
    session = Session(0, request, None, cfg.im_end_token_id, cfg.talker.codec_eos_token_id, 24000)
    session.slot, session.state, session.thinker.tokens = 0, "decode", [11, 12, 13, 14, 15, 16]
    graphs = {}  # stage -> (its input buffers, what was last copied into them)

    def replay(name, inputs):
        buffers, last = graphs.setdefault(name, ([torch.empty_like(v) for v in inputs], [None] * len(inputs)))
        copy_inputs(buffers, inputs, *BATCHED[name], last)
        return ()

    def tick(frame: int):
        # frame k settled, its text a fed token: the talker step, the next frame made, read and settled
        session.talker = TalkerProgress(49, frame=frame, ready=True)
        Scheduler._thinker_decode(SimpleNamespace(runner=runner), [session])
        speech.talker_decode(runner, [session])
        speech.make_frames(runner, [session])
        session.talker.code0_value = 5  # read with the tick's one read-back (the thinker's tokens with it)
        speech.settle_frame(session)

    runner.run = replay
    try:
        model.audit(lambda: tick(1), (), strict=False)  # (audited too: the packet's copy needs the stand-in)
        report, _ = model.audit(lambda: tick(2), (), strict=False)
    finally:
        del runner.run
    # the packet is put together on the host (its frames' copies there, pcm16): host work, no kernel
    report.violations = [v for v in report.violations if not v.startswith("CPU computation")]
    return report


def first_packet_glue(model, runner):
    """StepReport of what a text prompt's first packet runs eagerly outside its graphs (the stages of the
    'first packet' row): the prompt's embedding and TM-RoPE ids (runtime/prefill.py), the thinker prefill's host
    side (its chunk's padding, the lm_head on the last position, the first token's draw and read), the talker
    prompt build and its prefill's host side, the first code 0's draw, the first frame's host side
    (runtime/speech.py make_frames: code predictor, Code2Wav's first frame), the read of code 0 and the packet.
    runner.run stands in for each replay as in `tick_glue`. A prompt of PROMPT_BUCKET tokens, one prefill chunk."""
    from runtime.engine import Prompt
    from runtime.models.thinker import MultimodalInputs
    from runtime.scheduler import Scheduler

    cfg, meta = runner.config, dict(device=runner.device)
    thinker_hidden, talker_hidden = cfg.thinker.text.hidden_size, cfg.talker.text.hidden_size
    chat_end = [cfg.im_end_token_id, 198, cfg.im_start_token_id, cfg.assistant_token_id, 198]
    user = [cfg.im_start_token_id, cfg.user_token_id, 198]
    ids = torch.tensor([user + [1000 + i for i in range(PROMPT_BUCKET - len(user) - len(chat_end))] + chat_end])
    request = Request(Prompt(ids, None, MultimodalInputs()), GenerationOptions(return_audio=True))
    session = Session(0, request, None, cfg.im_end_token_id, cfg.talker.codec_eos_token_id, 24000)
    session.slot, session.state = 0, "prefill"
    outputs = {  # the prefill stages' outputs (the decode stages have none: they write per-slot state)
        "thinker_prefill": lambda: (torch.empty(1, thinker_hidden, dtype=runner.dtype, **meta),
                                    torch.empty(1, PROMPT_BUCKET, thinker_hidden, dtype=runner.dtype, **meta)),
        "talker_prefill": lambda: (torch.empty(1, cfg.talker.text.vocab_size, dtype=runner.dtype, **meta),
                                   torch.empty(1, talker_hidden, dtype=runner.dtype, **meta)),
        "code_predictor": tuple, "code2wav_first": tuple}

    def replay(name, inputs):  # prefill chunks: every input copied in (runtime/graphs.py GraphRunner._replay)
        for value in inputs:
            torch.empty_like(value).copy_(value)
        return tuple(out.clone() for out in outputs[name]())

    scheduler = SimpleNamespace(runner=runner, _take_tokens=lambda sessions, ring, count: [  # t1: draw 0
        s.take_token(ring[0][s.slot]) for s in sessions])

    def first_packet():
        # embeds, the chunk, the talker prompt + prefill and the first frame, then t1 (read)
        Scheduler._prefill_chunk(scheduler, [session])
        session.talker.code0_value = runner.read_tick()[1][session.slot]  # the tick's read of code 0
        speech.settle_frame(session)  # the frame stands: its packet

    runner.run = replay
    try:
        report, _ = model.audit(first_packet, (), strict=False)
    finally:
        del runner.run
    # the layouts computed on the host ids are host work by design here (not inside a captured step)
    report.violations = [v for v in report.violations if not v.startswith("CPU computation")]
    return report


def print_table(rows: list[dict]) -> None:
    head = f"{'stage':42} {'kernels':>8} {'syncs':>6} {'H2D':>4} {'D2H':>4} {'weights GB':>10} " \
           f"{'H100 µs':>8} {'H200 µs':>8} {'launch µs':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['stage']:42} {r['kernels']:8d} {r['host_syncs']:6d} {r['h2d_copies']:4d} {r['d2h_copies']:4d} "
              f"{r['weight_bytes'] / 1e9:10.3f} {r['bytes_floor_us_H100']:8.0f} {r['bytes_floor_us_H200']:8.0f} "
              f"{r['launch_floor_us']:9.0f}")
    print("\nweights GB: parameter bytes read (MoE: routed experts only, worst case); H100/H200 µs: those bytes at "
          "nominal HBM bandwidth; launch µs: kernels x 1.5 µs per dependent graph node. Counted on the meta device "
          "(CPU), not timed.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="triton", help="kernel choice: triton (default), torch, cuda")
    parser.add_argument("--slots", type=int, default=8, help="session slots (the largest batch bucket)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for launches.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.kernels, args.slots)
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), kernels=args.kernels,
                slots=args.slots, torch=torch.__version__, dtype="bfloat16", model="qwen3-omni-30b-a3b",
                how="counted on the meta device by runtime/graph_audit.py (no GPU); not timed")
    (out / "launches.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1) + "\n")
    print(f"\nwrote {out / 'launches.json'} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
