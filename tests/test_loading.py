"""Loading and saving checkpoints: both key layouts, both config generations, sharding, errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import oracle
from conftest import randomize, tiny_config
from test_parity import CASES, make_inputs
from mllama import (MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel,
                    MllamaTextModel, MllamaVisionModel)
from mllama.weights import CheckpointError


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=3).eval()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(*CASES["interleaved"], 28)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def logits(m, inputs):
    with torch.no_grad():
        return m(**inputs).logits


def test_save_writes_the_published_layout_sharded(saved, model):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.weight" in keys
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision_model.global_transformer.") for k in keys)
    assert not any(k.startswith("model.") or k.startswith("lm_head") for k in keys)
    assert len(keys) == len(model.state_dict())
    config = json.loads((saved / "config.json").read_text())
    assert config["text_config"]["rope_scaling"]["rope_type"] == "llama3" and config["model_type"] == "mllama"


def test_round_trip_gives_identical_logits(saved, model, inputs):
    loaded = MllamaForConditionalGeneration.from_pretrained(saved, dtype=torch.float32)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_transformers5_layout_and_config_load(model, inputs, tmp_path):
    """The layout transformers 5 keeps in memory (and saves), with a rope_parameters config.json."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict("transformers5")))
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())["text_config"]
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_transformers_reads_ours_and_we_read_transformers(saved, model, inputs, tmp_path):
    import transformers

    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(saved, attn_implementation="eager")
    with oracle.meta_fixes():
        assert ((logits(theirs, inputs) - logits(model, inputs)).abs().max() <= 1e-5 * logits(model, inputs).abs().max())
    theirs.save_pretrained(tmp_path)
    ours = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(logits(ours, inputs), logits(model, inputs))


def test_dtype_and_auto(saved):
    assert MllamaForConditionalGeneration.from_pretrained(saved, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert MllamaForConditionalGeneration.from_pretrained(saved, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert MllamaForConditionalGeneration.from_pretrained(saved, dtype="auto", device_map="auto").dtype == torch.float32
    assert MllamaForConditionalGeneration.from_pretrained(saved, device_map="cpu").device.type == "cpu"


def test_partial_classes_load_their_part(saved, model, inputs):
    lm = MllamaForCausalLM.from_pretrained(saved)
    assert set(lm.state_dict()) == {k.replace("model.language_model.", "model.") for k in model.state_dict()
                                    if k.startswith(("model.language_model.", "lm_head."))}
    text_inputs = make_inputs(*CASES["text_only"], 28)
    assert torch.equal(logits(lm, text_inputs), logits(model, text_inputs).float())
    vision = MllamaVisionModel.from_pretrained(saved)
    vision_inputs = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        assert torch.equal(vision(**vision_inputs).last_hidden_state,
                           model.model.vision_model(**vision_inputs).last_hidden_state)
    text = MllamaTextModel.from_pretrained(saved)
    assert torch.equal(text.embed_tokens.weight, model.model.language_model.embed_tokens.weight)
    base = MllamaModel.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)


def test_causal_lm_checkpoint_round_trip(saved, tmp_path):
    lm = MllamaForCausalLM.from_pretrained(saved)
    lm.save_pretrained(tmp_path)
    again = MllamaForCausalLM.from_pretrained(tmp_path)
    inputs = make_inputs(*CASES["text_only"], 28)
    assert torch.equal(logits(again, inputs), logits(lm, inputs))


def _copy_checkpoint(saved, tmp_path, edit):
    """Single-file copy of `saved` with `edit(state)` applied."""
    state = {}
    for f in saved.glob("*.safetensors"):
        state.update(load_file(str(f)))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(saved, tmp_path):
    folder = _copy_checkpoint(saved, tmp_path, lambda s: s.pop("vision_model.class_embedding"))
    with pytest.raises(CheckpointError, match="model.vision_model.class_embedding"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_unexpected_tensor_is_named(saved, tmp_path):
    """Loaded with a warning naming it, as transformers does (tests/test_transformers_dropin_config.py)."""
    folder = _copy_checkpoint(saved, tmp_path, lambda s: s.update({"vision_model.extra_head.weight": torch.zeros(2)}))
    with pytest.warns(UserWarning, match="vision_model.extra_head.weight"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_shape_mismatch_is_named(saved, tmp_path):
    def grow(state):
        state["multi_modal_projector.bias"] = torch.zeros(65)
    folder = _copy_checkpoint(saved, tmp_path, grow)
    with pytest.raises(CheckpointError, match=r"multi_modal_projector.bias.*\[65\].*\[64\]"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_truncated_file_is_named(saved, tmp_path):
    folder = _copy_checkpoint(saved, tmp_path, lambda s: None)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_missing_folder_and_bad_ids_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path / "nope"), "not a repo id"):
        with pytest.raises(CheckpointError) as err:
            MllamaForConditionalGeneration.from_pretrained(name)
        assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path / "empty")


def test_hub_errors_become_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    class FakeResponse:
        status_code, headers, url, request = 403, {}, "https://hub/x", None

    def gated(*args, **kwargs):
        raise errors.GatedRepoError("Access to model x is restricted.\nlong detail", response=FakeResponse())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(CheckpointError, match="gated.*HF_TOKEN") as err:
        MllamaForConditionalGeneration.from_pretrained("meta-llama/Llama-3.2-11B-Vision-Instruct")
    assert "\n" not in str(err.value) and err.value.__cause__ is None

    def offline(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="cannot be reached"):
        MllamaForConditionalGeneration.from_pretrained("meta-llama/Llama-3.2-11B-Vision-Instruct")


def test_hub_token_from_the_environment_is_passed(monkeypatch, saved):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    MllamaForConditionalGeneration.from_pretrained("org/model", revision="main")
    assert seen["repo_id"] == "org/model" and seen["revision"] == "main"
    assert seen["token"] is None  # None lets huggingface_hub read HF_TOKEN itself


def test_progress_bar_on_a_terminal_only(saved, monkeypatch, capsys):
    import sys

    MllamaForConditionalGeneration.from_pretrained(saved)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    MllamaForConditionalGeneration.from_pretrained(saved)
    err = capsys.readouterr().err
    shards = len(list(saved.glob("*.safetensors")))
    assert f"{shards}/{shards} shards" in err


def test_loading_streams_without_materialising_twice(saved, monkeypatch):
    """Every tensor is read once from the safetensors handle and moved straight to its target: no full
    state dict is ever assembled (the model is built on the meta device)."""
    import mllama.weights as w

    reads = []
    real = w._set_tensor

    def spy(model, name, tensor):
        reads.append(name)
        assert all(p.device.type == "meta" for n, p in model.named_parameters() if n not in reads)
        real(model, name, tensor)

    monkeypatch.setattr(w, "_set_tensor", spy)
    m = MllamaForConditionalGeneration.from_pretrained(saved, dtype=torch.bfloat16)
    assert len(reads) == len(set(reads)) == len(m.state_dict())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in m.parameters())
