"""bench/run_gpu.sh (the one command of a GPU session) on the CPU: its dry run lists every stage with its time
limit within the 480 s budget, STAGES selects, a failing stage is recorded and the next one runs; and the
modules the GPU image runs import without soundfile, soxr and cffi (the image has none of them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_gpu.sh"
DEFAULT_ORDER = ["env", "build", "tests", "kernels_decode", "graphs", "e2e", "kernels_rest"]
BUDGET_S = 480


def run_script(*args, tmp_path, timeout=120, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("T_") and k not in ("STAGES", "TOTAL")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**clean, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env})


def dry_run_stages(stdout: str) -> dict[str, tuple[int, str]]:
    """stage -> (limit in seconds, command) from the dry run's table."""
    stages = {}
    for line in stdout.splitlines()[1:]:
        match = re.match(r"^(\w+)\s+(\d+)\s+(.*)$", line)
        if match:
            stages[match.group(1)] = (int(match.group(2)), match.group(3))
    return stages


def test_dry_run_lists_every_stage_with_its_limit_within_the_budget(tmp_path):
    done = run_script("--dry-run", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    stages = dry_run_stages(done.stdout)
    assert list(stages) == DEFAULT_ORDER + ["report"], done.stdout
    assert all(limit > 0 for limit, _ in stages.values())
    total = sum(limit for limit, _ in stages.values())
    assert total <= BUDGET_S and f"sum: {total} s of TOTAL={BUDGET_S} s" in done.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    out = tmp_path / "out"
    build, tests, graphs = stages["build"][1], stages["tests"][1], stages["graphs"][1]
    assert "OMNI_RT_REQUIRE_CUDA=1" in build and "setup.py build_ext --inplace" in build  # CMake errors fail it
    for command, junit in ((tests, "tests.xml"), (graphs, "graphs.xml")):
        assert f"--junitxml={out}/{junit}" in command and "-rfE" in command and " -v " in command
        assert " -q " not in command
    assert "-k 'not graph'" in tests and "tests/test_triton_moe.py" in tests and "tests/test_kernels_model.py" in tests
    assert "-k graph" in graphs and "tests/test_graphs.py" in graphs
    for name in re.findall(r"tests/\S+\.py", tests + " " + graphs):
        assert (ROOT / name).is_file(), name
    assert "--ops moe_experts:decode,decode_attention" in stages["kernels_decode"][1]
    assert "--skip-ops moe_experts:decode,decode_attention" in stages["kernels_rest"][1]
    assert "--layers" in stages["e2e"][1] and f"--out {out}/results" in stages["e2e"][1]


def test_stage_selection_limits_and_unknown_stages(tmp_path):
    done = run_script("--dry-run", tmp_path=tmp_path, STAGES="build kernels_decode", T_BUILD="30")
    assert done.returncode == 0
    limits = {name: limit for name, (limit, _) in dry_run_stages(done.stdout).items()}
    assert limits == {"build": 30, "kernels_decode": 60, "report": 10}
    over = run_script("--dry-run", tmp_path=tmp_path, T_TESTS="900")
    assert over.returncode == 0 and "more than TOTAL" in over.stdout
    unknown = run_script("--dry-run", tmp_path=tmp_path, STAGES="build bogus")
    assert unknown.returncode == 2 and "unknown stage bogus" in unknown.stderr
    assert run_script("--bogus", tmp_path=tmp_path).returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this stage would run the real benchmark")
def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    """Without CUDA bench/kernels.py refuses (rc 2): the stage is FAILED in summary.tsv, the env stage after
    it still runs, and the report ends with the stage table."""
    # generous limits: on a loaded 2-core machine importing torch alone can take longer than the GPU defaults
    done = run_script(tmp_path=tmp_path, STAGES="kernels_decode env", T_ENV="120", T_KERNELS_DECODE="120", timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert rows[0] == ["stage", "rc", "seconds", "limit_s", "status"]
    assert [r[0] for r in rows[1:]] == ["kernels_decode", "env"]
    assert rows[1][1] == "2" and rows[1][4] == "FAILED" and rows[2][1] == "0" and rows[2][4] == "ok"
    assert "no CUDA GPU here" in (out / "kernels_decode.log").read_text()
    environment = (out / "environment.txt").read_text()
    assert "torch:" in environment and "commit:" in environment
    assert done.stdout.rstrip().splitlines()[-1].startswith("env")  # the stage table is printed last


POISONED_IMPORTS = """
import sys
for name in ("soundfile", "soxr", "cffi"):
    sys.modules[name] = None  # what the GPU image has: none of them
import numpy as np
import torch
import runtime.engine, runtime.__main__, bench.e2e_latency, bench.kernels
from runtime.frontend import audio
wave = torch.randn(16000, generator=torch.Generator().manual_seed(0))
assert audio.log_mel_spectrogram(wave).shape[0] == 128
assert torch.equal(audio.resample(wave, 16000), wave)  # same rate: soxr not needed
for call, missing in ((lambda: audio.load_audio(sys.argv[1]), "soundfile"), (lambda: audio.resample(wave, 44100), "soxr")):
    try:
        call()
    except ModuleNotFoundError as exc:
        print(f"{missing}: {exc}")
    else:
        raise SystemExit(f"no error without {missing}")
"""


def test_gpu_image_modules_import_without_soundfile_soxr_cffi(tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF" + bytes(64))
    done = subprocess.run([sys.executable, "-c", POISONED_IMPORTS, str(clip)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["soundfile"].startswith("soundfile is not installed: pip install soundfile==0.14.0")
    assert "decode audio files" in lines["soundfile"]
    assert lines["soxr"].startswith("soxr is not installed: pip install soxr==1.1.0")
