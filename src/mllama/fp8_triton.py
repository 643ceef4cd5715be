"""The Triton source of fp8_kernel's split-K products (see there for what it computes and why); imported at its
first call, on CUDA."""
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_os, stride_om, K_PER_SPLIT,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (column block, split, row block): the float32 sum over its K_PER_SPLIT inner indices."""
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    inner = split * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    x_at = x_ptr + rows[:, None].to(tl.int64) * stride_xm + inner[None, :]
    w_at = w_ptr + columns[:, None].to(tl.int64) * stride_wn + inner[None, :]
    row_ok = rows[:, None] < M
    column_ok = columns[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_at, mask=row_ok, other=0.0)
        w = tl.load(w_at, mask=column_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_at += BLOCK_K
        w_at += BLOCK_K
    tl.store(out_ptr + split * stride_os + rows[:, None] * stride_om + columns[None, :], acc,
             mask=(rows[:, None] < M) & (columns[None, :] < N))
