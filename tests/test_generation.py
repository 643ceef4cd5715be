"""generate(): greedy tokens equal transformers' (with Meta's fixes), sampling semantics, streaming."""
from __future__ import annotations

import pytest
import torch

import oracle
from conftest import BOS, IMAGE, PAD, cross_mask, randomize, tiny_config
from test_parity import RATIOS, make_inputs
from mllama import MllamaForConditionalGeneration
from mllama.generation import SamplingParams, filter_logits, apply_repetition_penalty

GEN_CASES = {
    "image_first": ([[IMAGE, BOS, 10, 11, 12, 13]], [[6]]),
    "text_before_image": ([[BOS, 5, 6, 7, IMAGE, 8, 9, 10]], [[2]]),
    "two_images": ([[BOS, IMAGE, 5, 6, IMAGE, 7]], [[3, 1]]),
    "text_only": ([[BOS, 5, 6, 7, 8, 9]], None),
    # left-padded batch: 1 image, 2 images, and a text-only sample in the same batch
    "left_padded_batch": ([[PAD, PAD, BOS, IMAGE, 5, 6, 7, 8], [BOS, 5, IMAGE, 6, IMAGE, 7, 8, 9],
                           [PAD, PAD, PAD, BOS, 11, 12, 13, 14]], [[6], [1, 2], []]),
}


@pytest.fixture(scope="module", params=["tiny", "real_tile"])
def pair(request):
    config = tiny_config(image_size=28 if request.param == "tiny" else 560)
    config.vision_config.attention_heads = 2
    ours = randomize(MllamaForConditionalGeneration.from_config(config), seed=11, std=0.15).eval()
    return ours, oracle.hf_model(ours)


@pytest.fixture(scope="module")
def tiny():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=11, std=0.15).eval()


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_tokens_equal_transformers(pair, case):
    ours, theirs = pair
    ids, ratios = GEN_CASES[case]
    inputs = make_inputs(ids, ratios, ours.config.vision_config.image_size)
    with torch.no_grad(), oracle.meta_fixes():
        expected = theirs.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=PAD)
    got = ours.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=PAD)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got.shape[1] == len(ids[0]) + 24 or bool((got[:, len(ids[0]):] == 2).any())


def test_causal_lm_generates_like_the_full_model_on_text(tiny):
    ours = tiny
    lm = oracle.causal_lm_of(ours)
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    assert torch.equal(lm.generate(**inputs, max_new_tokens=8), ours.generate(**inputs, max_new_tokens=8))


def test_no_work_is_redone_per_step(tiny, monkeypatch):
    """The vision encoder runs once, cross K/V are projected once, the cache is allocated once."""
    ours = tiny
    calls = {"vision": 0, "kv": 0}
    vision_forward = type(ours.model.vision_model).forward
    monkeypatch.setattr(type(ours.model.vision_model), "forward",
                        lambda self, *a, **k: calls.__setitem__("vision", calls["vision"] + 1) or vision_forward(self, *a, **k))
    from mllama.modeling import text

    project = text.MllamaTextCrossAttention.project_kv
    monkeypatch.setattr(text.MllamaTextCrossAttention, "project_kv",
                        lambda self, x: calls.__setitem__("kv", calls["kv"] + 1) or project(self, x))
    inputs = make_inputs(*GEN_CASES["two_images"], ours.config.vision_config.image_size)
    out = ours.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    assert out.shape[1] == len(GEN_CASES["two_images"][0][0]) + 6
    assert calls == {"vision": 1, "kv": len(ours.config.text_config.cross_attention_layers)}


