"""kv_cache_dtype="fp8": K/V pages in e4m3 with a float32 scale per token and kv head.

The attention over FP8 pages equals the attention over their dequantized values (an independent fp64 softmax over
the pages concatenated), and not the one that forgets the scales; write_pages stores quantize_rows' values and
scales where the reference reads them; the engine's prefill stores its K/V so that they read back within e4m3's
error, its decode step's logits stay within the measured bound of the bf16 cache's, and the page sizes (hence
the pools' capacity) halve, scales included."""
from __future__ import annotations

import pytest
import torch

from mllama.engine.paged_attention import paged_decode_attention, paged_decode_attention_reference, write_pages
from mllama.quantization import FP8, quantize_rows
from test_paged_attention import LENGTHS, independent, make_case


def _quantized_case(page: int, group: int, seed: int = 0):
    q, k_pages, v_pages, table, lengths = make_case(page, group, LENGTHS[page], seed=seed)
    k_pages = k_pages * torch.linspace(0.05, 30, k_pages.shape[2])[None, None, :, None]  # tokens of many sizes
    (kq, ks), (vq, vs) = quantize_rows(k_pages), quantize_rows(v_pages)
    return q, (kq, ks[..., 0]), (vq, vs[..., 0]), table, lengths


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page", [16, 1601])
def test_fp8_pages_attend_as_their_dequantized_values(page, group):
    q, (kq, ks), (vq, vs), table, lengths = _quantized_case(page, group)
    got = paged_decode_attention_reference(q, kq, vq, table, lengths, ks, vs)
    assert not got.isnan().any()
    want = independent(q, kq.float() * ks[..., None], vq.float() * vs[..., None], table, lengths)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    unscaled = independent(q, kq.float(), vq.float(), table, lengths)
    assert (got.double() - unscaled).abs().max() > 0.1  # the scales matter
    torch.testing.assert_close(paged_decode_attention(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs), got)


def test_fp8_error_against_full_precision_pages():
    q, k_pages, v_pages, table, lengths = make_case(16, 4, LENGTHS[16], seed=3)
    (kq, ks), (vq, vs) = quantize_rows(k_pages), quantize_rows(v_pages)
    exact = paged_decode_attention_reference(q, k_pages, v_pages, table, lengths)
    fp8 = paged_decode_attention_reference(q, kq, vq, table, lengths, ks[..., 0], vs[..., 0])
    error = ((fp8 - exact).abs().max() / exact.abs().max()).item()
    print(f"FP8 pages against fp32 pages: max error {error:.3f} of the output's largest value")
    assert 1e-4 < error < 0.08  # e4m3 keeps 3 mantissa bits: ~2^-4 per value, averaged down by the softmax


def test_scales_are_checked():
    q, (kq, ks), (vq, vs), table, lengths = _quantized_case(16, 1)
    with pytest.raises(ValueError, match="FP8 pages need float32 k/v_scales"):
        paged_decode_attention_reference(q, kq, vq, table, lengths)
    with pytest.raises(ValueError, match="FP8 pages need float32 k/v_scales"):
        paged_decode_attention_reference(q, kq, vq, table, lengths, ks[:, :, :3], vs)
    with pytest.raises(ValueError, match="scales are for FP8 pages only"):
        paged_decode_attention_reference(q, kq.float(), vq.float(), table, lengths, ks, vs)


def test_write_pages_stores_quantized_tokens_and_their_scales():
    pages, kv, page, dim = 5, 2, 4, 16
    k_pool, v_pool = torch.zeros(pages, kv, page, dim, dtype=FP8), torch.zeros(pages, kv, page, dim, dtype=FP8)
    k_scales, v_scales = torch.zeros(pages, kv, page), torch.zeros(pages, kv, page)
    table = torch.tensor([[3, 1], [2, 4]], dtype=torch.int32)
    positions = torch.tensor([5, 2])  # row 0: page table[0, 1] = 1, slot 1; row 1: page 2, slot 2
    k = torch.randn(2, kv, dim) * torch.tensor([[3.0], [0.01]])[:, :, None]
    v = torch.randn(2, kv, dim)
    write_pages(k_pool, v_pool, table, positions, k, v, k_scales, v_scales)
    for row, (p, slot) in enumerate([(1, 1), (2, 2)]):
        for pool, scales, new in ((k_pool, k_scales, k), (v_pool, v_scales, v)):
            values, scale = quantize_rows(new[row])
            assert torch.equal(pool[p, :, slot].view(torch.uint8), values.view(torch.uint8))
            assert torch.equal(scales[p, :, slot], scale[:, 0])
            back = pool[p, :, slot].float() * scales[p, :, slot][:, None]
            assert ((back - new[row]).abs().amax(-1) <= new[row].abs().amax(-1) / 16).all()
    assert k_scales.count_nonzero() == 2 * kv  # nothing else written


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from mllama.modeling.mllama import MllamaForConditionalGeneration
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32,
                                                           device_map="cpu").eval()
    return model, AutoProcessor.from_pretrained(str(tiny_checkpoint))


