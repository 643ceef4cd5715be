"""Paged decode attention: one new query token per row against K/V stored in fixed-size pages.

What it computes. For each row b and query head h (kv head h // G, G = H / KVH, the grouping of torch SDPA's
enable_gqa), softmax(q[b, h] . K_b^T / sqrt(D)) . V_b over the first lengths[b] tokens of row b. A row of
length 0 gives zeros.

Layout.
    q            [B, H, D]            one query token per row; bf16, fp16 or fp32
    k/v_pages    [P, KVH, PAGE, D]    a shared pool of pages, same dtype as q, or e4m3 (FP8) with scales:
    k/v_scales   [P, KVH, PAGE]       float32, one per token and kv head: the stored value is page * scale
                                      (quantization.quantize_rows over D, as `write_pages` stores them)
    page_table   [B, MAXP] int32      row b's token t lives at page page_table[b, t // PAGE], slot t % PAGE
    lengths      [B] int32            valid tokens per row, 0 <= lengths[b] <= MAXP * PAGE, on q's device
Table entries past a row's last used page may hold anything in range or -1: they are never read, and neither
are the slots of the last page past the row's length (they may hold NaN). PAGE is any size: 64 (or any power of
two) for the self-attention cache, 1601 (one image tile's vision tokens) for cross-attention.

The kernel (Triton, CUDA). One program per (row, kv head, split): it takes all G query heads of that kv head at
once (padded to 16 rows for tl.dot, so each K/V element is read once) and walks its share of the row's tokens
in chunks of BLOCK_N, gathering each chunk's page from the table (a chunk may cross pages when PAGE is not a
multiple of BLOCK_N). The split over the sequence (flash-decoding) keeps the GPU busy at small batch: each
program covers an equal share of its own row's chunks, found on the device from lengths[b], and writes its
running max, sum and unnormalised output; a second small kernel combines the splits. The number of splits comes
from the shapes and the SM count alone, so launches never depend on values and the whole call can be captured in
a CUDA graph (no host reads, no synchronisation).

Numerics. Scores q.k are fp32 (tl.dot accumulates in fp32; fp32 inputs use IEEE products, not TF32), the
softmax runs in base 2 on scores pre-multiplied by log2(e)/sqrt(D), its weights are cast to the input dtype for
the product with V (as in flash attention), and the output accumulates in fp32 before the final cast to q's
dtype. The plain-torch reference gathers the pages and runs SDPA in fp32. FP8 pages are converted to q's dtype
as they load (exact: every e4m3 value is a bf16 value); a key's scale multiplies its score, a value's scale its
softmax weight before the product with V (the same sums as dequantizing first, in another order).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quantization import FP8, quantize_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
           "write_pages"]

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


def _check(q, k_pages, v_pages, page_table, lengths, k_scales=None, v_scales=None) -> tuple[int, ...]:
    """Validates the shapes; returns (B, H, D, KVH, PAGE, MAXP)."""
    if q.dim() != 3 or k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [B, H, D] and k/v_pages [P, KVH, PAGE, D], got {tuple(q.shape)}, "
                         f"{tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    batch, heads, dim = q.shape
    _, kv_heads, page, kdim = k_pages.shape
    if kdim != dim or heads % kv_heads:
        raise ValueError(f"head dims {dim} vs {kdim}, or heads {heads} not a multiple of kv heads {kv_heads}")
    if page_table.dim() != 2 or page_table.shape[0] != batch or tuple(lengths.shape) != (batch,):
        raise ValueError(f"expected page_table [B, MAXP] and lengths [B] for B={batch}, got "
                         f"{tuple(page_table.shape)}, {tuple(lengths.shape)}")
    if k_pages.dtype == FP8 and v_pages.dtype == FP8:
        scales = (k_scales, v_scales)
        if any(s is None or s.shape != k_pages.shape[:3] or s.dtype != torch.float32 for s in scales):
            raise ValueError(f"FP8 pages need float32 k/v_scales {tuple(k_pages.shape[:3])}, got "
                             f"{None if k_scales is None else (tuple(k_scales.shape), k_scales.dtype)} and "
                             f"{None if v_scales is None else (tuple(v_scales.shape), v_scales.dtype)}")
    elif q.dtype != k_pages.dtype or q.dtype != v_pages.dtype or k_scales is not None or v_scales is not None:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_pages.dtype}, v {v_pages.dtype} (scales are for FP8 "
                         f"pages only)")
    return batch, heads, dim, kv_heads, page, page_table.shape[1]


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, out=None, k_scales=None,
                           v_scales=None) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V per row over its first lengths[b] paged tokens; [B, H, D] in q's dtype.
    The Triton kernel on CUDA when triton is importable, the plain-torch reference otherwise."""
    if q.is_cuda and triton is not None:
        return paged_decode_attention_triton(q, k_pages, v_pages, page_table, lengths, out=out, k_scales=k_scales,
                                             v_scales=v_scales)
    result = paged_decode_attention_reference(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales)
    return result if out is None else out.copy_(result)


