"""Configs, loading and saving behave like transformers' for code written against it (transformers is the oracle)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.activations import ACT2FN
from transformers.models.mllama import modeling_mllama as hf

import mllama
import oracle
from conftest import randomize, tiny_config
from mllama import (MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration, MllamaTextConfig,
                    MllamaVisionConfig, MllamaVisionModel)
from mllama.config import _BOILERPLATE
from mllama.modeling.text import MllamaTextMLP
from mllama.modeling.vision import MllamaVisionMLP
from mllama.weights import CheckpointError
from test_parity import CASES, TOL, make_inputs, rel_diff

# Every name transformers' ACT2FN maps, less the two whose activation holds learned parameters (refused below).
PARAMETER_FREE = sorted(set(ACT2FN) - {"prelu", "xielu"})


def _tiny(text: dict | None = None, vision: dict | None = None) -> MllamaConfig:
    data = tiny_config().to_dict()
    data["text_config"].update(text or {})
    data["vision_config"].update(vision or {})
    return MllamaConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# hidden_act


@pytest.mark.parametrize("name", PARAMETER_FREE)
def test_every_parameter_free_activation_matches_transformers_mlps(name):
    text = tiny_config().text_config
    text.hidden_act = name
    ours_text = randomize(MllamaTextMLP(MllamaTextConfig.from_dict(text.to_dict())), seed=1)
    theirs_text = hf.MllamaTextMLP(oracle.hf_config(MllamaConfig(text_config=text.to_dict())).text_config)
    theirs_text.load_state_dict(ours_text.state_dict())
    vision = _tiny(vision=dict(hidden_act=name)).vision_config
    ours_vision = randomize(MllamaVisionMLP(vision), seed=2)
    theirs_vision = hf.MllamaVisionMLP(oracle.hf_config(_tiny(vision=dict(hidden_act=name))).vision_config)
    theirs_vision.load_state_dict(ours_vision.state_dict())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.allclose(ours_text(x), theirs_text(x), rtol=1e-6, atol=1e-6), name
        assert torch.allclose(ours_vision(x[..., :32]), theirs_vision(x[..., :32]), rtol=1e-6, atol=1e-6), name


@pytest.mark.parametrize("text_act,vision_act", [("gelu", "gelu"), ("relu2", "quick_gelu"), ("gelu_new", "silu")])
def test_models_with_other_activations_give_transformers_logits(text_act, vision_act):
    ours = randomize(MllamaForConditionalGeneration.from_config(
        _tiny(text=dict(hidden_act=text_act), vision=dict(hidden_act=vision_act)))).eval()
    theirs = oracle.hf_model(ours)
    assert theirs.config.text_config.hidden_act == text_act and theirs.config.vision_config.hidden_act == vision_act
    inputs = make_inputs(*CASES["interleaved"], 28)
    with torch.no_grad(), oracle.meta_fixes():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    assert rel_diff(a, b) <= TOL


@pytest.mark.parametrize("name", ["prelu", "xielu", "no_such_act"])
def test_activations_with_parameters_or_unknown_are_refused(name):
    with pytest.raises(ValueError, match="hidden_act"):
        MllamaTextConfig(hidden_act=name)
    with pytest.raises(ValueError, match="hidden_act"):
        MllamaVisionConfig(hidden_act=name)


# ---------------------------------------------------------------------------------------------------------------
# cross_attention_layers past the last layer


def test_default_cross_layers_in_a_small_config_are_ignored_past_the_last_layer():
    """transformers keeps its default [3, 8, ..., 38] in a 6-layer config: layer 3 is cross, the rest name no layer."""
    theirs_config = transformers.MllamaTextConfig(num_hidden_layers=6)
    ours_config = MllamaTextConfig(num_hidden_layers=6)
    assert ours_config.cross_attention_layers == theirs_config.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    data = tiny_config().to_dict()
    del data["text_config"]["cross_attention_layers"]
    ours = randomize(MllamaForConditionalGeneration.from_config(MllamaConfig.from_dict(data))).eval()
    theirs = oracle.hf_model(ours)
    kinds = [type(layer).__name__ for layer in ours.model.language_model.layers]
    assert kinds == [type(layer).__name__ for layer in theirs.model.language_model.layers]
    assert [i for i, k in enumerate(kinds) if "Cross" in k] == [3]
    assert ours.config.text_config.to_dict()["cross_attention_layers"] == theirs.config.text_config.cross_attention_layers
    inputs = make_inputs(*CASES["interleaved"], 28)
    with torch.no_grad(), oracle.meta_fixes():
        assert rel_diff(ours(**inputs).logits, theirs(**inputs).logits) <= TOL


def test_a_config_without_any_present_cross_layer_builds_like_transformers():
    ours = MllamaTextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96, vocab_size=320, pad_token_id=0)
    assert ours.present_cross_attention_layers == []
    lm = randomize(MllamaForCausalLM.from_config(ours)).eval()
    theirs = oracle.hf_model(lm, "MllamaForCausalLM")
    inputs = make_inputs(*CASES["text_only"], 28)
    with torch.no_grad():
        assert rel_diff(lm(**inputs).logits, theirs(**inputs).logits) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# get_text_config


@pytest.mark.parametrize("decoder", [None, True, False])
@pytest.mark.parametrize("encoder", [None, True, False])
def test_get_text_config_picks_what_transformers_picks(decoder, encoder):
    ours, theirs = tiny_config(), oracle.hf_config(tiny_config())
    got_theirs = theirs.get_text_config(decoder=decoder, encoder=encoder)
    got_ours = ours.get_text_config(decoder=decoder, encoder=encoder)
    assert (got_ours is ours.text_config) == (got_theirs is theirs.text_config)
    assert (got_ours is ours) == (got_theirs is theirs)
    for sub_ours, sub_theirs in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
        assert (sub_ours.get_text_config(decoder, encoder) is sub_ours) == \
            (sub_theirs.get_text_config(decoder, encoder) is sub_theirs)
    assert ours.get_text_config() is ours.text_config  # the plain call


# ---------------------------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=5).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dropin")
    model.save_pretrained(folder)
    return folder


def _logits(m):
    with torch.no_grad():
        return m(**make_inputs(*CASES["interleaved"], 28)).logits


def _with_extra_keys(saved, folder):
    state = load_file(str(saved / "model.safetensors"))
    state.update({"vision_model.extra_head.weight": torch.zeros(2), "foo.bar": torch.zeros(1)})
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((saved / "config.json").read_text())
    return folder


@pytest.mark.parametrize("cls", ["MllamaForConditionalGeneration", "MllamaModel", "MllamaForCausalLM",
                                 "MllamaTextModel"])
def test_output_loading_info_equals_transformers(saved, tmp_path, cls):
    folder = _with_extra_keys(saved, tmp_path)
    transformers.logging.set_verbosity_error()
    _, theirs = getattr(transformers, cls).from_pretrained(folder, output_loading_info=True)
    with pytest.warns(UserWarning, match="foo.bar"):
        loaded, ours = getattr(mllama, cls).from_pretrained(folder, output_loading_info=True)
    assert isinstance(loaded, getattr(mllama, cls))
    assert ours == theirs  # the same four keys, sets of the same names
    assert ours["missing_keys"] == ours["mismatched_keys"] == set() and ours["error_msgs"] == []


def test_an_extra_key_loads_with_a_warning_and_the_right_weights(saved, model, tmp_path):
    folder = _with_extra_keys(saved, tmp_path)
    with pytest.warns(UserWarning, match=r"vision_model\.extra_head\.weight"):
        loaded = MllamaForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(_logits(loaded), _logits(model))
    # a clean checkpoint loads without any warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MllamaForConditionalGeneration.from_pretrained(saved)


def test_a_missing_weight_is_an_error_unless_loading_info_is_asked_for(saved, tmp_path):
    """Plain loading stays strict; with output_loading_info the tensor is initialised afresh and listed, as in
    transformers (whose own tests load checkpoints with missing tensors that way)."""
    state = load_file(str(saved / "model.safetensors"))
    state.pop("vision_model.class_embedding")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(CheckpointError, match="class_embedding"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path)
    transformers.logging.set_verbosity_error()
    _, theirs = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    loaded, ours = MllamaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert ours["missing_keys"] == theirs["missing_keys"] == {"model.vision_model.class_embedding"}
    assert loaded.vision_model.class_embedding.device.type == "cpu"
    assert torch.isfinite(loaded.vision_model.class_embedding).all()


def test_the_name_as_a_keyword_as_in_transformers(saved, model):
    transformers.MllamaForConditionalGeneration.from_pretrained(pretrained_model_name_or_path=saved)
    ours = MllamaForConditionalGeneration.from_pretrained(pretrained_model_name_or_path=saved)
    assert torch.equal(_logits(ours), _logits(model))
    assert MllamaTextConfig.from_pretrained(pretrained_model_name_or_path=saved) == model.config.text_config


def test_subfolder_as_in_transformers(model, tmp_path):
    model.save_pretrained(tmp_path / "sub")
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path, subfolder="sub")
    ours = MllamaForConditionalGeneration.from_pretrained(tmp_path, subfolder="sub")
    assert torch.equal(_logits(ours), _logits(model))
    with oracle.meta_fixes():
        assert rel_diff(_logits(ours), _logits(theirs)) <= TOL
    assert MllamaConfig.from_pretrained(tmp_path, subfolder="sub").text_config == model.config.text_config
    with pytest.raises(CheckpointError, match="subfolder 'nope'"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path, subfolder="nope")


# ---------------------------------------------------------------------------------------------------------------
# Saving and initialisation

_GENERATION_BOILERPLATE = {"transformers_version", "output_attentions", "output_hidden_states"}


@pytest.mark.parametrize("cls", ["MllamaForConditionalGeneration", "MllamaForCausalLM", "MllamaVisionModel"])
def test_a_fresh_model_saves_the_generation_config_transformers_writes(tmp_path, cls):
    config = tiny_config()
    if cls == "MllamaForCausalLM":
        config = config.text_config
    elif cls == "MllamaVisionModel":
        config = config.vision_config
    ours = getattr(mllama, cls).from_config(config)
    theirs = oracle.hf_model(ours, cls)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = tmp_path / "ours/generation_config.json", tmp_path / "theirs/generation_config.json"
    assert ours_file.is_file() == theirs_file.is_file()
    if theirs_file.is_file():
        expected = {k: v for k, v in json.loads(theirs_file.read_text()).items() if k not in _GENERATION_BOILERPLATE}
        assert json.loads(ours_file.read_text()) == expected


def test_init_weights_after_meta_recomputes_the_rotary_frequencies():
    config = tiny_config()
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = MllamaForConditionalGeneration(config)
    ours = model.model.language_model.rotary_emb.inv_freq
    assert ours.device.type == "cpu" and torch.equal(ours, fresh.model.language_model.rotary_emb.inv_freq)
    theirs = oracle.hf_model(fresh).model.language_model.rotary_emb.inv_freq
    assert torch.allclose(ours, theirs, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# to_dict / to_json_* / from_dict / from_json_file

_NOT_COMPARED = _BOILERPLATE | {"dtype", "architectures", "id2label", "label2id"}


def _meaningful(d: dict) -> dict:
    return {k: (_meaningful(v) if k.endswith("_config") else v) for k, v in d.items() if k not in _NOT_COMPARED}


def test_to_dict_has_transformers_keys_nesting_and_model_types():
    ours, theirs = tiny_config(), oracle.hf_config(tiny_config())
    a, b = ours.to_dict("transformers5"), theirs.to_dict()
    assert _meaningful(a) == _meaningful(b)
    assert (a["model_type"], a["text_config"]["model_type"], a["vision_config"]["model_type"]) == \
        (b["model_type"], b["text_config"]["model_type"], b["vision_config"]["model_type"])
    assert isinstance(a["text_config"], dict) and isinstance(a["vision_config"], dict)
    # the default (published) form differs only in how RoPE is spelled (DECISIONS.md §3)
    published = ours.to_dict()["text_config"]
    assert (published["rope_theta"], published["rope_scaling"]["factor"]) == (10000.0, 8.0)


def test_transformers_dicts_and_files_read_back_equal(tmp_path):
    ours, theirs = tiny_config(), oracle.hf_config(tiny_config())
    assert MllamaConfig.from_dict(theirs.to_dict()) == ours  # every boiler-plate key and null dtype included
    theirs.to_json_file(tmp_path / "theirs.json", use_diff=False)
    assert MllamaConfig.from_json_file(tmp_path / "theirs.json") == ours
    theirs.to_json_file(tmp_path / "theirs_diff.json")
    assert MllamaConfig.from_json_file(tmp_path / "theirs_diff.json") == ours
    for use_diff in (True, False):
        ours.to_json_file(tmp_path / "ours.json", use_diff=use_diff)
        back = transformers.MllamaConfig.from_json_file(tmp_path / "ours.json")
        assert _meaningful(back.to_dict()) == _meaningful(theirs.to_dict())
        assert json.loads(ours.to_json_string(use_diff=use_diff)) == ours.to_dict()


def test_from_dict_keyword_arguments_like_transformers():
    data = tiny_config().to_dict("transformers5")
    kwargs = dict(image_token_index=7, not_a_field=1, text_config={"rms_norm_eps": 1e-6})
    theirs, theirs_unused = transformers.MllamaConfig.from_dict(oracle.hf_config(tiny_config()).to_dict(),
                                                                return_unused_kwargs=True, **kwargs)
    ours, ours_unused = MllamaConfig.from_dict(data, return_unused_kwargs=True, **kwargs)
    assert ours_unused == theirs_unused == {"not_a_field": 1}
    assert not hasattr(ours, "not_a_field") and not hasattr(theirs, "not_a_field")
    assert ours.image_token_index == theirs.image_token_index == 7
    assert ours.text_config.rms_norm_eps == theirs.text_config.rms_norm_eps == 1e-6
    assert ours.text_config.hidden_size == theirs.text_config.hidden_size == 64  # the rest of the sub-config kept
    assert MllamaConfig.from_dict(data, not_a_field=1) == tiny_config()


# ---------------------------------------------------------------------------------------------------------------
# What transformers' code reads off every config: sub_configs, is_encoder_decoder, iteration, to_diff_dict, labels,
# the attention implementation


def test_sub_configs_iteration_and_encoder_decoder_flag_match_transformers():
    ours, theirs = tiny_config(), oracle.hf_config(tiny_config())
    assert {k: v.__name__ for k, v in type(ours).sub_configs.items()} == \
        {k: v.__name__ for k, v in type(theirs).sub_configs.items()}
    assert MllamaTextConfig.sub_configs == {} and MllamaVisionConfig.sub_configs == {}
    assert ours.is_encoder_decoder is theirs.is_encoder_decoder is False
    assert {"text_config", "vision_config", "image_token_index"} <= set(ours)
    assert [key for key in ours if getattr(ours, key) is ours.text_config] == ["text_config"]


def test_to_diff_dict_holds_only_what_differs_and_rebuilds_the_config():
    config = _tiny(text={"vocab_size": 99})
    diff = config.to_diff_dict()
    assert diff["text_config"]["vocab_size"] == 99 and "rms_norm_eps" not in diff["text_config"]
    assert diff["model_type"] == "mllama" and MllamaConfig(**diff) == config
    assert MllamaTextConfig().to_diff_dict() == {"model_type": "mllama_text_model"}
    theirs = oracle.hf_config(config).to_diff_dict()
    assert theirs["text_config"]["vocab_size"] == 99


def test_num_labels_and_label_maps_follow_transformers():
    ours, theirs = MllamaTextConfig(num_labels=5), transformers.MllamaTextConfig(num_labels=5)
    assert ours.id2label == theirs.id2label and ours.label2id == theirs.label2id
    ours.num_labels = theirs.num_labels = 3
    assert ours.id2label == theirs.id2label and len(ours.label2id) == 3
    assert MllamaTextConfig().num_labels == transformers.MllamaTextConfig().num_labels == 2
    assert "id2label" not in MllamaTextConfig(num_labels=5).to_dict()


def test_attn_implementation_is_set_at_init_and_after_on_every_sub_config():
    config = MllamaConfig(attn_implementation="eager")
    assert [c._attn_implementation for c in (config, config.text_config, config.vision_config)] == ["eager"] * 3
    config._attn_implementation = "sdpa"
    assert config.text_config._attn_implementation == config.vision_config._attn_implementation == "sdpa"
    config._attn_implementation = {"text_config": "eager"}  # the vision config keeps its choice, as transformers
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == ("eager", "sdpa")
    assert config._attn_implementation == "sdpa"
    assert "attn_implementation" not in json.dumps(config.to_dict())
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported: use one of"):
        MllamaTextConfig(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"keys \['audio_config'\] name no sub-config"):
        config._attn_implementation = {"audio_config": "eager"}


# ---------------------------------------------------------------------------------------------------------------
# RoPE scalings beyond the published llama3: yarn and dynamic NTK, as transformers computes them


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 10.0, "rope_theta": 1e4, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "beta_fast": 16, "mscale": 1.2, "mscale_all_dim": 0.8},
    {"rope_type": "dynamic", "factor": 10.0, "rope_theta": 1e4},
])
def test_yarn_and_dynamic_rope_equal_transformers(rope):
    from mllama.modeling.text import MllamaRotaryEmbedding

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                 num_hidden_layers=2, cross_attention_layers=[1])
    ours = MllamaRotaryEmbedding(MllamaTextConfig(rope_parameters=dict(rope), **shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.MllamaRotaryEmbedding(transformers.MllamaTextConfig(rope_parameters=dict(rope), **shape))
    for length in (50, 300):  # inside and past max_position_embeddings (where dynamic changes its base)
        positions = torch.arange(length)[None]
        cos, sin = ours(torch.zeros(1, length, 64), positions)  # called as transformers' rotary modules are
        their_cos, their_sin = theirs(torch.zeros(1, length, 64), positions)
        torch.testing.assert_close(cos, their_cos, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(sin, their_sin, atol=2e-5, rtol=1e-5)


def test_a_rope_type_set_after_the_config_is_built_is_checked_by_the_model():
    config = tiny_config()
    config.text_config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported"):
        MllamaForConditionalGeneration(config)
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
        MllamaForConditionalGeneration(config)


def test_yarn_without_an_original_context_uses_max_position_embeddings_as_transformers():
    from mllama.modeling.text import MllamaRotaryEmbedding

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                 num_hidden_layers=2, cross_attention_layers=[1])
    config = MllamaTextConfig(**shape)
    config.rope_parameters = {"rope_type": "yarn", "factor": 10.0, "rope_theta": 1e4}  # as transformers' tests set it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.MllamaRotaryEmbedding(transformers.MllamaTextConfig(
            rope_parameters={"rope_type": "yarn", "factor": 10.0, "rope_theta": 1e4}, **shape))
    positions = torch.arange(20)[None]
    torch.testing.assert_close(MllamaRotaryEmbedding(config)(torch.zeros(1), positions)[0],
                               theirs(torch.zeros(1, 20, 64), positions)[0], atol=2e-5, rtol=1e-5)


def test_the_fast_path_refuses_dynamic_rope():
    from mllama.engine.decode import unsupported

    config = tiny_config()
    config.text_config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert "RoPE is 'dynamic'" in unsupported(MllamaForConditionalGeneration(config))


def test_config_from_pretrained_applies_attribute_keywords_as_transformers(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    ours = MllamaConfig.from_pretrained(tmp_path, text_config={"vocab_size": 20}, image_token_index=7)
    theirs = transformers.MllamaConfig.from_pretrained(tmp_path, text_config={"vocab_size": 20}, image_token_index=7)
    assert (ours.text_config.vocab_size, ours.image_token_index) == (theirs.text_config.vocab_size, 7) == (20, 7)
    assert ours.text_config.hidden_size == tiny_config().text_config.hidden_size  # the rest from the file
    config, unused = MllamaTextConfig.from_pretrained(tmp_path, rms_norm_eps=1e-3, foo=1, return_unused_kwargs=True)
    assert config.rms_norm_eps == 1e-3 and unused == {"foo": 1}
