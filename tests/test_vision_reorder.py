"""The vision encoder's default path (valid-first token order, unmasked SDPA calls) computes the same function as
the additive-mask form it replaces, for every mix of tile counts, in both compat modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from mllama import MllamaVisionConfig
from mllama.modeling import vision as vision_module
from mllama.modeling.vision import MllamaVisionModel, vision_attention_mask, vision_token_order

TOL = 1e-5
# The default supported aspect ratios (1-based ids; id 0 = padding image): (tiles high, tiles wide).
ASPECT_RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_vision(**overrides) -> MllamaVisionModel:
    kwargs = dict(image_size=28, patch_size=14, hidden_size=32, attention_heads=4, intermediate_size=64,
                  num_hidden_layers=4, num_global_layers=2, intermediate_layers_indices=[0, 2, 3],
                  vision_output_dim=128)
    kwargs.update(overrides)
    return randomize(MllamaVisionModel(MllamaVisionConfig(**kwargs)).eval(), seed=3)


def real_tile_vision() -> MllamaVisionModel:
    # 560-px tiles: 1601 tokens + 7 padding = 1608 per tile, so the padding and the tile boundaries are the real ones.
    return tiny_vision(image_size=560, hidden_size=16, attention_heads=2, intermediate_size=32, num_hidden_layers=2,
                       num_global_layers=1, intermediate_layers_indices=[0, 1], vision_output_dim=16 * 3)


def make_inputs(ratio_ids: list[list[int]], image_size: int, seed: int = 0):
    """Images of the given aspect-ratio ids (0 = padding image, mask [1, 0, 0, 0]); padding tiles' pixels are 0."""
    gen = torch.Generator().manual_seed(seed)
    b, n = len(ratio_ids), len(ratio_ids[0])
    pixels = torch.zeros(b, n, 4, 3, image_size, image_size)
    mask = torch.zeros(b, n, 4, dtype=torch.long)
    for i, row in enumerate(ratio_ids):
        for j, rid in enumerate(row):
            tiles = 1 if rid == 0 else ASPECT_RATIOS[rid - 1][0] * ASPECT_RATIOS[rid - 1][1]
            mask[i, j, :tiles] = 1
            if rid:
                pixels[i, j, :tiles] = torch.randn(tiles, 3, image_size, image_size, generator=gen)
    return pixels, torch.tensor(ratio_ids), mask


