"""bench/e2e_latency.py runs end to end (CPU smoke mode: the tiny preset) and writes its Table 2 rows.
No timing is asserted: performance is measured on a GPU, in bench/, never in unit tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_table_and_json(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "e2e_latency.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT GPU measurements" in done.stdout
    assert "first_packet_ms" in done.stdout and "transformers" in done.stdout
    (path,) = tmp_path.glob("e2e_latency-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["complete"] is True and result["omni_rt"]["model"] == "tiny (all layers)"
    assert not list(tmp_path.glob("*.partial"))  # rewritten after each configuration, the last write renamed in
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


def test_reduced_layers_keep_the_released_shapes_and_say_so():
    """--layers N: the released shapes with N thinker decoder layers (talker scaled alike); built on the meta
    device here (free at any size), so only the structure is checked."""
    from bench.e2e_latency import model_config
    from runtime.config import OmniConfig
    from runtime.models.omni import build_model

    full = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    config, label = model_config("qwen3-omni-30b-a3b", 8)
    assert config.thinker.text.num_layers == 8 and config.talker.text.num_layers == 3
    assert config.talker.accept_hidden_layer == 4 and "NOT the full model" in label and "8 of 48" in label
    assert config.thinker.text.hidden_size == full.thinker.text.hidden_size
    assert config.thinker.text.num_experts == full.thinker.text.num_experts
    assert config.thinker.audio == full.thinker.audio and config.code2wav == full.code2wav
    model = build_model(config, "meta")
    assert len(model.thinker.model.layers) == 8 and len(model.talker.model.layers) == 3
    assert model_config("qwen3-omni-30b-a3b", None)[1] == "qwen3-omni-30b-a3b (all layers)"


def test_bad_layer_count_is_refused_before_any_work(capsys):
    from bench.e2e_latency import main

    for argv in (["--layers", "2"], ["--smoke", "--layers", "8"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--layers must be within 3..48" in err and "not of 'tiny'" in err