def test_sampling_is_reproducible_with_a_seed(tiny):
    ours = tiny
    inputs = make_inputs(*GEN_CASES["image_first"], ours.config.vision_config.image_size)
    kw = dict(do_sample=True, temperature=1.5, max_new_tokens=12, min_new_tokens=12)
    a = ours.generate(**inputs, seed=123, **kw)
    b = ours.generate(**inputs, generator=torch.Generator().manual_seed(123), **kw)
    c = ours.generate(**inputs, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filtered_distribution_follows_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # top_k=2 keeps the two largest, renormalised
    p = filter_logits(logits, 1.0, 2, 1.0).softmax(-1)
    assert torch.allclose(p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]), atol=1e-6)
    # top_p=0.8: smallest set reaching 0.8 = {0.5, 0.2, 0.15} (0.85)
    p = filter_logits(logits, 1.0, 0, 0.8).softmax(-1)
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85, atol=1e-6)
    # top_p smaller than the largest probability still keeps one token
    p = filter_logits(logits, 1.0, 0, 0.1).softmax(-1)
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0, 0]]))
    # temperature 2 = square root of the probabilities, renormalised
    p = filter_logits(logits, 2.0, 0, 1.0).softmax(-1)
    expected = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).sqrt()
    assert torch.allclose(p, expected / expected.sum(), atol=1e-6)
    # min_p=0.3: tokens below 0.3 x the largest probability (0.15) go; a row's own min_keep still stays
    p = filter_logits(logits, 1.0, 0, 1.0, min_p=0.3).softmax(-1)
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85, atol=1e-6)
    p = filter_logits(logits.expand(2, -1), 1.0, 0, 1.0, min_keep=[1, 4], min_p=[0.9, 0.9]).softmax(-1)
    assert torch.allclose(p[0], torch.tensor([1.0, 0, 0, 0, 0])) and torch.allclose(p[1, 4], torch.tensor(0.0))
    assert (p[1, :4] > 0).all()
    # empirical check through multinomial: frequencies match the filtered distribution
    gen = torch.Generator().manual_seed(0)
    probs = filter_logits(logits, 1.0, 3, 1.0).softmax(-1)
    draws = torch.multinomial(probs.expand(20000, -1), 1, generator=gen).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs[0], atol=0.015) and freq[3:].sum() == 0


def test_rows_with_their_own_knobs_sample_what_each_would_alone():
    """sample_rows (the serving engine's batched sampling): each row's distribution, to the bit, and its draws
    from its own generator equal next_tokens' for that row alone; a row without a generator draws from the
    global one."""
    from mllama.sampling import next_tokens, sample_rows

    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(do_sample=True, temperature=0.7, top_k=0, top_p=0.9),
              SamplingParams(do_sample=True, temperature=1.3, top_k=5, top_p=1.0),
              SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.5),
              SamplingParams(do_sample=True, temperature=0.9, top_k=0, top_p=1.0, min_p=0.05),
              SamplingParams(do_sample=True, temperature=1.1, top_k=2, top_p=0.3, min_tokens_to_keep=3)]
    together = filter_logits(logits, [p.temperature for p in params], [p.top_k for p in params],
                             [p.top_p for p in params], [p.min_tokens_to_keep for p in params])
    for row, p in enumerate(params):
        alone = filter_logits(logits[row:row + 1], p.temperature, p.top_k, p.top_p, p.min_tokens_to_keep)
        assert torch.equal(together[row:row + 1], alone), row
    assert len(set(torch.isfinite(together).sum(-1).tolist())) == 5  # the knobs differ in effect, row by row
    batched = [torch.Generator().manual_seed(10 + row) for row in range(5)]
    alone = [torch.Generator().manual_seed(10 + row) for row in range(5)]
    for _ in range(30):
        tokens = sample_rows(logits, params, batched).tolist()
        assert tokens == [int(next_tokens(logits[row:row + 1], None, p, 0, alone[row])[0])
                          for row, p in enumerate(params)]
    torch.manual_seed(4)
    free = sample_rows(logits, params, [None] * 5)
    assert free.shape == (5,) and all(torch.isfinite(together[row, t]) for row, t in enumerate(free.tolist()))


