"""Padding tiles leave the cross-attention states (MllamaModel.kept_tiles): the same function under Meta's semantics,
shorter cross K/V; never in compat="transformers" mode."""
from __future__ import annotations

import pytest
import torch

from conftest import BOS, IMAGE, PAD, randomize, tiny_config
from test_parity import make_inputs
from mllama import MllamaCache, MllamaForConditionalGeneration
from mllama.engine.fast import engine_state

# Left-padded batches of 2 (ids, aspect-ratio ids: 1 = 1 tile, 2 = 2 tiles, 3 = 3 tiles of 4), and the indices into
# the images*tiles axis of the tiles some row sees.
CASES = {
    # 1 and 3 real tiles; sample 1 has text rows before its image. Tiles 1, 2 are seen by sample 1 only.
    "one_image_each": ([[PAD, PAD, BOS, IMAGE, 5, 6, 7, 8], [BOS, 5, 6, IMAGE, 7, 8, 9, 10]], [[1], [3]], [0, 1, 2]),
    # sample 0: images of 2 and 1 tiles; sample 1: one image of 1 tile and a padding image.
    "second_image": ([[BOS, IMAGE, 5, 6, IMAGE, 7, 8, 9], [PAD, PAD, BOS, 5, IMAGE, 6, 7, 8]], [[2, 1], [1]], [0, 1, 4]),
}
STEPS = 4


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=5, std=0.15).eval()


def run(model, inputs, drop, tokens=None):
    """Prefill on an allocated cache, then STEPS cached decode steps (given tokens, else greedy).
    Returns (logits of the last prompt row and of each step [B, 1 + STEPS, vocab], cache, tokens)."""
    model.model.drop_padding_tiles = drop
    try:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        b, p = ids.shape
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([mask, torch.ones(b, STEPS, dtype=mask.dtype)], 1)
        images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        cache = MllamaCache.allocate(model.config, b, p + STEPS, "cpu", torch.float32)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, **images)
            logits, chosen = [out.logits[:, -1]], []
            for step in range(STEPS):
                token = out.logits[:, -1].argmax(-1) if tokens is None else tokens[step]
                chosen.append(token)
                out = model(input_ids=token[:, None], attention_mask=full_mask[:, :p + 1 + step],
                            position_ids=positions[:, -1:] + 1 + step, cache=cache,
                            cross_attention_mask=inputs["cross_attention_mask"][:, -1:])
                logits.append(out.logits[:, -1])
    finally:
        model.model.drop_padding_tiles = True
    return torch.stack(logits, 1), cache, chosen


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_equal_without_dropping(model, case):
    ids, ratios, seen = CASES[case]
    inputs = make_inputs(ids, ratios, 28)
    full, full_cache, tokens = run(model, inputs, drop=False)
    dropped, cache, _ = run(model, inputs, drop=True, tokens=tokens)
    torch.testing.assert_close(dropped, full, rtol=1e-5, atol=1e-5)
    patches = model.config.vision_config.num_patches
    n, t = inputs["pixel_values"].shape[1:3]
    assert full_cache.cross_tiles is None and full_cache.cross_length() == n * t * patches
    assert cache.cross_tiles.tolist() == seen and cache.cross_length() == len(seen) * patches
    assert all(k.shape[2] == len(seen) * patches for k in cache.cross_key.values())
    # the whole-sequence forward without a cache drops the same tiles and gives the prefill's logits
    with torch.no_grad():
        whole = model(**inputs).logits[:, -1]
    torch.testing.assert_close(whole, full[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_generate_tokens_equal_without_dropping(model, case, fast):
    ids, ratios, seen = CASES[case]
    inputs = make_inputs(ids, ratios, 28)
    model.model.drop_padding_tiles = False
    try:
        expected = model.generate(**inputs, max_new_tokens=16, fast=False, eos_token_id=None)
    finally:
        model.model.drop_padding_tiles = True
    engine_state(model).pop("decoders", None)
    got = model.generate(**inputs, max_new_tokens=16, fast=fast, eos_token_id=None)
    assert torch.equal(got, expected)
    if fast:  # the decoder's cross buffers hold the kept tiles' tokens only
        (decoder,) = engine_state(model)["decoders"].values()
        assert decoder.vision_tokens == len(seen) * model.config.vision_config.num_patches


def test_dropping_a_seen_tile_changes_the_logits(model):
    """The comparisons above can fail: leaving out a tile that some row sees moves the logits."""
    ids, ratios, seen = CASES["one_image_each"]
    inputs = make_inputs(ids, ratios, 28)
    images = [inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]
    inner = model.model
    with torch.no_grad():
        reference = model(**inputs).logits
        for keep in (seen, seen[:-1]):  # all seen tiles: the same logits; tile 2 (sample 1's) left out: not
            keep = torch.tensor(keep)
            hidden = inner.language_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          cross_attention_states=inner.encode_images(*images, keep),
                                          cross_attention_mask=inputs["cross_attention_mask"], cross_tiles=keep)
            logits = model.lm_head(hidden.last_hidden_state)
            if len(keep) == len(seen):
                torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            else:
                assert (logits[1] - reference[1]).abs().max() > 1e-3
                torch.testing.assert_close(logits[0], reference[0], rtol=1e-5, atol=1e-5)  # sample 0 never saw it


def test_transformers_mode_drops_nothing(model):
    ids, ratios, seen = CASES["one_image_each"]
    inputs = make_inputs(ids, ratios, 28)
    patches = model.config.vision_config.num_patches
    model.config.compat = "transformers"
    try:
        assert model.model.kept_tiles(inputs["cross_attention_mask"], inputs["pixel_values"]) is None
        logits, cache, tokens = run(model, inputs, drop=True)
        unchanged, _, _ = run(model, inputs, drop=False, tokens=tokens)
        assert cache.cross_tiles is None and cache.cross_length() == 4 * patches
        assert torch.equal(logits, unchanged)
        engine_state(model).pop("decoders", None)
        model.generate(**inputs, max_new_tokens=3, fast=True)
        assert next(iter(engine_state(model)["decoders"].values())).vision_tokens == 4 * patches
        # why: rows that see no image attend to every key there, so dropping would change their output
        keep = torch.tensor(seen)
        images = [inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]
        with torch.no_grad():
            hidden = model.model.language_model(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"],
                                                cross_attention_states=model.model.encode_images(*images, keep),
                                                cross_attention_mask=inputs["cross_attention_mask"], cross_tiles=keep)
            forced = model.lm_head(hidden.last_hidden_state)
        assert (forced[1, :3] - model(**inputs).logits[1, :3]).abs().max() > 1e-4  # the rows before the image
    finally:
        model.config.compat = "meta"


def test_nothing_dropped_without_a_mask_or_without_padding(model):
    ids, ratios, _ = CASES["one_image_each"]
    inputs = make_inputs(ids, ratios, 28)
    patches = model.config.vision_config.num_patches
    del inputs["cross_attention_mask"]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.cache.cross_tiles is None and out.cache.cross_length() == 4 * patches
    # every tile seen by some row: nothing to drop
    inputs = make_inputs([[BOS, IMAGE, 5, 6], [BOS, IMAGE, 7, 8]], [[6], [1]], 28)
    assert model.model.kept_tiles(inputs["cross_attention_mask"], inputs["pixel_values"]) is None
