"""config.json reading: presets, both key spellings, and a clear error naming the field for bad input."""

import copy
import json

import pytest

from runtime.config import ConfigError, OmniConfig
from runtime.presets import qwen3_omni_30b_a3b, tiny
from tests.oracle import hf_config_dict


def test_released_preset_has_the_released_shapes():
    cfg = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    text = cfg.thinker.text
    assert (text.vocab_size, text.hidden_size, text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim) == \
        (152064, 2048, 48, 32, 4, 128)
    assert (text.num_experts, text.top_k, text.moe_intermediate_size, text.mrope_section) == (128, 8, 768, (24, 20, 20))
    talker = cfg.talker
    assert (talker.text.top_k, talker.text.shared_expert_intermediate_size, talker.num_code_groups) == (6, 768, 16)
    assert (talker.codec_eos_token_id, talker.speaker_id["ethan"], talker.accept_hidden_layer) == (2150, 2302, 24)
    assert cfg.code2wav.samples_per_frame == 1920
    assert cfg.thinker.audio_token_id == 151675 and cfg.thinker.position_id_per_seconds == 13


@pytest.mark.parametrize("make", [tiny, qwen3_omni_30b_a3b])
def test_round_trip_through_transformers_config(make):
    from transformers import Qwen3OmniMoeConfig

    ours = OmniConfig.from_dict(make())
    written = Qwen3OmniMoeConfig(**ours.to_dict()).to_dict()
    assert OmniConfig.from_dict(json.loads(json.dumps(written))) == ours


@pytest.mark.parametrize("variant", ["pow2", "odd"])
def test_reads_what_transformers_saves(variant, tmp_path):
    from transformers import Qwen3OmniMoeConfig

    Qwen3OmniMoeConfig(**hf_config_dict(variant)).save_pretrained(tmp_path)
    cfg = OmniConfig.from_pretrained(tmp_path)
    expected = hf_config_dict(variant)
    assert cfg.thinker.text.hidden_size == expected["thinker_config"]["text_config"]["hidden_size"]
    # 5.x writes the talker expert count as num_local_experts.
    assert cfg.talker.text.num_experts == expected["talker_config"]["text_config"]["num_experts"]
    assert cfg.talker.code_predictor.rope_theta == 1e6


def test_reads_4_57_rope_spelling():
    data = tiny()
    text = data["thinker_config"]["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = {**rope, "type": "default"}
    cfg = OmniConfig.from_dict(data)
    assert cfg.thinker.text.mrope_section == tuple(rope["mrope_section"])
    assert cfg.thinker.text.rope_theta == text["rope_theta"]


def _broken(edit):
    data = copy.deepcopy(tiny())
    edit(data)
    return data


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(model_type="qwen2_5_omni"), "model_type"),
    (lambda d: d["thinker_config"]["text_config"].pop("vocab_size"), "thinker_config.text_config.vocab_size"),
    (lambda d: d["thinker_config"]["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d["thinker_config"]["text_config"].update(hidden_act="gelu"), "thinker_config.text_config.hidden_act"),
    (lambda d: d["thinker_config"]["text_config"]["rope_parameters"].update(rope_type="yarn"), "rope_type"),
    (lambda d: d["thinker_config"]["text_config"].update(mlp_only_layers=[1]), "mlp_only_layers"),
    (lambda d: d["thinker_config"]["text_config"].update(num_experts_per_tok=9), "num_experts_per_tok"),
    (lambda d: d["thinker_config"]["audio_config"].update(output_dim=48), "audio_config.output_dim"),
    (lambda d: d["thinker_config"]["vision_config"].update(out_hidden_size=48), "vision_config.out_hidden_size"),
    (lambda d: d["thinker_config"]["vision_config"].update(deepstack_visual_indexes=[0, 9]), "deepstack_visual_indexes"),
    (lambda d: d["talker_config"].update(thinker_hidden_size=32), "talker_config.thinker_hidden_size"),
    (lambda d: d["talker_config"].update(codec_eos_token_id=5), "talker_config.codec_eos_token_id"),
    (lambda d: d["talker_config"].update(speaker_id={}), "talker_config.speaker_id"),
    (lambda d: d["talker_config"]["code_predictor_config"].update(num_code_groups=8), "num_code_groups"),
    (lambda d: d["code2wav_config"].update(num_quantizers=8), "code2wav_config.num_quantizers"),
    (lambda d: d.update(im_start_token_id=10**6), "im_start_token_id"),
    (lambda d: d["thinker_config"]["text_config"].update(hidden_size="64"), "thinker_config.text_config.hidden_size"),
])
def test_bad_config_names_the_field(edit, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        OmniConfig.from_dict(_broken(edit))


def test_missing_config_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        OmniConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        OmniConfig.from_pretrained(tmp_path)


def test_thinker_only_checkpoint_has_no_talker():
    data = tiny()
    data["enable_audio_output"] = False
    del data["talker_config"], data["code2wav_config"]
    cfg = OmniConfig.from_dict(data)
    assert cfg.talker is None and cfg.code2wav is None
