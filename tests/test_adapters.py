"""Adapters through peft (test-only here, the `finetune` extra for users): LoRA made with transformers + peft
loads into mllama (load_adapter, PeftModel.from_pretrained) and gives transformers' outputs, LoRA made on mllama
loads into transformers + peft the same way, gradients of the adapters equal transformers', merging writes a
plain checkpoint with the same outputs, and adapted models run only on the plain modules."""
from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import oracle  # noqa: E402
from conftest import IMAGE, randomize, tiny_config  # noqa: E402
from test_parity import CASES, make_inputs  # noqa: E402
from mllama import MllamaForConditionalGeneration  # noqa: E402
from mllama.engine.decode import fuse_projections, unsupported  # noqa: E402
from mllama.training import labels_of  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(seed: int = 0) -> "peft.LoraConfig":
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the adapter changes the outputs
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)


def _base() -> MllamaForConditionalGeneration:
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=11).eval()


def _inputs() -> dict:
    return make_inputs(*CASES["padded_batch"], 28)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad(), oracle.meta_fixes():
        return model(**inputs).logits


def _close(a, b, mask) -> float:
    valid = mask.bool()
    return ((a[valid] - b[valid]).abs().max() / b[valid].abs().max()).item()


def test_a_transformers_adapter_loads_into_mllama_and_gives_its_outputs(tmp_path):
    base = _base()
    theirs = peft.get_peft_model(oracle.hf_model(base), _lora())
    theirs.save_pretrained(tmp_path / "adapter")
    inputs = _inputs()
    want = _logits(theirs, inputs)
    plain = _logits(base, inputs)
    assert _close(plain, want, inputs["attention_mask"]) > 1e-2  # the adapter changes the outputs
    loaded = copy.deepcopy(base)
    loaded.load_adapter(tmp_path / "adapter")
    assert loaded.active_adapters() == ["default"]
    assert _close(_logits(loaded, inputs), want, inputs["attention_mask"]) <= 1e-5
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert _close(_logits(wrapped, inputs), want, inputs["attention_mask"]) <= 1e-5
    loaded.disable_adapters()
    assert torch.equal(_logits(loaded, inputs), plain)
    loaded.enable_adapters()
    with pytest.raises(ValueError, match="is loaded already"):
        loaded.load_adapter(tmp_path / "adapter")


def test_an_mllama_adapter_loads_into_transformers_and_trains_the_same(tmp_path):
    base = _base()
    ours = peft.get_peft_model(copy.deepcopy(base), _lora(1))
    theirs = peft.get_peft_model(oracle.hf_model(base), _lora(1))
    inputs = _inputs()
    inputs["labels"] = labels_of(inputs["input_ids"], IMAGE, inputs["attention_mask"])
    with oracle.meta_fixes():
        ours(**inputs).loss.backward()
        theirs(**inputs).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    other = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == other.keys() and len(grads) > 0
    assert max(((grads[n] - other[n]).norm() / other[n].norm()).item() for n in grads) <= 1e-5
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(oracle.hf_model(base), tmp_path / "ours")
    inputs.pop("labels")
    assert _close(_logits(again, inputs), _logits(ours, inputs), inputs["attention_mask"]) <= 1e-5


def test_merging_writes_a_plain_checkpoint_with_the_adapted_outputs(tmp_path):
    base = _base()
    adapted = peft.get_peft_model(copy.deepcopy(base), _lora(2))
    inputs = _inputs()
    want = _logits(adapted, inputs)
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    assert isinstance(merged, MllamaForConditionalGeneration) and unsupported(merged) is None
    merged.save_pretrained(tmp_path / "merged")
    reloaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert _close(_logits(reloaded, inputs), want, inputs["attention_mask"]) <= 1e-5
    own = copy.deepcopy(base)  # the same through the model's own methods
    own.load_adapter(tmp_path / "adapter")
    assert own.merge_and_unload() is own and not any(hasattr(m, "base_layer") for m in own.modules())
    assert _close(_logits(own, inputs), want, inputs["attention_mask"]) <= 1e-5


def test_adapted_models_run_on_the_plain_modules_only():
    base = _base()
    fuse_projections(base)  # fused first (a fast generate or an engine ran), adapted after
    inputs = _inputs()
    fused_then_adapted = peft.get_peft_model(base, _lora(3))
    fresh = peft.get_peft_model(_base(), _lora(3))
    assert torch.equal(_logits(fused_then_adapted, inputs), _logits(fresh, inputs))  # the fused matrices stand aside
    reason = unsupported(fused_then_adapted)
    assert reason is not None and "adapter layers" in reason and "merge" in reason
    ids = inputs["input_ids"][:1, :5]
    with pytest.raises(ValueError, match="adapter layers"):
        fused_then_adapted.generate(input_ids=ids, max_new_tokens=2, fast=True)
    out = fused_then_adapted.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    from mllama.engine.batch import BatchEngine

    with pytest.raises(ValueError, match="adapter layers"):  # the serving engine refuses it too
        BatchEngine(fused_then_adapted.get_base_model(), None, max_batch=1, pages=(4, 4))
