"""Kernel-level choices on the GPU: vision-encoder attention variants and where a decode step's time goes.

    PYTHONPATH=src python bench/gpu_kernels.py [--out DIR]

1. Attention of the vision encoder (16 heads x 80 dims, 6432 tokens of a 4-tile image, valid-first order):
   every SDPA backend, unpadded and with the head dim zero-padded to 96 / 128 (same function: zero columns add
   nothing to q.k, and the extra output columns of v are dropped), timed and checked against the fp32 result.
2. The whole encoder with the current default.
3. A decode step (batch 1 with an image, the fast path's compiled layer functions, no graph) under the profiler:
   GPU time per kernel kind, against the weight bytes that step must read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV = "cuda"
sys.path.insert(0, str(Path(__file__).parent))


def bench(fn, warmup=3, repeat=20) -> float:
    """Median milliseconds (gpu_bench's CUDA-event timer)."""
    from gpu_bench import cuda_time

    return cuda_time(fn, warmup, repeat) * 1e3


def padded_sdpa(q, k, v, dim, backend):
    hd = q.shape[-1]
    scale = 1 / math.sqrt(hd)
    if dim != hd:
        q, k, v = (F.pad(t, (0, dim - hd)) for t in (q, k, v))
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[..., :hd]


def attention_variants() -> dict:
    torch.manual_seed(0)
    b, h, s, hd, valid = 1, 16, 6432, 80, 6404
    q, k, v = (torch.randn(b, h, s, hd, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q[:, :, :valid].float(), k.float(), v.float())
    flops = 4 * b * h * valid * s * hd
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for dim in (80, 96, 128):
            name = f"{backend.name.lower()} hd{dim}"
            try:
                out = padded_sdpa(q[:, :, :valid], k, v, dim, backend)
                err = float((out.float() - ref).abs().max())
                ms = bench(lambda: padded_sdpa(q[:, :, :valid], k, v, dim, backend))
                results[name] = {"ms": ms, "tflops_useful": flops / ms / 1e9, "max_err": err}
            except Exception as e:  # a backend that does not take this shape
                results[name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            print(name, results[name], flush=True)
    # the layout the encoder produces: q/k/v as transposed views of a [B, S, H*hd] projection
    x = torch.randn(b, s, 3 * h * hd, device=DEV, dtype=torch.bfloat16)

    def from_proj():
        qq, kk, vv = x.view(b, s, 3, h, hd).unbind(2)
        return F.scaled_dot_product_attention(qq.transpose(1, 2)[:, :, :valid], kk.transpose(1, 2),
                                              vv.transpose(1, 2))
    results["default from projection views"] = {"ms": bench(from_proj)}
    print("default from projection views", results["default from projection views"], flush=True)
    return results


def encoder(model_config) -> dict:
    from mllama import MllamaVisionModel
    torch.manual_seed(0)
    with torch.device(DEV):
        torch.set_default_dtype(torch.bfloat16)
        vm = MllamaVisionModel(model_config.vision_config)
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for n, p in vm.named_parameters():
            p.normal_(0, 0.02) if "norm" not in n and "gate" not in n else p.fill_(0.5 if "gate" in n else 1.0)
    for m in vm.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(DEV)
    vm.eval()
    pv = torch.randn(1, 1, 4, 3, 560, 560, device=DEV, dtype=torch.bfloat16)
    ids = torch.full((1, 1), 6, device=DEV)
    mask = torch.ones(1, 1, 4, dtype=torch.long, device=DEV)
    res = {}
    with torch.no_grad():
        res["encoder_ms"] = bench(lambda: vm(pv, ids, mask), 2, 10)
        res["encoder_mask_form_ms"] = bench(lambda: vm(pv, ids, mask, exact_reorder=False), 2, 5)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vm(pv, ids, mask)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, flush=True)
    res["profile"] = table
    return res


def decode_profile(config) -> dict:
    from gpu_bench import build_ours, make_inputs
    from mllama.engine.fast import FastDecoder
    from torch.profiler import ProfilerActivity, profile

    model = build_ours(config)
    inputs = make_inputs(config, 1, True)
    vt = 4 * config.vision_config.num_patches
    res = {}
    for batch in (1, 32):
        dec = FastDecoder(model, batch, 256, vt, use_graph=False, compile=True)
        tokens = torch.ones(batch, dtype=torch.long, device=DEV)
        pos = torch.full((batch,), 50, device=DEV)
        with torch.no_grad():
            for _ in range(3):
                dec(tokens, pos, 50)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    dec(tokens, pos, 50)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        print(f"decode batch {batch} (5 steps)\n", table, flush=True)
        res[f"decode_b{batch}_profile"] = table
        graph_dec = FastDecoder(model, batch, 256, vt)
        with torch.no_grad():
            res[f"decode_b{batch}_graph_ms"] = bench(lambda: graph_dec(tokens, pos, 50), 3, 30)
        print(f"decode batch {batch} graph step ms", res[f"decode_b{batch}_graph_ms"], flush=True)
        del dec, graph_dec
    del inputs
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    from mllama import MllamaConfig
    config = MllamaConfig.llama_3_2_11b()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    out["attention"] = attention_variants()
    out["encoder"] = encoder(config)
    print("encoder ms", out["encoder"]["encoder_ms"], "mask form", out["encoder"]["encoder_mask_form_ms"], flush=True)
    if not args.skip_decode:
        out["decode"] = decode_profile(config)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu-kernels.json").write_text(json.dumps(out, indent=1))
    for name, r in out["attention"].items():
        print(f"{name:40s} {r}")


if __name__ == "__main__":
    main()