def _prefilled(model, processor, kv_cache_dtype: str):
    """An engine with one image request prefilled into slot 0: (engine, request, prefill logits)."""
    import PIL.Image

    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams

    image = PIL.Image.new("RGB", (50, 20), (20, 130, 90))
    inputs = processor(images=[[image]], text=["<|image|>What is it? It is a picture of"], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    engine = BatchEngine(model, processor.tokenizer, max_batch=2, max_model_len=128, kv_cache_dtype=kv_cache_dtype)
    request = GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=4, do_sample=False),
                                model_inputs=dict(inputs), emit=lambda event: None)
    request.images = engine.describe_images(request.model_inputs)
    assert engine._reserve(request)
    seen = []
    engine._sample_and_emit = lambda requests, logits: seen.append(logits.clone())
    engine._prefill([(request, 0)])
    return engine, request, seen[0]


def test_the_engine_stores_and_decodes_through_fp8_pages(loaded):
    model, processor = loaded
    (full, request_a, logits_a), (fp8, request_b, logits_b) = (_prefilled(*loaded, dtype) for dtype in ("auto", "fp8"))
    caches = fp8.caches
    assert all(pool.dtype == FP8 for pool in [*caches.k.values(), *caches.ck.values()])
    assert caches.ks and caches.cks and all(s.dtype == torch.float32 for s in caches.ks.values())
    torch.testing.assert_close(logits_b, logits_a)  # the prefill attends over its own K/V: FP8 changes nothing yet
    read = [(full.caches.prompt_keys(request_a.holding.self_pages, request_a.length),
             fp8.caches.prompt_keys(request_b.holding.self_pages, request_b.length))]
    tiles = [[page for _, e in r.holding.images for page in e.pages] for r in (request_a, request_b)]
    read.append((full.caches.gather_tiles(tiles[0])[0], fp8.caches.gather_tiles(tiles[1])[0]))
    for exact, stored in read:
        for layer in exact:
            a, b = exact[layer], stored[layer]
            assert b.dtype == a.dtype and b.shape == a.shape
            bound = a.abs().amax(-1, keepdim=True) / 16  # one e4m3 rounding of each token's head vector
            assert ((b - a).abs() <= bound + 1e-7).all() and not torch.equal(a, b), layer
    token, position = int(logits_a[0].argmax()), request_a.length
    steps = [engine.runner([token], [position], True)[0] for engine in (full, fp8)]
    error = ((steps[1] - steps[0]).abs().max() / steps[0].abs().max()).item()
    print(f"decode logits, FP8 K/V pages against fp32: {error:.4f} of the largest")
    assert 0 < error < 0.05


def test_fp8_pages_take_about_half_the_bytes(loaded):
    from mllama.engine.paged import page_bytes

    text = loaded[0].config.text_config
    full, fp8 = page_bytes(text, 1601, torch.bfloat16), page_bytes(text, 1601, torch.bfloat16, "fp8")
    per_value = (text.head_dim + 4) / (2 * text.head_dim)  # one byte per value and a 4-byte scale per head vector
    assert fp8 == tuple(round(b * per_value) for b in full)


def test_a_bad_kv_cache_dtype_is_refused_by_name(loaded):
    from mllama.engine.batch import BatchEngine

    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported"):
        BatchEngine(loaded[0], loaded[1].tokenizer, max_batch=1, max_model_len=64, kv_cache_dtype="int8")
