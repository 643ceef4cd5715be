"""Attention implementations as transformers exposes them: "sdpa" (the default) and "eager", chosen through the
config, at construction, in from_pretrained and afterwards with set_attn_implementation, per part of the
composite model. transformers (fp32, eager) is the oracle for the numbers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import oracle
from conftest import randomize, tiny_config
from test_parity import CASES, make_inputs
from mllama import MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=5).eval()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's scaled_dot_product_attention, by shape of the query's sequence dimension."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[-2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def _implementations(model) -> tuple:
    config = model.config
    return config._attn_implementation, config.text_config._attn_implementation, \
        config.vision_config._attn_implementation


def test_sdpa_is_the_default_and_set_attn_implementation_switches_the_kernel(model, sdpa_calls):
    inputs = make_inputs(*CASES["text_before_image"], 28)
    switched = copy.deepcopy(model)
    assert _implementations(switched) == ("sdpa",) * 3
    with torch.no_grad():
        switched(**inputs)
        assert sdpa_calls  # text and vision layers
        switched.set_attn_implementation("eager")
        assert _implementations(switched) == ("eager",) * 3
        sdpa_calls.clear()
        switched(**inputs)
        assert sdpa_calls == []
        switched.set_attn_implementation({"vision_config": "sdpa"})  # one part; the others keep theirs
        assert _implementations(switched) == ("eager", "eager", "sdpa")
        switched(**inputs)
        assert sdpa_calls and all(n > inputs["input_ids"].shape[1] for n in sdpa_calls)  # vision tokens only


@pytest.mark.parametrize("case", ["padded_batch", "interleaved", "text_only"])
def test_eager_equals_sdpa_and_transformers_eager(model, case):
    inputs = make_inputs(*CASES[case], 28)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad(), oracle.meta_fixes():
        sdpa_logits = model(**inputs).logits
        eager_logits = eager(**inputs).logits
        reference = oracle.hf_model(model)(**inputs).logits
    valid = inputs["attention_mask"].bool()  # padded rows attend to nothing real; their values are arbitrary
    scale = reference.abs().max().item()
    assert (eager_logits - sdpa_logits)[valid].abs().max().item() <= TOL * scale
    assert (eager_logits - reference)[valid].abs().max().item() <= TOL * scale


def test_the_choice_at_construction_in_from_config_and_from_pretrained(model, tmp_path, sdpa_calls):
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"  # a composite config passes it on to its parts
    assert _implementations(MllamaForConditionalGeneration(config)) == ("eager",) * 3
    config._attn_implementation = {"": "sdpa", "text_config": "eager", "vision_config": "sdpa"}
    assert _implementations(MllamaForConditionalGeneration(config)) == ("sdpa", "eager", "sdpa")
    built = MllamaForCausalLM._from_config(copy.deepcopy(model.config.text_config), attn_implementation="eager")
    assert built.config._attn_implementation == built.model.config._attn_implementation == "eager"
    text = MllamaConfig(**{**model.config.to_dict(), "attn_implementation": "eager"}).text_config
    assert text._attn_implementation == "eager"

    model.save_pretrained(tmp_path)
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert _implementations(loaded) == ("eager",) * 3
    sdpa_calls.clear()
    with torch.no_grad():
        loaded(**make_inputs(*CASES["padded_batch"], 28))
    assert sdpa_calls == []
    per_part = {"": "eager", "text_config": "sdpa", "vision_config": "eager"}
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=per_part)
    assert _implementations(loaded) == ("eager", "sdpa", "eager")
    assert _implementations(MllamaForConditionalGeneration.from_pretrained(tmp_path)) == ("sdpa",) * 3


@pytest.mark.parametrize("name", ["flash_attention_2", "flex_attention", "foo"])
def test_unknown_implementations_are_refused_with_the_valid_ones(model, tmp_path, name):
    with pytest.raises(ValueError, match=f'attn_implementation="{name}"` is not supported.*"sdpa".*"eager"'):
        model.set_attn_implementation(name)
    with pytest.raises(ValueError, match=f'attn_implementation="{name}"` is not supported'):
        model.set_attn_implementation({"text_config": name})
    assert _implementations(model) == ("sdpa",) * 3  # nothing changed
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f'attn_implementation="{name}"` is not supported'):
        MllamaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=name)


def test_the_vision_reordering_is_an_sdpa_form(model):
    """exact_reorder computes the vision attention with SDPA calls: asked for under eager, it is refused."""
    vision = copy.deepcopy(model.vision_model)
    inputs = make_inputs(*CASES["padded_batch"], 28)
    args = [inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]
    with torch.no_grad():
        reordered = vision(*args, exact_reorder=True).last_hidden_state
        vision.set_attn_implementation("eager")
        eager = vision(*args).last_hidden_state
        with pytest.raises(ValueError, match="exact_reorder=True .* 'eager'"):
            vision(*args, exact_reorder=True)
    assert (eager - reordered).abs().max().item() <= TOL * reordered.abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Masks beyond the 2-D padding mask: prepared 4-D masks and packed sequences (MllamaForCausalLM, as transformers)

@pytest.fixture(scope="module")
def lm_pair(model):
    lm = oracle.causal_lm_of(model)
    return lm, oracle.hf_model(lm, "MllamaForCausalLM")


def test_a_prepared_4d_mask_is_used_as_given(lm_pair):
    """Three sequences sharing a prefix, written as one row with a 4-D mask, give the three rows' last logits."""
    lm, theirs = lm_pair
    ids = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    shared = torch.tensor([[10, 11, 12, 13, 14, 15]])
    allowed = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                            [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]]).bool()[None, None]
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    with torch.no_grad():
        rows = lm(ids).logits[:, -1]
        as_bool = lm(shared, attention_mask=allowed, position_ids=positions).logits[0, -3:]
        as_float = lm(shared, attention_mask=additive, position_ids=positions).logits[0, -3:]
        reference = theirs(shared, attention_mask=additive, position_ids=positions).logits[0, -3:]
    assert (as_float - rows).abs().max().item() <= TOL * rows.abs().max().item()
    assert torch.equal(as_bool, as_float)
    assert (as_float - reference).abs().max().item() <= TOL * rows.abs().max().item()
    with pytest.raises(ValueError, match="4-D attention_mask must be"):
        lm(shared, attention_mask=allowed[..., :5], position_ids=positions)


