"""Logit parity with transformers (fp32, eager) on random weights with non-zero gates.

Default mode = Meta's reference: compared with transformers carrying Meta's two behaviours (oracle.meta_fixes).
compat="transformers": compared with unpatched transformers.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import oracle
from conftest import BOS, IMAGE, PAD, cross_mask, randomize, tiny_config
from mllama import MllamaCache, MllamaForConditionalGeneration

TOL = 1e-5
GEOMETRIES = {"tiny": dict(image_size=28), "real_tile": dict(image_size=560)}

# ids, per-sample aspect-ratio ids of its images (1-based into the default list: 1=1x1, 2=1x2, 3=1x3, 6=2x2)
CASES = {
    "image_first": ([[IMAGE, BOS, 10, 11, 12, 13]], [[6]]),
    "text_before_image": ([[BOS, 5, 6, 7, IMAGE, 8, 9, 10]], [[2]]),
    "two_images": ([[BOS, IMAGE, IMAGE, 5, 6, 7]], [[3, 1]]),
    "interleaved": ([[BOS, 5, IMAGE, 6, 7, IMAGE, 8, 9, IMAGE, 10]], [[1, 6, 2]]),
    "padded_batch": ([[BOS, IMAGE, 5, 6, 7, 8, 9, 10], [BOS, 5, IMAGE, 6, IMAGE, 7, PAD, PAD]], [[6], [1, 2]]),
    "text_only": ([[BOS, 5, 6, 7, 8, 9]], None),
}
RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


def make_inputs(ids, ratio_ids, image_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor(ids)
    attention_mask = (input_ids != PAD).long()
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    if ratio_ids is None:
        return out
    batch, max_images = len(ids), max(len(r) for r in ratio_ids)
    pixel_values = torch.zeros(batch, max_images, 4, 3, image_size, image_size)
    aspect_ratio_ids = torch.zeros(batch, max_images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(batch, max_images, 4, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1  # the processor's convention, padding images included
    num_tiles = []
    for b, ratios in enumerate(ratio_ids):
        num_tiles.append([])
        for n, rid in enumerate(ratios):
            tiles = RATIOS[rid - 1][0] * RATIOS[rid - 1][1]
            pixel_values[b, n, :tiles] = torch.randn(tiles, 3, image_size, image_size, generator=gen)
            aspect_ratio_ids[b, n] = rid
            aspect_ratio_mask[b, n, :tiles] = 1
            num_tiles[-1].append(tiles)
    out.update(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
               cross_attention_mask=cross_mask(ids, num_tiles))
    return out


@contextlib.contextmanager
def compat_mode(model, mode):
    old = model.config.compat
    model.config.compat = mode
    try:
        yield
    finally:
        model.config.compat = old


def rel_diff(a, b, valid=None):
    if valid is not None:
        a, b = a[valid.bool()], b[valid.bool()]
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def pair(request):
    torch.manual_seed(0)
    config = tiny_config(**GEOMETRIES[request.param])
    if request.param == "real_tile":
        config.vision_config.attention_heads = 2  # keeps transformers' eager [6432 x 6432] scores in memory
    ours = randomize(MllamaForConditionalGeneration.from_config(config)).eval()
    # Many tests here show transformers the same images in the same mode: its vision tower computes each once.
    return request.param, ours, oracle.memoize_vision(oracle.hf_model(ours))


@pytest.mark.parametrize("mode", ["meta", "transformers"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case, mode):
    geometry, ours, theirs = pair
    ids, ratios = CASES[case]
    inputs = make_inputs(ids, ratios, ours.config.vision_config.image_size)
    fixes = oracle.meta_fixes() if mode == "meta" else contextlib.nullcontext()
    with torch.no_grad(), compat_mode(ours, mode), fixes:
        a = ours(**inputs).logits
        b = theirs(**inputs).logits
    assert a.shape == b.shape == (len(ids), len(ids[0]), ours.vocab_size)
    assert rel_diff(a, b, inputs["attention_mask"]) <= TOL


def _hf_cache(out):
    return out.cache if "cache" in out else out.past_key_values


@pytest.mark.parametrize("mode", ["meta", "transformers"])
@pytest.mark.parametrize("case", ["interleaved", "padded_batch", "text_only"])
def test_decode_steps_with_cache_match(pair, case, mode):
    """Prompt, then 4 greedy steps on the cache; each new row sees the images the last prompt row saw."""
    _, ours, theirs = pair
    ids, ratios = CASES[case]
    inputs = make_inputs(ids, ratios, ours.config.vision_config.image_size)
    fixes = oracle.meta_fixes() if mode == "meta" else contextlib.nullcontext()
    with torch.no_grad(), compat_mode(ours, mode), fixes:
        a = ours(**inputs, use_cache=True)
        b = theirs(**inputs, use_cache=True)
        cache_a, cache_b = a.cache, _hf_cache(b)
        assert isinstance(cache_a, MllamaCache) and cache_a.get_seq_length() == len(ids[0])
        full = {k: v for k, v in inputs.items()}
        for step in range(4):
            token = b.logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(a.logits[:, -1].argmax(-1, keepdim=True), token)
            full["input_ids"] = torch.cat([full["input_ids"], token], 1)
            full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(token)], 1)
            position = full["attention_mask"].shape[1] - 1
            step_inputs = dict(input_ids=token, attention_mask=full["attention_mask"],
                               position_ids=torch.full_like(token, position), use_cache=True)
            if "cross_attention_mask" in full:
                full["cross_attention_mask"] = torch.cat([full["cross_attention_mask"],
                                                          full["cross_attention_mask"][:, -1:]], 1)
                step_inputs["cross_attention_mask"] = full["cross_attention_mask"][:, -1:]
            a = ours(**step_inputs, cache=cache_a)
            b = theirs(**step_inputs, cache=cache_b)
            cache_b = _hf_cache(b)
            assert rel_diff(a.logits, b.logits) <= TOL
        # The cached steps equal one uncached forward over the whole sequence.
        whole = ours(**full, use_cache=False).logits[:, -1:]
        assert rel_diff(a.logits, whole) <= TOL


def test_each_meta_fix_changes_the_logits(pair):
    """Leaving either fix out of transformers moves it away from our (Meta's) logits: both fixes matter."""
    _, ours, theirs = pair
    ids, ratios = CASES["text_before_image"]
    inputs = make_inputs(ids, ratios, ours.config.vision_config.image_size)
    with torch.no_grad():
        a = ours(**inputs).logits
        with oracle.meta_fixes(intermediate=True, row_mask=True):
            assert rel_diff(a, theirs(**inputs).logits) <= TOL
        with oracle.meta_fixes(intermediate=False, row_mask=True):
            assert rel_diff(a, theirs(**inputs).logits) > 1e-3
        with oracle.meta_fixes(intermediate=True, row_mask=False):
            b = theirs(**inputs).logits
            assert rel_diff(a, b) > 1e-3
            # the row-mask leak shows even on the BOS, before any image token
            assert rel_diff(a[:, :1], b[:, :1]) > 1e-4
        # and our switch to transformers' behaviour reproduces unpatched transformers
        with compat_mode(ours, "transformers"):
            assert rel_diff(ours(**inputs).logits, theirs(**inputs).logits) <= TOL
            assert rel_diff(ours(**inputs).logits, a) > 1e-3


@pytest.mark.parametrize("mode", ["meta", "transformers"])
def test_vision_model_alone_matches(pair, mode):
    _, ours, theirs = pair
    inputs = make_inputs(*CASES["padded_batch"], ours.config.vision_config.image_size)
    vision_inputs = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    fixes = oracle.meta_fixes(row_mask=False) if mode == "meta" else contextlib.nullcontext()
    with torch.no_grad(), compat_mode(ours, mode), fixes:
        a = ours.model.vision_model(**vision_inputs).last_hidden_state
        b = theirs.model.vision_model(**vision_inputs).last_hidden_state
    vc = ours.config.vision_config
    assert a.shape == (2, 2, 4, vc.num_patches, vc.vision_output_dim)
    assert rel_diff(a, b) <= TOL


def test_real_vision_config_output_shape():
    """The published vision config gives [B, N, T, 1601, 7680] (shape-only run on the meta device)."""
    from mllama import MllamaVisionConfig, MllamaVisionModel

    config = MllamaVisionConfig(image_size=560)
    with torch.device("meta"):
        model = MllamaVisionModel(config)
        pixel_values = torch.empty(1, 2, 4, 3, 560, 560)
        out = model(pixel_values, torch.tensor([[6, 1]]), torch.ones(1, 2, 4, dtype=torch.long))
    assert out.last_hidden_state.shape == (1, 2, 4, 1601, 7680)
    assert sum(p.numel() for p in model.parameters()) > 800_000_000  # the full 822.5M-parameter tower


def test_causal_lm_matches_transformers_text_only(pair):
    _, ours, _ = pair
    lm = oracle.causal_lm_of(ours)
    theirs = oracle.hf_model(lm, "MllamaForCausalLM")
    inputs = make_inputs(*CASES["text_only"], 28)
    with torch.no_grad():
        a, b = lm(**inputs).logits, theirs(**inputs).logits
    assert a.dtype == torch.float32 and rel_diff(a, b) <= TOL


def test_bf16_on_cpu_stays_close_to_fp32(pair):
    _, ours, _ = pair
    inputs = make_inputs(*CASES["interleaved"], ours.config.vision_config.image_size)
    with torch.no_grad():
        ref = ours(**inputs).logits
        half = MllamaForConditionalGeneration(ours.config).eval()
        half.load_state_dict(ours.state_dict())
        half.to(torch.bfloat16)
        low = half(**inputs).logits
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: a few bf16 ulps of the logit scale after 6 layers
    assert rel_diff(low.float(), ref) < 5e-2
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
