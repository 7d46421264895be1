"""Video files: a clip made here with PyAV (a square moving over a gradient, a 440 Hz tone), decoded and sampled
by runtime/frontend/video.py, against transformers.

Frames: transformers' Qwen2VLVideoProcessor imports torchvision, which is not installed, so it runs in a
subprocess on the stand-in tests/torchvision_standin.py (as tests/test_frontend_vision.py does), on frames
transformers' own PyAV reader (`video_utils.load_video(backend="pyav")`) decodes, with its frame sampling
(`do_sample_frames=True`, fps). Our pixel_values_videos, grid and the sampled frames must match.
Audio track (use_audio_in_video): transformers decodes a video's audio with torchcodec only (not installed), so
the track is checked against the tone written into the clip (length and pitch), and the prompt built from the
file against Qwen3OmniMoeProcessor given the same frames and track: input_ids exact, features within fp32
tolerance; generate on the file gives transformers' thinker's greedy tokens (the tiny checkpoint loaded by
Qwen3OmniMoeForConditionalGeneration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="PyAV not installed (pip install av==18.1.0)")
pytest.importorskip("soxr")

from runtime.frontend.video import load_video, sample_frame_indices  # noqa: E402
from runtime.frontend.vision import preprocess_video  # noqa: E402
from tests import bad_input_files as files  # noqa: E402

FPS = 2.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REFERENCE = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers.video_utils import load_video
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor
    spec = json.loads(sys.argv[1])
    processor = Qwen2VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    frames, metadata = load_video(spec["path"], backend="pyav")
    out = processor(videos=[frames], video_metadata=[metadata], do_sample_frames=True, fps=spec["fps"],
                    return_tensors="pt", cap_pixels_per_frame=False, **Qwen3OmniMoeProcessor.videos_kwargs)
    indices = processor.sample_frames(metadata, fps=spec["fps"])
    torch.save({"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"],
                "indices": torch.as_tensor(indices), "all_frames": torch.from_numpy(frames),
                "sample_cases": [processor.sample_frames(type(metadata)(total_num_frames=n, fps=f, duration=n / f),
                                                         fps=s).tolist() for n, f, s in spec["sample_cases"]]},
               spec["out"])
''')
SAMPLE_CASES = [(16, 8.0, 2.0), (17, 8.0, 2.0), (300, 30.0, 1.0), (301, 29.97, 2.0), (9, 24.0, 1.0), (5000, 25.0, 2.0),
                (40, 10.0, 0.5)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return files.video(folder / "clip.mp4", audio=True, seconds=2.0, fps=8, size=(96, 128))


@pytest.fixture(scope="module")
def reference(clip, tmp_path_factory):
    from tests.torchvision_standin import write_standin

    folder = str(tmp_path_factory.mktemp("standin"))
    write_standin(folder)
    out = os.path.join(folder, "ref.pt")
    spec = dict(path=str(clip), fps=FPS, out=out, sample_cases=SAMPLE_CASES)
    done = subprocess.run([sys.executable, "-c", _REFERENCE, json.dumps(spec)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([folder, REPO])), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_frames_and_sampling_match_transformers(clip, reference):
    ours = load_video(clip, fps=FPS)
    assert ours.indices.tolist() == reference["indices"].tolist()
    assert np.array_equal(ours.frames, reference["all_frames"].numpy()[ours.indices])
    pixel_values, grid, second_per_grid = preprocess_video(ours.frames, fps=FPS)
    assert torch.equal(grid, reference["video_grid_thw"])
    want = reference["pixel_values_videos"]
    err = ((pixel_values - want).norm() / want.norm()).item()
    assert err < 1e-5, f"pixel_values_videos relative error {err:.2e}"
    assert second_per_grid.tolist() == [2 / FPS]
    # the frames move: a sampled clip of identical frames would hide a sampling bug
    assert not np.array_equal(ours.frames[0], ours.frames[-1])


def test_frame_sampling_rule_matches_transformers(reference):
    got = [sample_frame_indices(n, f, s).tolist() for n, f, s in SAMPLE_CASES]
    assert got == reference["sample_cases"]


def test_audio_track_is_the_tone(clip):
    track = load_video(clip, fps=FPS, with_audio=True).audio
    assert track is not None and track.dtype == np.float32
    assert abs(track.size / 16000 - 2.0) < 0.1, f"{track.size / 16000:.3f} s of audio for a 2 s clip"
    middle = track[4000:28000]
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(middle.size)))
    peak_hz = np.argmax(spectrum) * 16000 / middle.size
    assert abs(peak_hz - 440) < 3, f"peak at {peak_hz:.1f} Hz"
    assert 0.2 < np.abs(middle).max() < 0.6  # written at amplitude 0.4


@pytest.mark.parametrize("source", ["file", "arrays"])
def test_use_audio_in_video_equals_processor(clip, source):
    """The prompt from the video file (and from its frames + track passed raw) equals Qwen3OmniMoeProcessor on
    the same frames and track with load_audio_from_video: the audio-in-video interleaving token for token."""
    from transformers import AutoTokenizer

    from runtime.engine import OmniEngine
    from runtime.tiny import ensure_tiny_checkpoint
    from tests.test_frontend_text import _make_processor

    checkpoint = ensure_tiny_checkpoint(os.path.join(os.path.dirname(str(clip)), "tiny"))
    engine = OmniEngine.from_pretrained(checkpoint)
    decoded = load_video(clip, fps=FPS, with_audio=True)
    if source == "file":
        prompt = engine.prepare("What happens?", videos=str(clip), video_fps=FPS, use_audio_in_video=True)
    else:
        prompt = engine.prepare("What happens?", audio=[decoded.audio], sample_rate=16000, videos=decoded.frames,
                                video_fps=FPS, use_audio_in_video=True)
    processor = _make_processor(AutoTokenizer.from_pretrained(str(checkpoint)))
    messages = [{"role": "system", "content": [{"type": "text", "text": _system()}]},
                {"role": "user", "content": [{"type": "video", "video": "clip"},
                                             {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, grid, _ = preprocess_video(decoded.frames, fps=FPS)
    t, h, w = grid[0].tolist()
    stand_in_clip = np.zeros((2 * t, 16 * h, 16 * w, 3), np.uint8)  # the stand-in reads the grid off the shape
    want = processor(text=text, audio=[decoded.audio], videos=[stand_in_clip], return_tensors="pt",
                     load_audio_from_video=True, audio_from_video_indices=[0], videos_kwargs={"fps": FPS})
    assert torch.equal(prompt.input_ids, want["input_ids"].long())
    assert torch.equal(prompt.inputs.feature_attention_mask, want["feature_attention_mask"].long())
    valid = want["feature_attention_mask"].bool()
    got_f, want_f = prompt.inputs.input_features.permute(0, 2, 1)[valid], want["input_features"].permute(0, 2, 1)[valid]
    assert ((got_f - want_f).norm() / want_f.norm()).item() < 1e-5
    assert prompt.inputs.use_audio_in_video
    assert torch.equal(prompt.inputs.video_grid_thw, grid)
    if source == "arrays":
        return
    # Greedy tokens against transformers' thinker on the same checkpoint, fed the processor's ids and audio
    # features and the video pixels (ours: equal to Qwen2VLVideoProcessor's, test_frames_and_sampling_...).
    from transformers import Qwen3OmniMoeForConditionalGeneration

    hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        str(checkpoint), attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    steps, eos = 8, engine.config.im_end_token_id
    ours = engine.generate("What happens?", videos=str(clip), video_fps=FPS, use_audio_in_video=True,
                           max_new_tokens=steps, return_audio=False)
    with torch.no_grad():
        theirs = hf.thinker.generate(
            input_ids=want["input_ids"], input_features=want["input_features"],
            feature_attention_mask=want["feature_attention_mask"], pixel_values_videos=prompt.inputs.pixel_values_videos,
            video_grid_thw=want["video_grid_thw"], video_second_per_grid=torch.tensor([2 / FPS]),
            use_audio_in_video=True, max_new_tokens=steps, do_sample=False, eos_token_id=eos)
    assert torch.equal(ours.sequences, theirs), f"{ours.sequences[0, -steps:]} != {theirs[0, -steps:]}"


def _system():
    from runtime.frontend.prompt import DEFAULT_SYSTEM_PROMPT

    return DEFAULT_SYSTEM_PROMPT
