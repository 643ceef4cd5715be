"""Keywords that from_pretrained and generate would ignore are refused by name instead."""
from __future__ import annotations

import pytest

from conftest import tiny_config
from test_parity import make_inputs
from mllama import MllamaForCausalLM, MllamaForConditionalGeneration


@pytest.mark.parametrize("keyword, value", [("load_in_4bit", True), ("load_in_8bit", True),
                                            ("quantization_config", {"load_in_4bit": True})])
def test_quantized_loading_is_refused(tiny_checkpoint, keyword, value):
    for cls in (MllamaForConditionalGeneration, MllamaForCausalLM):
        with pytest.raises(ValueError, match=rf"{keyword}=.*not supported.*bfloat16"):
            cls.from_pretrained(tiny_checkpoint, **{keyword: value})


def test_a_checkpoint_stored_quantized_is_refused(tiny_checkpoint, tmp_path):
    """An FP8 checkpoint (compressed-tensors, as RedHatAI publishes them) read as plain weights would load its
    float8 tensors without their scales: refused, naming the format, before any weight is read."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "fp8"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight") and "vision" not in k)
    tensors[name + "_scale"] = torch.ones(tensors[name].shape[0], 1)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, folder / "model.safetensors")
    for cls in (MllamaForConditionalGeneration, MllamaForCausalLM):
        with pytest.raises(ValueError, match="stored quantized \\(quant_method 'compressed-tensors', format "
                                             "'float-quantized'\\)"):
            cls.from_pretrained(folder)


def test_unknown_loading_keywords_are_refused_by_name(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"unsupported arguments \['force_download', 'mirror'\].*revision"):
        MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, mirror="x", force_download=True)


def test_keywords_that_loading_honours_still_load(tiny_checkpoint):
    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, low_cpu_mem_usage=True,
                                                           load_in_8bit=False, quantization_config=None,
                                                           local_files_only=True, revision=None)
    assert model.num_parameters() > 0


@pytest.mark.parametrize("keyword", ["logits_processor", "stopping_criteria", "generation_config"])
def test_generate_refuses_what_it_does_not_honour(keyword):
    model = MllamaForConditionalGeneration.from_config(tiny_config()).eval()
    inputs = make_inputs([[1, 5, 6]], None, 28)
    with pytest.raises(ValueError, match=rf"unknown arguments \['{keyword}'\]"):
        model.generate(**inputs, max_new_tokens=2, **{keyword: True})
