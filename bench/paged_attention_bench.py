"""Paged decode attention (the Triton kernel) against the engine's current way, torch SDPA over contiguous
[B, KVH, L, D] K/V with an additive mask over the batch's longest row, at the 11B model's shapes (H=32, KVH=8,
D=128, bf16), GPU only:

    PYTHONPATH=src python bench/paged_attention_bench.py --out results.json [--sweep]

Cases: batch 1, 8, 64, 128 for self-attention (pages of 64 tokens, lengths 544..656, about 600) and for
cross-attention (four image tiles of 1601 tokens: 6404). Each timing is the median over replays of one CUDA
graph that holds many calls; the calls cycle through enough copies of the K/V that the set is several times the
L2, so that the numbers are those of K/V read from memory, as in a real step. Bandwidth is the bytes of the
valid K/V tokens divided by the time (for SDPA also the padded bytes it reads), set against the copy
bandwidth measured in the same run (bytes read + written by a 2 GiB device copy). --sweep also times the
kernel's tuning knobs (block_n, num_warps, num_stages, splits) on a few cases.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mllama.engine import paged_attention as pa

DEV = "cuda"
HEADS, KV_HEADS, DIM = 32, 8, 128
L2_MULTIPLE_BYTES = 512 * 2 ** 20  # the K/V copies cycled through per graph: ~8x the H200's 60 MB L2


def graph_time_us(calls, reps: int = 15) -> float:
    """Median microseconds per call: `calls` (a list of thunks) captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting the bytes read and written."""
    src = torch.empty(2 ** 30, dtype=torch.bfloat16, device=DEV).normal_()
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 5, reps=10)
    return 2 * src.numel() * src.element_size() / us / 1e3


def case_lengths(batch: int, kind: str, seed: int = 0):
    """Lengths, pool size and page size for one case."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "self":
        page, lengths = 64, torch.randint(544, 657, (batch,), generator=gen)
    else:
        page, lengths = 1601, torch.full((batch,), 4 * 1601)
    return page, lengths.int()


def paged_inputs(batch, page, lengths, copies, gen):
    """One shuffled pool holding `copies` page sets; one page table per copy; q."""
    max_pages = -(-int(lengths.max()) // page)
    pool = copies * batch * max_pages
    k_pages = torch.randn(pool, KV_HEADS, page, DIM, device=DEV, dtype=torch.bfloat16, generator=gen)
    v_pages = torch.randn_like(k_pages)
    tables = torch.randperm(pool, device=DEV, generator=gen).int().view(copies, batch, max_pages)
    q = torch.randn(batch, HEADS, DIM, device=DEV, dtype=torch.bfloat16, generator=gen)
    return q, k_pages, v_pages, tables, lengths.to(DEV)


def contiguous_inputs(q, k_pages, v_pages, tables, lengths, copies):
    """The same K/V copied into contiguous [B, KVH, Lmax, D] buffers (one per copy), and the additive mask."""
    longest = int(lengths.max())
    ks, vs = [], []
    for i in range(copies):
        def gather(pool):
            rows = pool[tables[i].long()].permute(0, 2, 1, 3, 4)
            return rows.reshape(q.shape[0], KV_HEADS, -1, DIM)[:, :, :longest].contiguous()
        ks.append(gather(k_pages))
        vs.append(gather(v_pages))
    keep = torch.arange(longest, device=DEV)[None, :] < lengths[:, None]
    bias = torch.zeros(keep.shape, device=DEV, dtype=q.dtype).masked_fill(~keep, float("-inf"))[:, None, None]
    return ks, vs, bias


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=bias, enable_gqa=True)[:, :, 0]