def test_repetition_penalty_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_eos_min_new_tokens_and_padding(tiny):
    ours = tiny
    inputs = make_inputs(*GEN_CASES["left_padded_batch"], ours.config.vision_config.image_size)
    greedy = ours.generate(**inputs, max_new_tokens=5, eos_token_id=None)
    first = greedy[:, 8]
    # make the first greedy token of row 0 an EOS: row 0 stops, its later tokens are pad
    out = ours.generate(**inputs, max_new_tokens=5, eos_token_id=[int(first[0]), 999], pad_token_id=PAD)
    assert out[0, 8] == first[0] and (out[0, 9:] == PAD).all()
    # min_new_tokens forbids that EOS in the first 3 steps
    out = ours.generate(**inputs, max_new_tokens=5, min_new_tokens=3, eos_token_id=int(first[0]))
    assert (out[:, 8:11] != first[0]).all()


def test_bad_generation_arguments_are_clear(tiny):
    ours = tiny
    inputs = make_inputs(*GEN_CASES["image_first"], ours.config.vision_config.image_size)
    with pytest.raises(ValueError, match="top_p"):
        ours.generate(**inputs, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(**inputs, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="context"):
        ours.generate(**inputs, max_new_tokens=10_000)
    right = make_inputs([[BOS, 5, 6, PAD]], None, 28)
    with pytest.raises(ValueError, match="right-padded.*left"):
        ours.generate(**right)
    with pytest.raises(ValueError, match="unknown arguments.*foo"):
        ours.generate(**inputs, foo=1)


def test_generation_config_defaults_are_used(tiny):
    ours = tiny
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    ours.generation_config.update(max_new_tokens=3, eos_token_id=[], do_sample=False)
    try:
        assert ours.generate(**inputs).shape[1] == 6 + 3
    finally:
        ours.generation_config.clear()


def test_streaming_is_correct_on_multibyte_boundaries(tiny_checkpoint):
    from mllama import MllamaTokenizer
    from mllama.generation import TextDecoder

    tokenizer = MllamaTokenizer.from_pretrained(tiny_checkpoint)
    text = "naïve café 🙂 世界 👩‍👩‍👧 ∑x² — done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several byte-level tokens
    decoder = TextDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_decoder_pieces_equal_full_decode_and_cost_a_bounded_window(tiny_checkpoint):
    """Random ids (byte tokens that split characters, special tokens, ordinary ones) decode piecewise to exactly
    the whole list's text; and each push decodes a few ids, not the whole history (a quadratic decoder slows long
    answers in the server)."""
    import random

    from mllama.generation import TextDecoder
    from mllama.processing.processor import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(str(tiny_checkpoint)).tokenizer
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    emoji = tokenizer.encode("\U0001F600\u00e9\u4e2d", add_special_tokens=False)
    for trial in range(20):
        ids = [rng.choice([rng.randrange(128256), rng.randrange(256), rng.randrange(300, 5000), 128009, 128256 - 1,
                           *emoji]) for _ in range(200)]
        decoder = TextDecoder(Counting())
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True), trial
    assert max(lengths) < 50, max(lengths)


def test_stream_yields_what_generate_returns(tiny_checkpoint):
    from mllama import AutoProcessor
    from mllama.generation import stream

    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(text="Once upon a time", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=15, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    pieces = list(stream(model, processor, **inputs, max_new_tokens=15, do_sample=False))
    assert "".join(pieces) == expected and len(pieces) > 1


def test_stop_strings_end_generation(tiny_checkpoint):
    from mllama import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(text="Once upon a time", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    full = model.generate(**inputs, max_new_tokens=15, do_sample=False)
    text = processor.decode(full[0, prompt_len:])
    stop = processor.decode(full[0, prompt_len + 4:prompt_len + 5])
    cut = model.generate(**inputs, max_new_tokens=15, do_sample=False, stop_strings=[stop], tokenizer=processor)
    assert cut.shape[1] <= prompt_len + 5 and torch.equal(cut[0], full[0, :cut.shape[1]])
    assert stop in processor.decode(cut[0, prompt_len:]) and text
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**inputs, stop_strings=["x"])
