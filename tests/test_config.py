import json

import pytest
import torch
import transformers

from mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from mllama.config import PRESETS


def test_defaults_and_aliases_follow_the_documentation():
    v, t, c = MllamaVisionConfig(), MllamaTextConfig(), MllamaConfig()
    assert (v.hidden_size, v.attention_heads, v.image_size, v.vision_output_dim, v.max_num_tiles) == (1280, 16, 448, 7680, 4)
    assert v.num_attention_heads == 16 and MllamaVisionConfig(num_attention_heads=8).attention_heads == 8
    assert v.intermediate_layers_indices == [3, 7, 15, 23, 30] and len(v.supported_aspect_ratios) == 8
    assert (t.vocab_size, t.num_hidden_layers, t.cross_attention_layers[-1], t.rope_theta) == (128256, 40, 38, 500000.0)
    assert t.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0} and t.rope_scaling is None
    assert c.image_token_index == c.image_token_id == 128256
    assert MllamaConfig(image_token_id=5).image_token_index == 5
    assert c.compat == "meta"


def test_defaults_equal_transformers_defaults():
    ours = MllamaConfig().to_dict("transformers5")
    theirs = transformers.MllamaConfig().to_dict()
    for sub in ("text_config", "vision_config"):
        for key, value in ours[sub].items():
            if key in theirs[sub]:
                assert theirs[sub][key] == value, (sub, key)


@pytest.mark.parametrize("name,layers,cross,params", [("11b-instruct", 40, 8, 10_670_220_835),
                                                       ("90b-instruct", 100, 20, 88_593_355_323)])
def test_presets_have_the_published_shapes(name, layers, cross, params):
    from mllama import MllamaForConditionalGeneration

    config = PRESETS[name]()
    assert config.text_config.num_hidden_layers == layers and len(config.text_config.cross_attention_layers) == cross
    assert config.text_config.eos_token_id == [128001, 128008, 128009]
    assert config.text_config.rope_parameters["rope_type"] == "llama3"
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    assert model.num_parameters() == params  # counted by transformers 5.24 on the meta device (spec §1.4)


def test_both_config_generations_read_and_write():
    published = MllamaConfig.llama_3_2_11b().to_dict()
    assert "rope_scaling" in published["text_config"] and "rope_parameters" not in published["text_config"]
    v5 = MllamaConfig.llama_3_2_11b().to_dict("transformers5")
    assert v5["text_config"]["rope_parameters"]["rope_type"] == "llama3"
    assert MllamaConfig.from_dict(published) == MllamaConfig.from_dict(v5)
    # transformers 5 reads what we write and writes what we read
    theirs = transformers.MllamaConfig(**{k: v for k, v in published.items() if k != "model_type"})
    assert theirs.text_config.rope_parameters["factor"] == 8.0
    back = MllamaConfig.from_dict(json.loads(theirs.to_json_string()))
    assert back.text_config.rope_parameters == MllamaConfig.from_dict(published).text_config.rope_parameters
    # legacy "type" key of old rope_scaling dicts
    legacy = MllamaTextConfig(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_type"] == "linear"


def test_file_round_trip(tmp_path):
    config = MllamaConfig.llama_3_2_90b(compat="transformers")
    config.save_pretrained(tmp_path)
    loaded = MllamaConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.compat == "transformers"
    assert MllamaTextConfig.from_pretrained(tmp_path).hidden_size == 8192
    assert MllamaVisionConfig.from_pretrained(tmp_path).image_size == 560


@pytest.mark.parametrize("kwargs,field", [
    (dict(vision_config=dict(vision_output_dim=1000)), "vision_output_dim"),
    (dict(vision_config=dict(intermediate_layers_indices=[3, 40])), "intermediate_layers_indices"),
    (dict(vision_config=dict(image_size=[560, 448])), "image_size"),
    (dict(vision_config=dict(image_size=500)), "image_size"),
    (dict(text_config=dict(cross_attention_layers=[3, -1])), "cross_attention_layers"),
    (dict(text_config=dict(cross_attention_layers=[3, 3])), "cross_attention_layers"),
    (dict(text_config=dict(rope_scaling={"rope_type": "longrope", "factor": 2.0})), "rope_type"),
    (dict(text_config=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0})), "rope_parameters"),
    (dict(text_config=dict(num_key_value_heads=5)), "num_key_value_heads"),
    (dict(compat="hf"), "compat"),
])
def test_inconsistent_configs_fail_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MllamaConfig(**kwargs)