def run_case(batch: int, kind: str, copy_gbs: float, seed: int = 0) -> dict:
    page, lengths = case_lengths(batch, kind, seed)
    longest = int(lengths.max())
    valid_bytes = 2 * int(lengths.sum()) * KV_HEADS * DIM * 2
    padded_bytes = 2 * batch * longest * KV_HEADS * DIM * 2
    copies = max(1, min(128, -(-L2_MULTIPLE_BYTES // valid_bytes)))
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k_pages, v_pages, tables, lengths = paged_inputs(batch, page, lengths, copies, gen)
    out = torch.empty_like(q)
    calls = [lambda t=tables[i % copies]: pa.paged_decode_attention(q, k_pages, v_pages, t, lengths, out=out)
             for i in range(max(copies, 20))]
    paged_us = graph_time_us(calls)
    got = pa.paged_decode_attention(q, k_pages, v_pages, tables[0], lengths)
    del calls
    ks, vs, bias = contiguous_inputs(q, k_pages, v_pages, tables, lengths, copies)
    del k_pages, v_pages
    calls = [lambda i=i: sdpa(q, ks[i % copies], vs[i % copies], bias) for i in range(max(copies, 20))]
    sdpa_us = graph_time_us(calls)
    err = (got.float() - sdpa(q, ks[0], vs[0], bias).float()).abs().max().item()
    splits = pa.choose_splits(batch, KV_HEADS, -(-tables.shape[2] * page // 64), q.device)
    row = {"batch": batch, "kind": kind, "page": page, "mean_length": float(lengths.float().mean()),
           "max_length": longest, "splits": splits, "kv_copies": copies, "paged_us": paged_us, "sdpa_us": sdpa_us,
           "speedup": sdpa_us / paged_us, "paged_gbs": valid_bytes / paged_us / 1e3,
           "sdpa_gbs_valid": valid_bytes / sdpa_us / 1e3, "sdpa_gbs_read": padded_bytes / sdpa_us / 1e3,
           "max_abs_diff_vs_sdpa": err}
    row["paged_of_copy"] = row["paged_gbs"] / copy_gbs
    return row


def sweep(batch: int, kind: str, seconds: float, seed: int = 0) -> list[dict]:
    """The kernel's knobs on one case: microseconds of each setting, likeliest first, for at most `seconds`."""
    stop = time.monotonic() + seconds
    page, lengths = case_lengths(batch, kind, seed)
    valid_bytes = 2 * int(lengths.sum()) * KV_HEADS * DIM * 2
    copies = max(1, min(128, -(-L2_MULTIPLE_BYTES // valid_bytes)))
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k_pages, v_pages, tables, lengths = paged_inputs(batch, page, lengths, copies, gen)
    out = torch.empty_like(q)
    rows = []
    for block_n, warps, stages in itertools.product([64, 128, 32], [4, 8], [2, 3, 1]):
        base = pa.choose_splits(batch, KV_HEADS, -(-tables.shape[2] * page // block_n), q.device)
        for splits in sorted({max(1, base // 2), base, min(64, 2 * base)}):
            if time.monotonic() > stop:
                return rows
            kw = dict(num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
            calls = [lambda t=tables[i % copies]: pa.paged_decode_attention_triton(q, k_pages, v_pages, t, lengths,
                                                                                   out=out, **kw)
                     for i in range(max(copies, 20))]
            try:
                us = graph_time_us(calls, reps=7)
            except Exception as e:  # a setting that does not compile (shared memory, registers)
                rows.append({**kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            rows.append({**kw, "us": us, "gbs": valid_bytes / us / 1e3})
    return rows


def save(path: Path, result: dict) -> None:
    """Written after each stage, so that a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-seconds", type=float, default=25.0, help="time budget of each swept case")
    args = parser.parse_args()
    import triton

    copy_gbs = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count, "copy_gbs": copy_gbs,
              "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "bfloat16"}, "cases": []}
    print(f"{result['device']}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(f"{'kind':>5} {'B':>4} {'len':>6} {'splits':>6} {'paged us':>9} {'sdpa us':>9} {'x':>6} "
          f"{'paged GB/s':>10} {'of copy':>7} {'sdpa GB/s':>9} {'diff':>8}")
    for kind, batch in itertools.product(["self", "cross"], [1, 8, 64, 128]):
        row = run_case(batch, kind, copy_gbs)
        result["cases"].append(row)
        print(f"{kind:>5} {batch:>4} {row['mean_length']:>6.0f} {row['splits']:>6} {row['paged_us']:>9.1f} "
              f"{row['sdpa_us']:>9.1f} {row['speedup']:>6.2f} {row['paged_gbs']:>10.0f} "
              f"{row['paged_of_copy']:>7.0%} {row['sdpa_gbs_valid']:>9.0f} {row['max_abs_diff_vs_sdpa']:>8.1e}",
              flush=True)
        torch.cuda.empty_cache()
    save(args.out, result)
    if args.sweep:
        result["sweep"] = {}
        for kind, batch in [("self", 1), ("self", 8), ("self", 64), ("cross", 1), ("cross", 8), ("cross", 64)]:
            rows = sweep(batch, kind, args.sweep_seconds)
            result["sweep"][f"{kind}-{batch}"] = rows
            best = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])[:5]
            print(f"sweep {kind} B={batch}: " + "; ".join(
                f"bn{r['block_n']} w{r['num_warps']} s{r['num_stages']} sp{r['num_splits']}: {r['us']:.1f}us"
                for r in best), flush=True)
            torch.cuda.empty_cache()
            save(args.out, result)


if __name__ == "__main__":
    main()
