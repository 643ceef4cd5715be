"""On CUDA: FP8 K/V pages (kv_cache_dtype="fp8"). The Triton kernel over e4m3 pages and their scales against the
reference over the dequantized pages at the 11B model's shapes, also written and replayed in a CUDA graph; the
serving engine's decode with FP8 pages against its bf16 pages on the tiny checkpoint (logit error and greedy
agreement over 64 teacher-forced steps, printed)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from mllama.engine import paged_attention as pa  # noqa: E402
from mllama.quantization import quantize_rows  # noqa: E402
from test_paged_attention_gpu import DEV, DIM, KV_HEADS, paged_case, random_lengths  # noqa: E402


def _fp8(case):
    q, k_pages, v_pages, table, lengths = case
    (kq, ks), (vq, vs) = quantize_rows(k_pages), quantize_rows(v_pages)
    return q, kq, vq, table, lengths, ks[..., 0].contiguous(), vs[..., 0].contiguous()


@pytest.mark.parametrize("page,max_pages,batch", [(64, 64, 1), (64, 64, 64), (1601, 4, 1), (1601, 4, 32)])
def test_fp8_pages_kernel_equals_the_reference(page, max_pages, batch):
    case = paged_case(random_lengths(batch, page, max_pages, seed=batch), page, max_pages, seed=page)
    q, kq, vq, table, lengths, ks, vs = _fp8(case)
    got = pa.paged_decode_attention(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs)
    want = pa.paged_decode_attention_reference(q, kq, vq, table, lengths, ks, vs)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    assert (got.float() - want.float()).abs().max().item() < 2e-2
    full = pa.paged_decode_attention_reference(*case)  # the bf16 pages FP8 replaced: its own error, printed
    print(f"page {page}, batch {batch}: FP8 pages vs bf16 pages {(want.float() - full.float()).abs().max():.3f}")


def test_fp8_pages_written_and_read_in_a_cuda_graph():
    page, max_pages = 64, 16
    q, kq, vq, table, lengths, ks, vs = _fp8(paged_case([page * max_pages] * 3, page, max_pages, seed=2))
    positions = torch.zeros(3, dtype=torch.long, device=DEV)
    k_new = torch.randn(3, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    out = torch.empty_like(q)

    def step():
        pa.write_pages(kq, vq, table, positions, k_new, v_new, ks, vs)
        pa.paged_decode_attention(q, kq, vq, table, lengths, out=out, k_scales=ks, v_scales=vs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new in ([5, 1000, 64], [1, 64, 777]):
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        positions.copy_(lengths - 1)
        k_new.copy_(torch.randn_like(k_new) * 9)
        graph.replay()
        torch.cuda.synchronize()
        rows = torch.arange(3, device=DEV)
        pages, slots = table[rows, positions // page].long(), positions % page
        back = kq[pages, :, slots].float() * ks[pages, :, slots][..., None]
        assert ((back - k_new.float()).abs().amax(-1) <= k_new.float().abs().amax(-1) / 16 + 1e-3).all()
        want = pa.paged_decode_attention_reference(q, kq, vq, table, lengths, ks, vs)
        assert (out.float() - want.float()).abs().max().item() < 2e-2, new


def test_engine_decode_with_fp8_pages_against_bf16_pages(tiny_checkpoint):
    import PIL.Image

    from mllama import MllamaForConditionalGeneration
    from mllama.engine.batch import BatchEngine
    from mllama.engine.requests import GenerationRequest
    from mllama.generation import SamplingParams
    from mllama.processing.processor import AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16,
                                                           device_map=DEV)
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint))
    inputs = processor(images=[[PIL.Image.new("RGB", (60, 40), (200, 40, 90))]],
                       text=["<|image|>Describe the picture in detail:"], return_tensors="pt")
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    runs = []
    for dtype in ("auto", "fp8"):
        engine = BatchEngine(model, processor.tokenizer, max_batch=4, max_model_len=256, pages=(16, 8),
                             kv_cache_dtype=dtype)
        request = GenerationRequest(prompt_ids=ids, params=SamplingParams(max_new_tokens=64, do_sample=False),
                                    model_inputs={k: v.to(DEV) if hasattr(v, "to") else v for k, v in inputs.items()},
                                    emit=lambda event: None)
        request.images = engine.describe_images(request.model_inputs)
        assert engine._reserve(request)
        seen = []
        engine._sample_and_emit = lambda requests, logits: seen.append(logits.float().clone())
        engine._prefill([(request, 0)])
        runs.append((engine, seen[0][0]))
    (full, first_a), (fp8, first_b) = runs
    torch.testing.assert_close(first_b, first_a)  # the prefill attends over its own K/V
    token, errors, agree = int(first_a.argmax()), [], 0
    for step in range(64):  # teacher-forced by the bf16 pages' greedy tokens
        a, b = (engine.runner([token], [len(ids) + step], True)[0].float() for engine in (full, fp8))
        errors.append(((b - a).abs().max() / a.abs().max()).item())
        agree += int(a.argmax() == b.argmax())
        token = int(a.argmax())
    print(f"FP8 pages vs bf16 pages over 64 steps: logit error mean {sum(errors) / 64:.4f}, max {max(errors):.4f}, "
          f"greedy agreement {agree / 64:.2f}")
    assert max(errors) < 0.1 and agree / 64 >= 0.75
