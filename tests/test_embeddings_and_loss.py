"""Embedding access and resizing, the lm_head snippet of the documentation page, and the loss."""
import pytest
import torch
import torch.nn.functional as F

from conftest import BOS, IMAGE, randomize, tiny_config
from test_parity import CASES, make_inputs
from mllama import MllamaForCausalLM, MllamaForConditionalGeneration


@pytest.fixture()
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=5).eval()


def test_documentation_lm_head_snippet_runs_verbatim(model):
    old_embeddings = model.get_output_embeddings()

    num_tokens = model.vocab_size + 1
    resized_embeddings = model._get_resized_lm_head(old_embeddings, new_num_tokens=num_tokens, mean_resizing=True)
    resized_embeddings.requires_grad_(old_embeddings.weight.requires_grad)
    model.set_output_embeddings(resized_embeddings)

    assert model.vocab_size == IMAGE + 1 and model.lm_head.weight.shape == (IMAGE + 1, 64)
    assert torch.equal(model.lm_head.weight[:IMAGE], old_embeddings.weight)
    assert torch.allclose(model.lm_head.weight[IMAGE], old_embeddings.weight.mean(0), atol=1e-6)
    inputs = make_inputs(*CASES["image_first"], 28)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == IMAGE + 1
    # the image token can now be scored without an index error
    labels = inputs["input_ids"].clone()
    assert model(**inputs, labels=labels).loss.isfinite()


def test_embedding_accessors(model):
    assert model.get_input_embeddings() is model.model.language_model.embed_tokens
    assert model.get_input_embeddings().num_embeddings == IMAGE + 8
    new = torch.nn.Embedding(IMAGE + 8, 64)
    model.set_input_embeddings(new)
    assert model.model.language_model.embed_tokens is new


def test_resize_token_embeddings_then_loss(model):
    inputs = make_inputs(*CASES["interleaved"], 28)
    before = model(**inputs).logits.detach()
    model.resize_token_embeddings(IMAGE + 18)
    assert model.get_input_embeddings().weight.shape[0] == IMAGE + 18
    assert model.lm_head.out_features == IMAGE + 18 and model.config.text_config.vocab_size == IMAGE + 18
    out = model(**inputs, labels=torch.full_like(inputs["input_ids"], IMAGE + 17))
    assert out.loss.isfinite()
    assert torch.allclose(out.logits[..., :IMAGE], before, atol=1e-6)  # old rows untouched
    model.resize_token_embeddings(IMAGE + 20, pad_to_multiple_of=16)
    assert model.lm_head.out_features == 352  # 340 rounded up to a multiple of 16


def test_loss_is_shifted_cross_entropy_with_ignore_index(model):
    inputs = make_inputs(*CASES["text_before_image"], 28)
    labels = inputs["input_ids"].clone()
    labels[0, 4] = -100  # the image token, masked as the docs tell users to
    out = model(**inputs, labels=labels)
    logits = out.logits[0, :-1].float()
    target = labels[0, 1:]
    expected = F.cross_entropy(logits[target != -100], target[target != -100])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_image_token_label_is_a_clear_error(model):
    inputs = make_inputs(*CASES["text_before_image"], 28)
    with pytest.raises(ValueError, match=r"128256|<\|image\|>.*-100|320"):
        model(**inputs, labels=inputs["input_ids"])


def test_logits_to_keep(model):
    inputs = make_inputs(*CASES["interleaved"], 28)
    with torch.no_grad():
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=1).logits
        picked = model(**inputs, logits_to_keep=torch.tensor([0, 3])).logits
    assert last.shape[1] == 1 and torch.allclose(last, full[:, -1:], atol=1e-6)
    assert torch.allclose(picked, full[:, [0, 3]], atol=1e-6)


def test_out_of_range_input_ids_are_a_clear_error(model):
    with pytest.raises(ValueError, match="input_ids.*0..327"):
        model(input_ids=torch.tensor([[BOS, 400]]))


def test_outputs_expose_logits_loss_and_cache(model):
    inputs = make_inputs(*CASES["image_first"], 28)
    out = model(**inputs, labels=torch.full_like(inputs["input_ids"], 5), use_cache=True)
    assert out["logits"] is out.logits and out[0] is out.loss
    assert out.past_key_values is out.cache and out.cache.get_seq_length() == inputs["input_ids"].shape[1]
    # text-only inputs skip the cross-attention layers and store no vision K/V
    text = make_inputs(*CASES["text_only"], 28)
    cache = model(**text, use_cache=True).cache
    assert not cache.cross_key and len(cache.key) == 4
    # the causal LM upcasts logits, the conditional model keeps the model dtype (as transformers does)
    lm = MllamaForCausalLM(model.config.text_config)
    assert lm(**text).logits.dtype == torch.float32