def both_paths(model: MllamaVisionModel, inputs, compat: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.config.compat = compat
    with torch.no_grad():
        fast = model(*inputs).last_hidden_state                       # the default: reordered
        masked = model(*inputs, exact_reorder=False).last_hidden_state
    return fast, masked


# Mixed batches: 1-, 2-, 3- and 4-tile images side by side (so rows have different valid counts), a padding
# image (id 0), and a batch where every row has the same count (the single-group fast case).
BATCHES = {
    "mixed": [[1, 2], [3, 6], [4, 0], [5, 7], [8, 1]],
    "uniform": [[6, 4], [2, 2]],
    "single": [[0]],
}


@pytest.mark.parametrize("compat", ["meta", "transformers"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_reordered_equals_mask_tiny(compat, batch):
    model = tiny_vision()
    assert model.exact_reorder            # the reordered form is the default
    inputs = make_inputs(BATCHES[batch], 28)
    fast, masked = both_paths(model, inputs, compat)
    vc = model.config
    assert fast.shape == masked.shape == (len(BATCHES[batch]), len(BATCHES[batch][0]), 4, vc.num_patches,
                                          vc.vision_output_dim)
    assert rel_diff(fast, masked) <= TOL
    # the module attribute switches the default path too
    model.exact_reorder = False
    with torch.no_grad():
        assert torch.equal(model(*inputs).last_hidden_state, masked)


@pytest.mark.parametrize("compat", ["meta", "transformers"])
def test_reordered_equals_mask_real_tile_geometry(compat):
    model = real_tile_vision()
    assert model.num_patches == 1601 and model.num_pad == 7
    inputs = make_inputs([[1, 3], [6, 0], [2, 8]], 560)
    fast, masked = both_paths(model, inputs, compat)
    assert fast.shape == (3, 2, 4, 1601, 48)
    assert rel_diff(fast, masked) <= TOL


def test_intermediate_features_stay_in_token_order():
    """The kept layers' features (the last 3*32 channels) and the final ones must each match, token for token."""
    model = tiny_vision()
    inputs = make_inputs(BATCHES["mixed"], 28)
    fast, masked = both_paths(model, inputs, "meta")
    assert rel_diff(fast[..., :32], masked[..., :32]) <= TOL
    assert rel_diff(fast[..., 32:], masked[..., 32:]) <= TOL


def test_token_order_is_a_valid_first_permutation():
    tile_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    order, inverse, groups = vision_token_order(tile_mask, num_tokens=5, num_pad=3)
    # written from the rule: tiles of 5 real tokens + 3 padding, a tile beyond the image's tiles is all padding
    valid = torch.tensor([[bool(m) and i < 5 for m in row for i in range(8)] for row in tile_mask.tolist()])
    # and the mask form agrees: exactly the valid queries are never blocked
    blocked = vision_attention_mask(tile_mask, 5, 3, torch.float32)[:, 0] != 0
    assert torch.equal(~blocked.any(-1), valid)
    for r in range(3):
        count = int(valid[r].sum())
        assert valid[r][order[r]][:count].all() and not valid[r][order[r]][count:].any()
        assert torch.equal(order[r][inverse[r]], torch.arange(32))
    assert [c for c, _ in groups] == [5, 15, 20]


def test_wrong_variants_differ():
    """The check has teeth: plain unmasked attention for every query (padding queries then also see padding keys),
    or forgetting to undo the order, each moves the output well past the tolerance."""
    model = tiny_vision()
    inputs = make_inputs(BATCHES["mixed"], 28)
    fast, masked = both_paths(model, inputs, "meta")
    assert rel_diff(fast, masked) <= TOL

    def unmasked_everywhere(q, k, v, count):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    original = vision_module._valid_first_attention
    try:
        vision_module._valid_first_attention = unmasked_everywhere
        with torch.no_grad():
            wrong = model(*inputs).last_hidden_state
    finally:
        vision_module._valid_first_attention = original
    assert rel_diff(wrong, masked) > 1e-4
    # the mask form with no mask at all is the same wrong function
    original_mask = vision_module.vision_attention_mask
    try:
        vision_module.vision_attention_mask = lambda *a, **k: None
        with torch.no_grad():
            no_mask = model(*inputs, exact_reorder=False).last_hidden_state
    finally:
        vision_module.vision_attention_mask = original_mask
    assert rel_diff(no_mask, masked) > 1e-4
    assert rel_diff(no_mask, wrong) <= TOL                  # both are "every query sees every key"

    # forgetting the inverse permutation scrambles the tokens
    original_order = vision_module.vision_token_order

    def no_inverse(*args):
        order, inverse, groups = original_order(*args)
        return order, order, groups
    try:
        vision_module.vision_token_order = no_inverse
        with torch.no_grad():
            scrambled = model(*inputs).last_hidden_state
    finally:
        vision_module.vision_token_order = original_order
    assert rel_diff(scrambled, masked) > 1e-4


def test_all_padding_row_matches_mask_form():
    """An (invalid) all-zero tile mask blocks every pair; the mask form then averages all values uniformly."""
    model = tiny_vision()
    pixels, ids, mask = make_inputs([[1, 2]], 28)
    mask[0, 1] = 0
    fast, masked = both_paths(model, (pixels, ids, mask), "meta")
    assert torch.isfinite(fast).all()
    assert rel_diff(fast, masked) <= TOL


@pytest.mark.parametrize("batch", list(BATCHES))
def test_vision_graphs_runner_computes_the_encoder(batch):
    """engine.fast.VisionGraphs splits the encoder into host planning + replayable device work; run eagerly here
    (the capture itself needs CUDA: bench/gpu_bench.py checks it), it must give the encoder's output exactly,
    and follow the module's choice of the mask form."""
    from mllama.engine.fast import VisionGraphs

    model = tiny_vision()
    inputs = make_inputs(BATCHES[batch], 28)
    runner = VisionGraphs(model, use_graphs=False)
    with torch.no_grad():
        want = model(*inputs).last_hidden_state
        got = runner(*inputs).last_hidden_state
        assert torch.equal(got, want)
        model.exact_reorder = False
        assert torch.equal(runner(*inputs).last_hidden_state, model(*inputs).last_hidden_state)
