"""bench/e2e_latency.py runs end to end (CPU smoke mode: the tiny preset) and writes its Table 2 rows.
No timing is asserted: performance is measured on a GPU, in bench/, never in unit tests."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_table_and_json(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e_latency.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT GPU measurements" in done.stdout
    assert "first_packet_ms" in done.stdout and "transformers" in done.stdout
    (path,) = tmp_path.glob("e2e_latency-smoke-*.json")
    result = json.loads(path.read_text())
    configs = result["omni_rt"]["configs"]
    assert set(configs) == {"audio/c=1", "audio/c=2", "video/c=1", "video/c=2"}
    for key, config in configs.items():
        sessions = config["sessions"]
        assert len(sessions) == int(key.split("c=")[1])
        for session in sessions:  # every session spoke: the rows are real numbers, in a sane order
            assert session["frames"] > 0 and session["first_packet_ms"] > 0
            assert session["thinker_first_token_ms"] <= session["talker_first_frame_ms"] <= session["first_packet_ms"]
    assert set(result["transformers"]["configs"]) == {"audio/c=1", "video/c=1"}
    assert result["info"]["device"].startswith("CPU")
