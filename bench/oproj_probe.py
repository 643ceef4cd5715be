"""Why the self-attention output projection (4096x4096, batch 1) reads its weight at ~2.1 TB/s in the decode
graph while other products of the step reach ~4 TB/s: the same product timed on inputs of different provenance
and layout, with the cuBLAS and cuBLASLt back ends, eager and inside the compiled layer function.

    PYTHONPATH=src python bench/oproj_probe.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
from mllama.engine.fast import self_output  # noqa: E402


def graph_time(fn, calls: int = 40, replays: int = 20) -> float:
    """Microseconds per call of fn, `calls` calls captured in one CUDA graph (as in the decode step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, device=dev, dtype=dt) * 0.01
    w13 = torch.randn(28672, 4096, device=dev, dtype=dt) * 0.01
    w2 = torch.randn(4096, 14336, device=dev, dtype=dt) * 0.01
    norm = torch.ones(4096, device=dev, dtype=dt)
    x = torch.randn(1, 1, 4096, device=dev, dtype=dt)
    h = torch.randn(1, 1, 14336, device=dev, dtype=dt)
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=dt)
    k = torch.randn(1, 8, 256, 128, device=dev, dtype=dt)
    v = torch.randn(1, 8, 256, 128, device=dev, dtype=dt)
    bias = torch.zeros(1, 1, 1, 256, device=dev, dtype=dt)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    view = out.transpose(1, 2).reshape(1, 1, -1)
    results = {"sdpa_out_stride": list(out.stride()), "view_stride": list(view.stride()),
               "view_is_contiguous": view.is_contiguous(), "weight_MB": w.numel() * 2 / 1e6}
    compiled = torch.compile(self_output, dynamic=False, fullgraph=True)
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        r = {}
        r["linear_contiguous_x_us"] = graph_time(lambda: F.linear(x, w))
        r["linear_sdpa_view_us"] = graph_time(lambda: F.linear(view, w))
        r["linear_sdpa_view_contiguous_us"] = graph_time(lambda: F.linear(view.contiguous(), w))
        r["linear_2d_us"] = graph_time(lambda: F.linear(x.view(1, 4096), w))
        r["mm_x_wT_us"] = graph_time(lambda: torch.mm(x.view(1, 4096), w.t()))
        r["w13_us"] = graph_time(lambda: F.linear(x, w13))
        r["w2_us"] = graph_time(lambda: F.linear(h, w2))
        torch._dynamo.reset()
        compiled = torch.compile(self_output, dynamic=False, fullgraph=True)
        r["compiled_self_output_us"] = graph_time(lambda: compiled(x, out, w, norm, w13, w2, 1e-5), calls=10)
        results[library] = r
        print(library, json.dumps(r), flush=True)
    for library in ("cublas",):
        torch.backends.cuda.preferred_blas_library(library)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                compiled(x, out, w, norm, w13, w2, 1e-5)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        results["compiled_profile"] = table
        print(table, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "oproj-probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
