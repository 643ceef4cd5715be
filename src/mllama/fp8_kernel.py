"""The FP8 product for a few rows (decode batches) as a Triton kernel: q_x [M, K] e4m3 times q_w [N, K]^T e4m3.

Why. At decode sizes a product only has to read its weight once. At 1-16 rows this kernel took 1.1-1.7x the
weight's read time at the copy rate where cuBLAS's FP8 kernel (torch._scaled_mm, unscaled) took 1.1-1.9x (H200,
11B at one row: q|k|v 8.4 against 9.6 us, o 6.7 against 7.5, `down` 16.5 against 19.6, read times 6.0, 4.0 and
14.0 us; gate|up even; bench/results/2026-12-02-h200-fp8-kernel-sweep-s4.json). At 32 rows cuBLAS is as fast or faster.

What it computes. The unscaled products q_x @ q_w^T in float32, split over K: `partial_products` returns
[S, M, N] float32, S splits of K whose sum is the product; the caller adds them and applies the per-token and
per-channel scales (quantization.fp8_linear_cuda), which a compiled caller fuses into one pointwise kernel.
e4m3 x e4m3 products are exact in float32 and the sums accumulate in float32 (tl.dot), so this is
quantization.fp8_linear_reference's definition with another summation order, as cuBLAS's is.

The kernel. One program per (BLOCK_N output channels, split of K, BLOCK_M = 16 rows): it walks its share of K in
block_k(K) steps, each a tl.dot of the rows' activations with the weight tile (rows past M are masked to zero). S
depends on N and K only (about two programs per multiprocessor), so the output's shape is known from the inputs'
shapes (the fake implementation below: usable inside torch.compile and CUDA graphs, no host reads). The
Triton source is in fp8_triton.
"""
from __future__ import annotations

import importlib.util

import torch

# Whether the kernel can run; triton itself is imported at the first call (fp8_triton), not with mllama, so that
# a CPU process can still set TRITON_INTERPRET before anything imports it.
HAS_TRITON = importlib.util.find_spec("triton") is not None

BLOCK_N = 64
# Rows per program. Not more: with 32 or 64 rows Triton takes the Hopper FP8 wgmma instructions, whose sums are
# not float32-exact (2e-4 to 1e-3 off the exact product on the H200, against 1e-7 at 16 rows; tests/gpu).
BLOCK_M = 16


def block_k(k: int) -> int:
    """The inner step: 128 where K allows, else 64 or 32 (tl.dot's smallest FP8 step); 0 if none divides K."""
    return next((b for b in (128, 64, 32) if k % b == 0), 0)


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether partial_products can run on these operands (triton importable, K a multiple of 32)."""
    return HAS_TRITON and block_k(weight.shape[1]) > 0 and x.device == weight.device


def splits_for(n: int, k: int, sm_count: int) -> int:
    """The number of K splits: the fewest that give about two programs per multiprocessor, among the divisors
    of K's blocks that leave each split at least two blocks."""
    blocks = k // block_k(k)
    columns = -(-n // BLOCK_N)
    want = -(-2 * sm_count // columns)
    fitting = [d for d in range(1, blocks + 1) if blocks % d == 0 and blocks // d >= 2] or [1]
    return next((d for d in fitting if d >= want), fitting[-1])


_SM: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: still several splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM:
        _SM[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM[index]


@torch.library.custom_op("mllama::fp8_partial_products", mutates_args=())
def partial_products(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """[S, M, N] float32 partial sums of q_x [M, K] e4m3 @ q_w [N, K]^T e4m3 over S splits of K."""
    return launch(q_x, q_w, splits_for(q_w.shape[0], q_x.shape[1], _sm_count(q_x.device)))


def launch(q_x: torch.Tensor, q_w: torch.Tensor, splits: int, block_n: int = BLOCK_N, num_warps: int = 4,
           num_stages: int = 4) -> torch.Tensor:
    """partial_products with its knobs given (bench/fp8_bench.py tries others); K // splits must be a multiple
    of block_k(K)."""
    rows, k = q_x.shape
    n = q_w.shape[0]
    step = block_k(k)
    if step == 0 or k % (splits * step) or q_x.stride(1) != 1 or q_w.stride(1) != 1:
        raise ValueError(f"partial_products needs contiguous rows and K ({k}) a multiple of 32 x {splits} splits")
    out = torch.empty(splits, rows, n, device=q_x.device, dtype=torch.float32)
    if rows == 0:
        return out
    from .fp8_triton import kernel

    grid = (-(-n // block_n), splits, -(-rows // BLOCK_M))
    kernel[grid](q_x, q_w, out, rows, n, q_x.stride(0), q_w.stride(0), out.stride(0), out.stride(1), k // splits,
                  BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=step, num_warps=num_warps, num_stages=num_stages)
    return out


@partial_products.register_fake
def _(q_x, q_w):
    splits = splits_for(q_w.shape[0], q_x.shape[1], _sm_count(q_x.device))
    return q_x.new_empty((splits, q_x.shape[0], q_w.shape[0]), dtype=torch.float32)