def paged_decode_attention_reference(q, k_pages, v_pages, page_table, lengths, k_scales=None,
                                     v_scales=None) -> torch.Tensor:
    """Plain torch: gather each row's pages into [B, KVH, MAXP*PAGE, D], zero and mask the keys at or past the
    row's length, SDPA in fp32 with enable_gqa. A row of length 0 attends over its zeroed V and so gives zeros
    (no all-masked softmax, no NaN). No host reads of values, so it can be captured in a CUDA graph."""
    batch, heads, dim, kv_heads, page, max_pages = _check(q, k_pages, v_pages, page_table, lengths, k_scales,
                                                          v_scales)
    pages = page_table.long().clamp(min=0)  # -1 entries are past the length: any page will do, then masked

    def gather(pool, scales):  # [B, MAXP, KVH, PAGE, D] -> [B, KVH, MAXP*PAGE, D], dequantized
        values = pool[pages].float() if scales is None else pool[pages].float() * scales[pages][..., None]
        return values.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, max_pages * page, dim)

    lengths = lengths.to(q.device).long()
    valid = torch.arange(max_pages * page, device=q.device)[None, :] < lengths[:, None]  # [B, L]
    keep = valid[:, None, :, None]
    k = torch.where(keep, gather(k_pages, k_scales), 0.0)  # stale slots may hold NaN: zeroed, so 0 * NaN cannot leak
    v = torch.where(keep, gather(v_pages, v_scales), 0.0)
    mask = (valid | (lengths[:, None] == 0))[:, None, None, :]  # an empty row attends to zeroed V: zeros
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask,
                                         enable_gqa=heads != kv_heads)[:, :, 0]
    return out.to(q.dtype)


