"""compressed-tensors FP8 checkpoints (RedHatAI's FP8-dynamic layout): built here from the tiny random checkpoint
with plain torch (not mllama's quantizer), loaded by mllama, and checked against a dequantize-and-compute
reference written here, in float32."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllama import MllamaForCausalLM, MllamaForConditionalGeneration
from mllama.quantization import Fp8Linear

# the published files' ignore list, in their layout: the vision tower, the projector, lm_head
IGNORE = ["re:vision_model.*", "re:multi_modal_projector.*", "language_model.lm_head"]
QUANTIZATION = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None, "ignore": IGNORE, "global_compression_ratio": 1.2,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "output_activations": None,
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                    "observer_kwargs": {}},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True, "group_size": None, "block_structure": None, "actorder": None,
                              "observer": None, "observer_kwargs": {}}}},
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_names(tensors: dict) -> list[str]:
    return [k for k in tensors if k.startswith("language_model.model.layers.") and k.endswith(".weight")
            and k.split(".")[-2] in PROJECTIONS]


def _fp8_checkpoint(tiny_checkpoint, folder, quantization=QUANTIZATION, scale_dtype=torch.bfloat16):
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    for name in _quantized_names(tensors):
        w = tensors[name].float()
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        tensors[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name + "_scale"] = scale.to(scale_dtype)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _reference(tiny_checkpoint, fp8_folder):
    """The bf16 tiny model in float32 with each quantized layer's weight dequantized (e4m3 x scale) and its input
    quantized per token (max|x| / 448 each) before the product."""
    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    stored = load_file(fp8_folder / "model.safetensors")

    def quantize_input(module, args):
        x = args[0]
        scale = (x.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
        return ((x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale,)

    for name in _quantized_names(stored):
        module = model.get_submodule(name.removeprefix("language_model.").replace("model.", "model.language_model.", 1)
                                     .removesuffix(".weight"))
        module.weight.data = stored[name].float() * stored[name + "_scale"].float()
        module.register_forward_pre_hook(quantize_input)
    return model


def _inputs(seed=0):
    ids = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(seed))
    return ids


def test_an_fp8_checkpoint_loads_and_equals_the_dequantized_reference(tiny_checkpoint, tmp_path):
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8")
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    fp8 = [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == len(_quantized_names(load_file(folder / "model.safetensors"))) > 0
    # the ignore list: the vision tower, the projector and lm_head stay as they are
    assert not any(name.startswith(("model.vision_model", "model.multi_modal_projector", "lm_head")) for name in fp8)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.multi_modal_projector) is torch.nn.Linear
    layer = model.get_submodule(fp8[0])
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.bfloat16  # as stored
    reference = _reference(tiny_checkpoint, folder)
    with torch.no_grad():
        ours, theirs = model(input_ids=_inputs()).logits, reference(input_ids=_inputs()).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    # and not the bf16 model's logits: the quantization is really applied
    plain = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(ours, plain(input_ids=_inputs()).logits, rtol=1e-3, atol=1e-4)
    # the text model alone from the same files (its config has no quantization_config of its own)
    text = MllamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(isinstance(m, Fp8Linear) for m in text.modules()) == len(fp8)


def test_saving_and_reloading_an_fp8_model_is_bit_identical(tiny_checkpoint, tmp_path):
    model = MllamaForConditionalGeneration.from_pretrained(_fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8"))
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["quantization_config"] == QUANTIZATION
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert second[name].dtype == tensor.dtype and torch.equal(second[name].view(torch.uint8),
                                                                  tensor.view(torch.uint8)), name


def test_a_missing_or_wrong_scale_or_weight_is_an_error_naming_the_tensor(tiny_checkpoint, tmp_path):
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8")
    tensors = load_file(folder / "model.safetensors")
    name = _quantized_names(tensors)[0]
    cases = {"missing": lambda t: t.pop(name + "_scale"),
             "zero": lambda t: t[name + "_scale"].zero_(),
             "shape": lambda t: t.__setitem__(name + "_scale", t[name + "_scale"][:1]),
             "weight": lambda t: t.__setitem__(name, t[name].to(torch.bfloat16))}
    expected = {"missing": "lacks 1 tensors", "zero": "not positive and finite", "shape": "has shape",
                "weight": "must be F8_E4M3"}
    for case, edit in cases.items():
        broken = dict(tensors)
        broken[name + "_scale"] = broken[name + "_scale"].clone()
        edit(broken)
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(Exception, match=expected[case]) as e:
            MllamaForConditionalGeneration.from_pretrained(folder)
        short = name.split("language_model.model.")[-1].removesuffix(".weight")
        assert short in str(e.value), (case, str(e.value))


@pytest.mark.parametrize("path, value, field", [
    (("format",), "pack-quantized", "format 'pack-quantized'"),
    (("quant_method",), "bitsandbytes", "quant_method 'bitsandbytes'"),
    (("config_groups", "group_0", "weights", "strategy"), "tensor", "weights.strategy is 'tensor'"),
    (("config_groups", "group_0", "input_activations", "dynamic"), False, "input_activations.dynamic is False"),
    (("config_groups", "group_0", "weights", "num_bits"), 4, "weights.num_bits is 4"),
    (("kv_cache_scheme",), {"num_bits": 8}, "kv_cache_scheme"),
])
def test_other_quantization_schemes_are_refused_by_field(tiny_checkpoint, tmp_path, path, value, field):
    quantization = json.loads(json.dumps(QUANTIZATION))
    place = quantization
    for key in path[:-1]:
        place = place[key]
    place[path[-1]] = value
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "q", quantization)
    with pytest.raises(ValueError, match=field):
        MllamaForConditionalGeneration.from_pretrained(folder)


def test_generate_runs_an_fp8_model_as_the_reference_does(tiny_checkpoint, tmp_path):
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8")
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    reference = _reference(tiny_checkpoint, folder)
    with torch.no_grad():
        ours = model.generate(input_ids=_inputs(1), max_new_tokens=6, do_sample=False)
        theirs = reference.generate(input_ids=_inputs(1), max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_the_fast_path_and_the_engine_run_fp8_layers_fused_as_the_plain_forward_does(tiny_checkpoint, tmp_path):
    """Fused q|k|v and gate|up of FP8 layers carry their per-channel scales: the fast path's and the serving
    engine's logits and greedy tokens are the plain FP8 forward's (on CPU both use the reference product)."""
    import PIL.Image

    from collecting import Collector
    from mllama.engine.batch import BatchEngine
    from mllama.engine.decode import fuse_projections
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams
    from mllama.processing.processor import AutoProcessor

    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8")
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(folder))
    image = PIL.Image.fromarray((torch.rand(50, 40, 3, generator=torch.Generator().manual_seed(3)) * 255)
                                .to(torch.uint8).numpy())
    inputs = dict(processor(images=[[image]], text=["<|image|>What is it?"], return_tensors="pt"))
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    with torch.no_grad():
        before = model(input_ids=ids, **inputs).logits
        plain = model.generate(input_ids=ids, **inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                               fast=False)
        fuse_projections(model)
        attn = model.model.language_model.layers[0].self_attn
        assert attn.wqkv.dtype == torch.float8_e4m3fn and attn.wqkv_scale.shape == (attn.wqkv.shape[0], 1)
        torch.testing.assert_close(model(input_ids=ids, **inputs).logits, before, rtol=1e-6, atol=1e-6)
        fast = model.generate(input_ids=ids, **inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              fast=True)
    assert torch.equal(plain, fast)
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128).start()
    try:
        collector = Collector()
        engine.submit(GenerationRequest(prompt_ids=ids[0].tolist(), model_inputs=inputs, emit=collector,
                                        params=SamplingParams(max_new_tokens=10, min_new_tokens=10, do_sample=False)))
        assert collector.done.wait(120) and collector.events[-1].error is None
    finally:
        engine.stop()
    assert collector.ids == plain[0, ids.shape[1]:].tolist()


def test_quantize_on_load_equals_a_checkpoint_quantized_beforehand(tiny_checkpoint, tmp_path):
    """from_pretrained(quantize="fp8") of the bf16 checkpoint: the same e4m3 weights and scales as the checkpoint
    this file quantizes itself (float32 scales there), the same logits, and it saves as an FP8 checkpoint."""
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8", scale_dtype=torch.float32)
    stored = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    quantized = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32, quantize="fp8")
    ours, theirs = quantized.state_dict(), stored.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name].view(torch.uint8),
                                                                tensor.view(torch.uint8)), name
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=_inputs()).logits, stored(input_ids=_inputs()).logits,
                                   rtol=0, atol=0)
    quantized.save_pretrained(tmp_path / "saved")
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert sum(isinstance(m, Fp8Linear) for m in again.modules()) == sum(isinstance(m, Fp8Linear)
                                                                         for m in stored.modules())
    with pytest.raises(ValueError, match="quantize='int4' is not supported: use quantize='fp8'"):
        MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, quantize="int4")


def test_info_gives_the_fp8_size_and_whether_it_fits(capsys):
    from mllama.cli import main

    assert main(["info", "90b", "--quantize", "fp8", "--gpu-memory", "139", "--json"]) in (0, None)
    info = json.loads(capsys.readouterr().out)
    # 86.6 B text parameters, nearly all in linear layers, at one byte; the rest (2 B) in bf16
    assert 84 < info["fp8_weights_gib"] < 87 and info["weights_gib"]["bfloat16"] > 160
    assert info["fits"]["fits"] and info["fits"]["left_gib"] > 50
    main(["info", "90b", "--gpu-memory", "139", "--json"])
    assert not json.loads(capsys.readouterr().out)["fits"]["fits"]  # bf16: 165 GiB


def test_transformers_with_compressed_tensors_loads_what_mllama_saves(tiny_checkpoint, tmp_path):
    """The oracle's reading of the format: transformers with the compressed-tensors package (test-only) loads the
    FP8 checkpoint mllama writes (on the CPU it decompresses the weights and quantizes activations as the scheme
    says), and its logits, image included, agree with mllama's far inside FP8's own error."""
    pytest.importorskip("compressed_tensors")
    import numpy as np
    import PIL.Image
    import transformers

    from mllama.processing.processor import AutoProcessor

    # (compat="transformers": its rule for the rows before the image, which Meta's semantics zero)
    ours = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32, quantize="fp8",
                                                          compat="transformers")
    ours.save_pretrained(tmp_path / "saved")
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert theirs.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn  # as stored
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    inputs = processor(images=[[image]], text=["<|image|>Describe the picture"], return_tensors="pt")
    plain = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                           compat="transformers")
    with torch.no_grad():
        a, b, c = (m(**inputs).logits for m in (ours, theirs, plain))
    between = ((a - b).abs().max() / b.abs().max()).item()
    fp8_error = ((a - c).abs().max() / c.abs().max()).item()
    print(f"mllama vs transformers {between:.1e}; FP8 vs bf16 {fp8_error:.1e}")
    assert between < 1e-5 and fp8_error > 1e-3


def test_dummy_weights_need_only_the_config_and_quantize_as_they_are_made(tiny_checkpoint, tmp_path, capsys):
    """load_format="dummy" (what bench/ builds the 90B with): no weight files read, random values of the kinds
    the loader expects (norms 1, gates non-zero, the rest spread), FP8 layers quantized on the way in, the
    ignore list honoured; the command line takes it with --quantize fp8."""
    from mllama import cli

    folder = tmp_path / "config-only"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(Exception, match="safetensors|weights"):
        MllamaForConditionalGeneration.from_pretrained(folder)
    model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, load_format="dummy",
                                                           quantize="fp8")
    text = model.model.language_model
    assert isinstance(text.layers[0].mlp.gate_proj, Fp8Linear) and model.lm_head.weight.dtype == torch.float32
    assert not any(isinstance(m, Fp8Linear) for m in model.model.vision_model.modules())
    assert torch.equal(text.norm.weight, torch.ones_like(text.norm.weight))
    gate = text.layers[text.config.cross_attention_layers[0]].cross_attn_attn_gate
    assert torch.equal(gate, torch.full_like(gate, 0.7))
    weight = text.embed_tokens.weight
    assert 0.015 < weight.std().item() < 0.025 and weight.unique().numel() > weight.numel() // 2
    scale = text.layers[0].mlp.gate_proj.weight_scale
    assert (scale > 0).all() and scale.unique().numel() > 1  # made by quantizing each weight, row by row
    with pytest.raises(ValueError, match="load_format='pt' is not supported"):
        MllamaForConditionalGeneration.from_pretrained(folder, load_format="pt")
    assert cli.main(["generate", "--model", str(folder), "--load-format", "dummy", "--quantize", "fp8", "--prompt",
                     "hi", "--max-new-tokens", "3", "--greedy", "--raw"]) == 0
