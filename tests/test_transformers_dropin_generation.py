"""generate as transformers' GenerationMixin gives it: beam search, the eager loop's options, the mixin's methods.

Every result is compared with transformers' own generate on the same tiny random weights (fp32, eager, Meta's
two behaviours patched in by oracle.meta_fixes), token for token.
"""
from __future__ import annotations

import pytest
import torch

import oracle
from conftest import BOS, PAD, randomize, tiny_config
from test_generation import GEN_CASES
from test_parity import make_inputs
from mllama import MllamaForCausalLM, MllamaForConditionalGeneration
from mllama.generation import GenerationMixin

DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
TEXT = [[BOS, 5, 6, 7, 8, 9, 10, 11], [PAD, PAD, BOS, 11, 10, 9, 8, 7]]


@pytest.fixture(scope="module")
def pair():
    ours = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=11, std=0.15).eval()
    return ours, oracle.hf_model(ours)


def both(pair, inputs: dict, seed: int = 0, **kw):
    """(ours, transformers') generate results for the same arguments and the same random stream."""
    ours, theirs = pair
    torch.manual_seed(seed)
    with torch.no_grad(), oracle.meta_fixes():
        expected = theirs.generate(**inputs, **kw)
    torch.manual_seed(seed)
    return ours.generate(**inputs, **kw), expected


def assert_steps_equal(got: tuple, expected: tuple) -> None:
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and torch.equal(a.isinf(), b.isinf())
        assert torch.allclose(a.nan_to_num(posinf=0, neginf=0), b.nan_to_num(posinf=0, neginf=0), atol=1e-4)


BEAMS = {
    "penalised_two_returned": dict(num_beams=3, num_return_sequences=2, length_penalty=2.0),
    "early_stopping_bad_words": dict(num_beams=2, early_stopping=True, bad_words_ids=[[5, 6], [7]],
                                     remove_invalid_values=True),
    "never": dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    "sampling": dict(num_beams=2, do_sample=True, top_k=5, top_p=0.8, temperature=0.7, num_return_sequences=2),
}


@pytest.mark.parametrize("case", list(BEAMS))
def test_beam_search_equals_transformers(pair, case):
    """Left-padded batch with one, two and no images; EOS ends some beams early."""
    inputs = make_inputs(*GEN_CASES["left_padded_batch"], 28)
    got, expected = both(pair, inputs, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD, **DICT, **BEAMS[case])
    assert torch.equal(got.sequences, expected.sequences)
    assert got.beam_indices.tolist() == expected.beam_indices.tolist()
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-4)
    assert_steps_equal(got.scores, expected.scores)
    assert_steps_equal(got.logits, expected.logits)
    if case == "never":  # without the dict: the sequences alone
        ours, _ = pair
        plain = ours.generate(**inputs, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD, **BEAMS[case])
        assert torch.equal(plain, got.sequences)


def test_beam_search_ends_when_no_beam_can_improve(pair):
    """With the 20 likeliest first tokens as EOS ids, beams finish at once and the search stops short of
    max_new_tokens (early_stopping=False: when no running beam can beat the finished ones)."""
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    with torch.no_grad():
        eos = ours(**inputs).logits[0, -1].topk(20).indices.tolist()
    got, expected = both(pair, inputs, max_new_tokens=6, eos_token_id=eos, num_beams=2, **DICT)
    assert torch.equal(got.sequences, expected.sequences) and len(got.scores) == len(expected.scores) < 6
    assert got.beam_indices.tolist() == expected.beam_indices.tolist()


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_k=8, num_return_sequences=3),
                                dict(bad_words_ids=[[5, 6], [9]], remove_invalid_values=True)],
                         ids=["sampled_copies", "bad_words"])
def test_sampling_options_equal_transformers(pair, kw):
    inputs = make_inputs(*GEN_CASES["left_padded_batch"], 28)
    got, expected = both(pair, inputs, max_new_tokens=6, eos_token_id=2, pad_token_id=PAD, **DICT, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    assert_steps_equal(got.scores, expected.scores)


@pytest.mark.parametrize("use_cache", [True, False])
def test_attentions_and_hidden_states_per_step_equal_transformers(pair, use_cache):
    """Per new token the forward's per-layer tuples; cross layers' keys are all the vision tokens."""
    inputs = make_inputs(*GEN_CASES["left_padded_batch" if use_cache else "text_before_image"], 28)
    got, expected = both(pair, inputs, max_new_tokens=3, eos_token_id=None, use_cache=use_cache,
                         output_attentions=True, output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("attentions", "hidden_states"):
        ours_steps, their_steps = got[name], getattr(expected, name)
        assert len(ours_steps) == len(their_steps) == 3
        for a, b in zip(ours_steps, their_steps):
            assert isinstance(a, tuple) and [t.shape for t in a] == [t.shape for t in b]
            assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b))
    assert (got.past_key_values is not None) == use_cache


