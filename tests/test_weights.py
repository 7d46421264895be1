"""Checkpoint loader: HF layout in, fused/stacked tensors out; one error for every mismatch; random init."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import OmniConfig
from runtime.models.decoder import Decoder
from runtime.weights import CheckpointError, init_random_, load_weights, save_weights
from tests.oracle import build_oracle


class TextModel(Decoder):
    """A thinker text model as it sits in the checkpoint under `thinker.model.`."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


def tiny_text_config():
    return OmniConfig.from_pretrained("tiny").thinker.text


def random_model(seed):
    with torch.device("meta"):
        model = TextModel(tiny_text_config())
    return init_random_(model, seed=seed)


def test_save_load_round_trip_sharded(tmp_path):
    seed = int(torch.randint(0, 2**31, ()).item())
    model = random_model(seed)
    save_weights(model, tmp_path, prefix="thinker.model.", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    names = set(index["weight_map"])
    # Hub layout on disk: per-expert and unfused names.
    assert "thinker.model.layers.0.mlp.experts.7.up_proj.weight" in names
    assert "thinker.model.layers.3.self_attn.k_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    with torch.device("meta"):
        fresh = TextModel(tiny_text_config())
    load_weights(fresh, tmp_path, prefix="thinker.model.")
    for (name, ours), (_, ref) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(ours, ref), name
    assert torch.equal(fresh.inv_freq, model.inv_freq)


def test_fusion_matches_transformers(tmp_path):
    """Our fused q|k|v, gate|up and stacked experts equal what transformers builds from the same files."""
    oracle = build_oracle("odd", tmp_path, seed=int(torch.randint(0, 2**31, ()).item()))
    cfg = OmniConfig.from_pretrained(tmp_path).thinker.text
    with torch.device("meta"):
        ours = TextModel(cfg)
    load_weights(ours, tmp_path, prefix="thinker.model.")
    theirs = oracle.thinker.model.language_model
    for i, layer in enumerate(theirs.layers):
        mine = ours.layers[i]
        attn = layer.self_attn
        assert torch.equal(mine.self_attn.qkv_proj.weight,
                           torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert torch.equal(mine.mlp.experts.gate_up_proj, layer.mlp.experts.gate_up_proj)
        assert torch.equal(mine.mlp.experts.down_proj, layer.mlp.experts.down_proj)
        assert torch.equal(mine.mlp.gate.weight, layer.mlp.gate.weight)


def test_one_error_lists_every_problem_and_loads_nothing(tmp_path):
    model = random_model(seed=3)
    save_weights(model, tmp_path, prefix="thinker.model.")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["thinker.model.layers.1.self_attn.q_proj.weight"]
    del tensors["thinker.model.layers.2.mlp.experts.5.down_proj.weight"]
    tensors["thinker.model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.randn(4, 4)
    tensors["thinker.model.norm.weight"] = torch.randn(7)
    save_file(tensors, path)
    target = random_model(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(target, tmp_path, prefix="thinker.model.")
    message = str(err.value)
    assert "2 missing" in message and "1 unexpected" in message and "1 wrong shape" in message
    for name in ("layers.1.self_attn.q_proj.weight", "layers.2.mlp.experts.5.down_proj.weight",
                 "shared_expert.gate_proj.weight", "norm.weight: checkpoint [7], model expects [64]"):
        assert name in message
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a failed load"


def test_missing_directory_and_empty_directory(tmp_path):
    model = random_model(seed=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(model, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_weights(model, tmp_path)


def test_index_naming_absent_shard(tmp_path):
    model = random_model(seed=6)
    save_weights(model, tmp_path, prefix="thinker.model.", max_shard_bytes=200_000)
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_weights(model, tmp_path, prefix="thinker.model.")


def test_progress_bar_and_dtype(tmp_path, capsys):
    model = random_model(seed=7)
    save_weights(model, tmp_path, prefix="thinker.model.")
    with torch.device("meta"):
        fresh = TextModel(tiny_text_config())
    load_weights(fresh, tmp_path, prefix="thinker.model.", dtype=torch.bfloat16, progress=True)
    assert "loading weights" in capsys.readouterr().err
    assert all(p.dtype == torch.bfloat16 for p in fresh.parameters())
    assert fresh.inv_freq.dtype == torch.float32


def test_init_random_on_meta_builds_sane_weights():
    model = random_model(seed=11)
    assert all(p.device.type == "cpu" for p in model.parameters())
    reference = TextModel(tiny_text_config())
    assert torch.equal(model.inv_freq, reference.inv_freq), "rotary table must be recomputed, not garbage"
    experts = model.layers[0].mlp.experts.gate_up_proj
    assert abs(experts.std().item() - experts.shape[-1] ** -0.5) < 0.1 * experts.shape[-1] ** -0.5
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    again = random_model(seed=11)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    bf16 = init_random_(TextModel(tiny_text_config()).to("meta"), seed=1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters()) and bf16.inv_freq.dtype == torch.float32


def test_released_preset_matches_the_published_checkpoint():
    """Built on the meta device at the real shapes: the parameter count and the number of checkpoint tensors
    equal those published for Qwen3-Omni-30B-A3B-Instruct (35,259,818,545 and 28,010; MODEL_SPEC §0, §12)."""
    from runtime.models.omni import build_model
    from runtime.weights import _plan

    model = build_model(OmniConfig.from_pretrained("qwen3-omni-30b-a3b"))
    assert sum(p.numel() for p in model.parameters()) == 35_259_818_545
    assert sum(p.numel() for p in model.thinker.audio_tower.parameters()) == 647_927_168
    assert sum(p.numel() for p in model.thinker.visual.parameters()) == 538_631_408
    assert sum(len(source.parts) for source in _plan(model, "")) == 28_010