def test_positions_that_restart_mark_packed_sequences(lm_pair):
    """Padding-free batches (DataCollatorWithFlattening): without a mask or cache, a row whose positions restart
    holds several sequences, each attending only to itself, as in transformers."""
    lm, theirs = lm_pair
    padded = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (padded != 0).long()
    packed = padded[mask.bool()][None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        rows = lm(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
        together = lm(packed, position_ids=positions, use_cache=False).logits[0]
        reference = theirs(packed, position_ids=positions, use_cache=False).logits[0]
    expected = rows.logits[mask.bool()]
    assert (together - expected).abs().max().item() <= TOL * expected.abs().max().item()
    assert (together - reference).abs().max().item() <= TOL * expected.abs().max().item()


def test_the_causal_lm_forward_traces_into_one_graph(lm_pair):
    """_can_compile_fullgraph is claimed for MllamaForCausalLM (as transformers does): torch.compile with
    fullgraph=True traces its forward, prefill and decode step, without a graph break (dynamo only)."""
    lm, _ = lm_pair
    assert MllamaForCausalLM._can_compile_fullgraph and not MllamaForConditionalGeneration._can_compile_fullgraph
    torch._dynamo.reset()
    traced = torch.compile(lm.forward, fullgraph=True, backend="eager")
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        prefill = traced(input_ids=ids, attention_mask=mask[:, :3], use_cache=True)
        step = traced(input_ids=ids[:, :1], attention_mask=mask, cache=prefill.cache)
        plain = lm(input_ids=ids[:, :1], attention_mask=mask, cache=lm(input_ids=ids, attention_mask=mask[:, :3],
                                                                           use_cache=True).cache)
    assert torch.equal(step.logits, plain.logits)


def test_the_fast_path_and_engine_refuse_eager_attention(model):
    """Their layer functions compute attention with SDPA: an eager model generates through the plain forward by
    default, and asking for the fast path (or the engine) names the reason."""
    from mllama.engine.batch import BatchEngine

    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"vision_config": "eager"})
    ids = torch.tensor([[1, 5, 9, 12]])
    with pytest.raises(ValueError, match="attn_implementation is 'eager'"):
        eager.generate(input_ids=ids, max_new_tokens=2, fast=True)
    with pytest.raises(ValueError, match="attn_implementation is 'eager'"):
        BatchEngine(eager, None)
    assert torch.equal(eager.generate(input_ids=ids, max_new_tokens=2), model.generate(input_ids=ids, max_new_tokens=2))
