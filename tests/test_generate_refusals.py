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


def test_a_checkpoint_stored_quantized_otherwise_than_fp8_is_refused(tiny_checkpoint, tmp_path):
    """A bitsandbytes checkpoint read as plain weights would load its packed 4-bit tensors as numbers: refused,
    naming the method, before any weight is read, for the text model alone too (the config is read at the top).
    FP8 (compressed-tensors) checkpoints load: tests/test_fp8_checkpoints.py."""
    import json
    import shutil

    folder = tmp_path / "nf4"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    for cls in (MllamaForConditionalGeneration, MllamaForCausalLM):
        with pytest.raises(ValueError, match="stored quantized with quant_method 'bitsandbytes'.*compressed-tensors"):
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