def write_pages(k_pages, v_pages, page_table, positions, k, v, k_scales=None, v_scales=None,
                quantized=None) -> None:
    """Writes the decode step's new token of each row: k/v [B, KVH, D] go to token index positions[b] of row b
    (page page_table[b, pos // PAGE], slot pos % PAGE); into FP8 pages quantized per kv head, with their scales
    (or, with `quantized` = (k scales, v scales) [B, KVH], k and v are e4m3 already, quantize_rows' values).
    Tensor indexing only: no host reads, graph-safe. Each position must fall in a page the row owns (a -1 entry
    would index the pool's last page)."""
    page = k_pages.shape[2]
    positions = positions.long()
    rows = torch.arange(positions.shape[0], device=positions.device)
    pages = page_table[rows, positions // page].long()
    slots = positions % page
    given = quantized or (None, None)
    for pool, scales, new, scale in ((k_pages, k_scales, k, given[0]), (v_pages, v_scales, v, given[1])):
        if scales is None:
            pool[pages, :, slots] = new.to(pool.dtype)
            continue
        if scale is None:
            new, scale = quantize_rows(new)
            scale = scale[..., 0]
        pool.view(torch.uint8)[pages, :, slots] = new.view(torch.uint8)  # (as bytes: index_put has no float8)
        scales[pages, :, slots] = scale


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached); 4 elsewhere, so the interpreter still exercises splits."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_splits(batch: int, kv_heads: int, max_chunks: int, device: torch.device) -> int:
    """Splits of each row so that about two programs run per SM, capped by the chunks a row can have."""
    programs = batch * kv_heads
    want = -(-2 * _sm_count(device) // programs)
    return max(1, min(want, max_chunks, MAX_SPLITS))


def paged_decode_attention_triton(q, k_pages, v_pages, page_table, lengths, out=None, *, k_scales=None,
                                  v_scales=None, num_splits=None, block_n=64, num_warps=4,
                                  num_stages=2) -> torch.Tensor:
    """The Triton path of paged_decode_attention (also runs under TRITON_INTERPRET=1 on CPU tensors).
    num_splits (default from the shapes), block_n, num_warps and num_stages are tuning knobs."""
    if triton is None:
        raise RuntimeError("triton is not importable")
    batch, heads, dim, kv_heads, page, max_pages = _check(q, k_pages, v_pages, page_table, lengths, k_scales,
                                                          v_scales)
    if dim < 16 or dim & (dim - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"head dim {dim} and block_n {block_n} must be powers of two >= 16")
    if k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("k_pages, v_pages and page_table need a contiguous last dim")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    group = heads // kv_heads
    max_chunks = -(-max_pages * page // block_n)
    splits = num_splits or choose_splits(batch, kv_heads, max_chunks, q.device)
    if splits == 1:
        part_m = part_l = part_acc = out  # unused: the kernel writes the normalised output itself
    else:
        part_m = torch.empty(batch * heads, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(batch * heads, splits, dim, device=q.device, dtype=torch.float32)
    scaled = k_scales is not None
    if scaled and (k_scales.stride() != v_scales.stride() or k_scales.stride(-1) != 1):
        raise ValueError("k_scales and v_scales need the same strides and a contiguous last dim")
    ks, vs = (k_scales, v_scales) if scaled else (lengths, lengths)  # (unread without scales)
    _paged_decode_kernel[(batch * kv_heads, splits)](
        q, k_pages, v_pages, page_table, lengths, out, part_m, part_l, part_acc, ks, vs,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), page_table.stride(0), out.stride(0), out.stride(1),
        ks.stride(0) if scaled else 0, ks.stride(1) if scaled else 0, kv_heads, splits, LOG2E / math.sqrt(dim),
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim, PAGE=page, BLOCK_N=block_n,
        ONE_SPLIT=splits == 1, SCALED=scaled, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(batch * heads,)](part_m, part_l, part_acc, out, out.stride(0), out.stride(1), heads, splits,
                                          SPLITS_PAD=triton.next_power_of_2(splits), D=dim, num_warps=4)
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, out_ptr, part_m_ptr, part_l_ptr,
                             part_acc_ptr, ks_ptr, vs_ptr, stride_qb, stride_qh, stride_kp, stride_kh, stride_kt,
                             stride_vp, stride_vh, stride_vt, stride_tb, stride_ob, stride_oh, stride_sp, stride_sh,
                             KVH, SPLITS, qk_scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr,
                             SCALED: tl.constexpr, PRECISION: tl.constexpr):
        """One (row, kv head, split): online softmax of the G query heads over this split's chunks."""
        row = tl.program_id(0) // KVH
        kv_head = tl.program_id(0) % KVH
        split = tl.program_id(1)
        length = tl.load(lengths_ptr + row)
        chunks = tl.cdiv(length, BLOCK_N)
        per_split = tl.cdiv(chunks, SPLITS)
        first = split * per_split
        last = tl.minimum(first + per_split, chunks)

        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kv_head * G + g
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G,
                    other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        table_row = table_ptr + row * stride_tb
        for chunk in range(first, last):
            tokens = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = tokens < length
            if PAGE % BLOCK_N == 0:  # the chunk lies in one page: one table read
                page = tl.load(table_row + chunk * BLOCK_N // PAGE).to(tl.int64)
                slot = (chunk * BLOCK_N) % PAGE + tl.arange(0, BLOCK_N)
                k_rows = page * stride_kp + slot * stride_kt
                v_rows = page * stride_vp + slot * stride_vt
                s_rows = page * stride_sp + slot
            else:  # the chunk may cross pages: a table read per token (cached)
                page = tl.load(table_row + tokens // PAGE, mask=valid, other=0).to(tl.int64)
                slot = tokens % PAGE
                k_rows = page * stride_kp + slot * stride_kt
                v_rows = page * stride_vp + slot * stride_vt
                s_rows = page * stride_sp + slot
            k = tl.load(k_ptr + kv_head * stride_kh + k_rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + kv_head * stride_vh + v_rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if SCALED:
                scores = scores * tl.load(ks_ptr + kv_head * stride_sh + s_rows, mask=valid, other=0.0)[None, :]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every chunk in range has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if SCALED:
                p = p * tl.load(vs_ptr + kv_head * stride_sh + s_rows, mask=valid, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if ONE_SPLIT:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # length 0: acc is 0
            tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)
        else:
            part = (row * KVH * G + heads) * SPLITS + split  # [B*H, SPLITS] index
            tl.store(part_m_ptr + part, m_i, mask=g < G)
            tl.store(part_l_ptr + part, l_i, mask=g < G)
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=g[:, None] < G)

    @triton.jit
    def _combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_ob, stride_oh, H, SPLITS,
                        SPLITS_PAD: tl.constexpr, D: tl.constexpr):
        """One (row, head): rescales each split's sum and output to the global max and normalises."""
        pid = tl.program_id(0)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, D)
        used = s < SPLITS
        m = tl.load(part_m_ptr + pid * SPLITS + s, mask=used, other=float("-inf"))
        l = tl.load(part_l_ptr + pid * SPLITS + s, mask=used, other=0.0)
        acc = tl.load(part_acc_ptr + (pid * SPLITS + s)[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (length 0)
        w = tl.exp2(m - m_max)
        total = tl.sum(w * l, 0)
        o = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + (pid // H) * stride_ob + (pid % H) * stride_oh + d, o.to(out_ptr.dtype.element_ty))
