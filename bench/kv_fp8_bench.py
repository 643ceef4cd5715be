"""FP8 K/V pages against bf16 pages in the decode attention kernel (engine.paged_attention), 11B shapes (32 query
heads, 8 kv heads, head dim 128), each replayed in a CUDA graph, beside the time the pages' bytes take at the copy
rate measured in the same run; and the decode step's page write (write_pages) for one self-attention layer.

    PYTHONPATH=src python bench/kv_fp8_bench.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_bench import graph_time  # noqa: E402
from gpu_bench import hardware  # noqa: E402

from mllama.engine.paged_attention import paged_decode_attention, write_pages  # noqa: E402
from mllama.quantization import quantize_rows  # noqa: E402

DEV = "cuda"


def case(batch: int, page: int, pages_per_row: int, length: int):
    pool = batch * pages_per_row + 1
    k = torch.randn(pool, 8, page, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = (torch.arange(batch * pages_per_row, device=DEV, dtype=torch.int32) + 1).view(batch, pages_per_row)
    lengths = torch.full((batch,), length, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
    return q, k, v, table, lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    copy = hardware()["copy_bytes_per_s"]
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bytes_per_s": copy}
    shapes = {"self b64 len 600": (64, 64, 10, 600), "self b1 len 4000": (1, 64, 63, 4000),
              "cross b64 4 tiles": (64, 1601, 4, 4 * 1601), "cross b1 4 tiles": (1, 1601, 4, 4 * 1601)}
    for name, shape in shapes.items():
        q, k, v, table, lengths = case(*shape)
        (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
        ks, vs = ks[..., 0].contiguous(), vs[..., 0].contiguous()
        tokens = shape[0] * shape[3]
        row = {"bf16_us": graph_time(lambda: paged_decode_attention(q, k, v, table, lengths)) * 1e6,
               "fp8_us": graph_time(lambda: paged_decode_attention(q, kq, vq, table, lengths, k_scales=ks,
                                                                   v_scales=vs)) * 1e6,
               "bf16_read_us": tokens * 2 * 8 * 128 * 2 / copy * 1e6,
               "fp8_read_us": tokens * 2 * 8 * (128 + 4) / copy * 1e6}
        res[name] = row
        print(name, {k: round(x, 1) for k, x in row.items()}, flush=True)
        del k, v, kq, vq
    q, k, v, table, lengths = case(64, 64, 10, 600)
    (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
    ks, vs = ks[..., 0].contiguous(), vs[..., 0].contiguous()
    new_k, new_v = torch.randn(64, 8, 128, device=DEV, dtype=torch.bfloat16), torch.randn(64, 8, 128, device=DEV,
                                                                                        dtype=torch.bfloat16)
    positions = lengths.long() - 1
    res["write b64"] = {"bf16_us": graph_time(lambda: write_pages(k, v, table, positions, new_k, new_v)) * 1e6,
                        "fp8_us": graph_time(lambda: write_pages(kq, vq, table, positions, new_k, new_v, ks, vs)) * 1e6}
    print("write b64", res["write b64"], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "kv-fp8-bench.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
