"""generate(return_dict_in_generate=True, output_scores/output_logits): transformers' result, step by step."""
from __future__ import annotations

import pytest
import torch

import oracle
from conftest import BOS, PAD, randomize, tiny_config
from test_generation import GEN_CASES
from test_parity import make_inputs
from mllama import MllamaForConditionalGeneration

OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
TEXT_BATCH = [[BOS, 5, 6, 7, 8, 9, 10, 11], [BOS, 11, 10, 9, 8, 7, 6, 5]]
# (prompts, images, arguments): greedy through the min-length and penalty processors; sampling with top_k=1 (the
# token greedy takes, so that the two implementations agree without sharing a random stream) through the
# temperature and top-k warpers. The penalty only on unpadded text: today it fails on the image token (outside
# the output vocab) and counts left padding, which transformers leaves out.
PROCESSING = {
    "greedy_images": (*GEN_CASES["left_padded_batch"], dict(do_sample=False, min_new_tokens=3)),
    "greedy_penalty": (TEXT_BATCH, None, dict(do_sample=False, repetition_penalty=1.3, min_new_tokens=3)),
    "sampling_images": (*GEN_CASES["left_padded_batch"], dict(do_sample=True, temperature=0.7, top_k=1)),
    "sampling_penalty": (TEXT_BATCH, None, dict(do_sample=True, temperature=0.7, top_k=1, repetition_penalty=1.2)),
}


@pytest.fixture(scope="module")
def pair():
    ours = randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=11, std=0.15).eval()
    return ours, oracle.hf_model(ours)


@pytest.mark.parametrize("processing", list(PROCESSING))
@pytest.mark.parametrize("fast", [False, True])
def test_scores_and_logits_equal_transformers(pair, processing, fast):
    ours, theirs = pair
    ids, images, processing_kw = PROCESSING[processing]
    inputs = make_inputs(ids, images, 28)
    kw = dict(max_new_tokens=10, eos_token_id=2, pad_token_id=PAD, **processing_kw, **OUTPUTS)
    with torch.no_grad(), oracle.meta_fixes():
        expected = theirs.generate(**inputs, **kw)
    got = ours.generate(**inputs, fast=fast, **kw)
    assert torch.equal(got.sequences, expected.sequences) and torch.equal(got["sequences"], got[0])
    for name in ("scores", "logits"):
        ours_steps, their_steps = got[name], getattr(expected, name)
        new_tokens = got.sequences.shape[1] - len(ids[0])
        assert isinstance(ours_steps, tuple) and len(ours_steps) == len(their_steps) == new_tokens
        for a, b in zip(ours_steps, their_steps):
            assert a.dtype == torch.float32 and a.shape == b.shape == (len(ids), ours.vocab_size)
            assert torch.equal(a.isinf(), b.isinf())
            assert torch.allclose(a.nan_to_num(posinf=0, neginf=0), b.nan_to_num(posinf=0, neginf=0), atol=1e-4)


def test_the_dict_result_holds_only_what_was_asked(pair):
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    plain = ours.generate(**inputs, max_new_tokens=4)
    out = ours.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain) and list(out) == ["sequences"] and out.scores is None
    scores_only = ours.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    assert len(scores_only.scores) == 4 and scores_only.logits is None


def test_outputs_without_the_dict_are_refused(pair):
    ours, _ = pair
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    for flag in ("output_scores", "output_logits"):
        with pytest.raises(ValueError, match="return_dict_in_generate=True"):
            ours.generate(**inputs, max_new_tokens=2, **{flag: True})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path replays CUDA graphs on CUDA only")
def test_graph_replayed_steps_keep_their_own_scores():
    """The decode graph writes every step's logits into one buffer: each step's scores must be a copy."""
    model = randomize(MllamaForConditionalGeneration.from_config(tiny_config(), device="cuda"), seed=11, std=0.15)
    model.eval()
    inputs = {k: v.cuda() for k, v in make_inputs(*GEN_CASES["left_padded_batch"], 28).items()}
    kw = dict(max_new_tokens=10, eos_token_id=None, do_sample=False, **OUTPUTS)
    plain = model.generate(**inputs, fast=False, **kw)
    fast = model.generate(**inputs, fast=True, **kw)
    assert torch.equal(plain.sequences, fast.sequences)
    for name in ("scores", "logits"):
        assert len(plain[name]) == len(fast[name]) == 10
        for a, b in zip(plain[name], fast[name]):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
