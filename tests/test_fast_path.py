"""The fast decode path (engine.fast) computes the same tokens as the plain model; on CPU it runs without graphs."""
import pytest
import torch

from conftest import randomize, tiny_config
from test_generation import GEN_CASES
from test_parity import make_inputs
from mllama import MllamaForCausalLM, MllamaForConditionalGeneration
from mllama.engine.decode import fuse_projections
from mllama.engine.fast import engine_state


@pytest.fixture(scope="module")
def model():
    return randomize(MllamaForConditionalGeneration.from_config(tiny_config()), seed=21, std=0.15).eval()


@pytest.mark.parametrize("case", list(GEN_CASES))
@pytest.mark.parametrize("mode", ["meta", "transformers"])
def test_fast_greedy_tokens_equal_plain(model, case, mode):
    model.config.compat = mode
    try:
        inputs = make_inputs(*GEN_CASES[case], 28)
        plain = model.generate(**inputs, max_new_tokens=24, fast=False, eos_token_id=None)
        fast = model.generate(**inputs, max_new_tokens=24, fast=True, eos_token_id=None)
    finally:
        model.config.compat = "meta"
    assert torch.equal(plain, fast)


def test_fast_logits_match_plain_logits(model):
    from mllama.engine.fast import FastDecoder
    from mllama.modeling.cache import MllamaCache

    inputs = make_inputs(*GEN_CASES["left_padded_batch"], 28)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, p = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([mask, torch.ones(b, 4, dtype=mask.dtype)], 1)
    extra = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")}
    # the prefill keeps the tiles some row sees (6 of 8 here): the decoder holds their tokens only
    keep = model.model.kept_tiles(inputs["cross_attention_mask"], inputs["pixel_values"])
    vision_tokens = len(keep) * model.config.vision_config.num_patches
    with torch.no_grad():
        plain_cache = MllamaCache.allocate(model.config, b, p + 4, "cpu", torch.float32)
        decoder = FastDecoder(model, b, p + 4, vision_tokens)
        for cache in (plain_cache, decoder.reset()):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, **extra)
        decoder.bind(full_mask, inputs["cross_attention_mask"][:, -1:])
        for step, token in enumerate([torch.tensor([7, 8, 9]), torch.tensor([3, 4, 5])]):
            pos = positions[:, -1:] + 1 + step
            plain = model(input_ids=token[:, None], attention_mask=full_mask[:, :p + 1 + step], position_ids=pos,
                          cache=plain_cache, cross_attention_mask=inputs["cross_attention_mask"][:, -1:]).logits[:, -1]
            fast = decoder(token, pos, p + step)
            assert torch.allclose(plain, fast, atol=1e-5, rtol=1e-5)


def test_decoders_are_reused_across_requests(model):
    inputs = make_inputs(*GEN_CASES["two_images"], 28)
    engine_state(model).pop("decoders", None)
    first = model.generate(**inputs, max_new_tokens=6, fast=True)
    decoders = dict(engine_state(model)["decoders"])
    second = model.generate(**inputs, max_new_tokens=6, fast=True)
    assert torch.equal(first, second) and engine_state(model)["decoders"].keys() == decoders.keys()
    assert all(engine_state(model)["decoders"][k] is decoders[k] for k in decoders)
    # another request shape between two equal ones does not disturb them
    model.generate(**make_inputs(*GEN_CASES["text_only"], 28), max_new_tokens=3, fast=True)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, fast=True), first)


def test_fused_weights_are_views_and_save_unfused(model, tmp_path):
    fuse_projections(model)
    layer = model.model.language_model.layers[0]
    assert layer.self_attn.q_proj.weight.data_ptr() == layer.self_attn.wqkv.data_ptr()
    before = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    again = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert sum(p.numel() for p in again.parameters()) == before
    assert torch.equal(again.model.language_model.layers[0].self_attn.k_proj.weight, layer.self_attn.k_proj.weight)


def test_fast_path_for_the_causal_lm(model):
    lm = MllamaForCausalLM(model.config.text_config).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    inputs = make_inputs(*GEN_CASES["text_only"], 28)
    assert torch.equal(lm.generate(**inputs, max_new_tokens=10, fast=True),
                       lm.generate(**inputs, max_new_tokens=10, fast=False))


def test_cache_bytes_of_the_11b_shapes():
    from mllama import MllamaConfig
    from mllama.engine.fast import cache_bytes

    config = MllamaConfig.llama_3_2_11b()
    # 32 self layers x 2 (k, v) x 8 kv heads x 128 x 2 bytes = 128 KiB per token; 8 cross layers per vision token
    assert cache_bytes(config, 1, 1, 0, torch.bfloat16) == 128 * 1024
    assert cache_bytes(config, 2, 0, 6404, torch.bfloat16) == 2 * 6404 * 8 * 2 * 8 * 128 * 2