def test_generate_from_inputs_embeds(pair):
    """With input_ids too the prompt leads the result; from inputs_embeds alone only the new tokens come back."""
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["text_before_image"], 28)
    embeds = ours.get_input_embeddings()(inputs["input_ids"])
    kw = dict(max_new_tokens=5, eos_token_id=None, **DICT)
    from_ids, expected = both(pair, inputs, **kw)
    from_both, _ = both(pair, dict(inputs, inputs_embeds=embeds), **kw)
    no_ids = {k: v for k, v in inputs.items() if k != "input_ids"}
    from_embeds, their_embeds = both(pair, dict(no_ids, inputs_embeds=embeds), **kw)
    assert torch.equal(from_ids.sequences, expected.sequences) and torch.equal(from_both.sequences, from_ids.sequences)
    assert torch.equal(from_embeds.sequences, their_embeds.sequences)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, embeds.shape[1]:])
    text = {"input_ids": torch.tensor(TEXT), "attention_mask": (torch.tensor(TEXT) != PAD).long()}
    embeds = ours.get_input_embeddings()(text.pop("input_ids"))
    beams, their_beams = both(pair, dict(text, inputs_embeds=embeds), num_beams=2, use_cache=False, **kw)
    assert torch.equal(beams.sequences, their_beams.sequences)  # and the whole sequence every step


def test_continue_from_inputs_embeds_and_past_key_values():
    """3 tokens, then 1 more on the returned cache, equal 4 in one call (the text model)."""
    lm = oracle.causal_lm_of(randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=11, std=0.15))
    ids = torch.tensor(TEXT)
    mask = (ids != PAD).long()
    embeds = lm.get_input_embeddings()(ids)
    kw = dict(eos_token_id=None, return_dict_in_generate=True)
    whole = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, **kw)
    first = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, **kw)
    longer = torch.cat([embeds, lm.get_input_embeddings()(first.sequences)], dim=1)
    more = lm.generate(inputs_embeds=longer, attention_mask=torch.cat([mask, torch.ones_like(first.sequences)], 1),
                       past_key_values=first.past_key_values, max_new_tokens=1, **kw)
    assert torch.equal(torch.cat([first.sequences, more.sequences], dim=1), whole.sequences)
    assert more.past_key_values.get_seq_length() == whole.past_key_values.get_seq_length() == 8 + 3


def test_without_input_ids_generation_starts_from_bos(pair):
    got, expected = both(pair, {}, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(got, expected) and got[0, 0] == BOS


def test_position_ids_and_logits_to_keep_change_nothing(pair):
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["image_first"], 28)
    inputs = {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()}
    inputs["attention_mask"][1, :2] = 0  # left padding
    plain = ours.generate(**inputs, max_new_tokens=5, eos_token_id=None)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(ours.generate(**inputs, position_ids=positions, max_new_tokens=5, eos_token_id=None), plain)
    assert torch.equal(ours.generate(**inputs, logits_to_keep=0, max_new_tokens=5, eos_token_id=None), plain)


def test_generation_mixin_and_prepare_inputs_for_generation(pair):
    ours, _ = pair
    for cls in (MllamaForCausalLM, MllamaForConditionalGeneration):
        assert GenerationMixin in cls.__bases__ and cls.can_generate()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    first = ours.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), pixel_values=torch.ones(1),
                                               custom_arg="x", output_attentions=True)
    assert torch.equal(first["input_ids"], ids) and first["custom_arg"] == "x" and first["output_attentions"] is True
    assert first["position_ids"].tolist() == [[0, 1, 2]] * 2 and "pixel_values" in first
    inputs = make_inputs(*GEN_CASES["image_first"], 28)
    cache = ours(**inputs, use_cache=True).past_key_values
    longer = torch.cat([inputs["input_ids"], torch.tensor([[7]])], dim=1)
    step = ours.prepare_inputs_for_generation(longer, past_key_values=cache,
                                              attention_mask=torch.ones_like(longer), pixel_values=torch.ones(1))
    assert step["input_ids"].tolist() == [[7]] and step["position_ids"].tolist() == [[6]]
    assert "pixel_values" not in step  # the images are in the cache


def test_unsupported_combinations_are_refused(pair):
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    with pytest.raises(ValueError, match="num_return_sequences must be in 1..num_beams"):
        ours.generate(**inputs, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="needs do_sample=True or num_beams > 1"):
        ours.generate(**inputs, num_return_sequences=2)
    with pytest.raises(ValueError, match="early_stopping must be"):
        ours.generate(**inputs, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="bad_words_ids must be a list of lists"):
        ours.generate(**inputs, bad_words_ids=[5])
    with pytest.raises(ValueError, match="beam search streams no tokens"):
        ours.generate(**inputs, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match="fast=True decodes greedy search and sampling from input_ids only"):
        ours.generate(**inputs, num_beams=2, fast=True)


def test_setting_a_generation_config_attribute_changes_what_generate_does():
    """Before: the attribute was stored beside the dict, so generate kept using the old value."""
    config = tiny_config()
    model = randomize(MllamaForCausalLM(config.text_config)).eval()
    ids = torch.tensor([[5, 6, 7]])
    model.generation_config.max_new_tokens = 2
    assert model.generation_config["max_new_tokens"] == 2
    assert model.generate(input_ids=ids, do_sample=False).shape == (1, 5)
    del model.generation_config.max_new_tokens
    assert "max_new_tokens" not in model.generation_config
