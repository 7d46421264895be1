"""`python -m runtime demo | generate`: a playable 24 kHz wav, the text and the per-stage timings."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.__main__ import main


def test_demo_writes_a_playable_wav(tmp_path, monkeypatch, capsys):
    soundfile = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")  # the demo clip is at 44.1 kHz
    monkeypatch.setenv("OMNI_RT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.wav"
    assert main(["demo", "--out", str(out), "--max-new-tokens", "4", "--talker-max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "text:" in printed and "first audio packet" in printed and "RTF" in printed
    audio, rate = soundfile.read(out)
    assert rate == 24000 and audio.ndim == 1 and audio.size > 0 and np.abs(audio).max() <= 1.0
    assert (tmp_path / "cache" / "tiny" / "config.json").is_file(), "the tiny checkpoint is kept for reuse"


def test_generate_with_files_and_clear_errors(tmp_path, monkeypatch, capsys):
    soundfile = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")  # the clip is at 48 kHz
    from runtime.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    clip, picture = tmp_path / "q.wav", tmp_path / "p.png"
    rng = np.random.default_rng(26)  # with --seed: the same answer every run, one that speaks
    soundfile.write(clip, (0.2 * rng.standard_normal(30000)).astype(np.float32), 48000)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(picture)
    out = tmp_path / "answer.wav"
    args = ["generate", "--checkpoint", str(checkpoint), "--audio", str(clip), "--image", str(picture),
            "--text", "What is this?", "--seed", "5", "--out", str(out), "--max-new-tokens", "3",
            "--talker-max-new-tokens", "5"]
    assert main(args) == 0
    assert "speech: " in capsys.readouterr().out and soundfile.info(out).samplerate == 24000
    assert main(args[:-4] + ["--speaker", "nobody"]) == 2
    assert "unknown speaker" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(checkpoint), "--audio", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "runtime", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "generate" in done.stdout


def test_an_answer_without_speech_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """When the talker ends the speech before its first frame, `generate` says so instead of leaving the user to
    find no file at --out."""
    from runtime.engine import OmniEngine
    from runtime.streaming import AudioChunk
    from runtime.tiny import write_tiny_checkpoint

    real_stream = OmniEngine.stream

    class Silent:  # the real stream, its audio dropped (as when code 0 of the first frame is the codec EOS)
        def __init__(self, engine, **request):
            self.inner = real_stream(engine, **request)
            self.timings = self.inner.timings

        def __iter__(self):
            return (event for event in self.inner if not isinstance(event, AudioChunk))

    monkeypatch.setattr(OmniEngine, "stream", lambda engine, **request: Silent(engine, **request))
    out = tmp_path / "answer.wav"
    assert main(["generate", "--checkpoint", str(write_tiny_checkpoint(tmp_path / "ckpt")), "--text", "Hello?",
                 "--seed", "1", "--out", str(out), "--max-new-tokens", "3", "--talker-max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"speech: none (the talker ended the speech before its first frame); nothing written to {out}" in printed
    assert not out.exists()
