"""The paged decode-attention reference (and the CPU dispatch of paged_decode_attention) against an independent
computation: each row's pages concatenated into contiguous K/V and an explicit fp64 softmax. The page tables are
shuffled over a shared pool, unused table entries are -1 or another row's pages, and every slot no row owns
holds NaN, so reading anything outside a row's tokens shows up as NaN or a wrong value."""
from __future__ import annotations

import math

import pytest
import torch

from mllama.engine.paged_attention import (paged_decode_attention, paged_decode_attention_reference,
                                           write_pages)


def make_case(page: int, group: int, lengths: list[int], kv_heads: int = 2, dim: int = 16, max_pages: int = 3,
              dtype=torch.float32, seed: int = 0):
    """Random q and a shared, shuffled page pool; returns (q, k_pages, v_pages, page_table, lengths)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    used = [-(-n // page) for n in lengths]
    spare = 2
    pool = sum(used) + spare
    order = torch.randperm(pool, generator=gen).tolist()
    k_pages = torch.full((pool, kv_heads, page, dim), float("nan"), dtype=dtype)
    v_pages = torch.full_like(k_pages, float("nan"))
    table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for j in range(used[b]):
            p = order.pop()
            table[b, j] = p
            fill = min(page, n - j * page)  # the last page's tail stays NaN (stale)
            k_pages[p, :, :fill] = torch.randn(kv_heads, fill, dim, generator=gen).to(dtype)
            v_pages[p, :, :fill] = torch.randn(kv_heads, fill, dim, generator=gen).to(dtype)
        if b % 2 and used[b] < max_pages:  # garbage entries: pages of other rows or spare pages
            table[b, used[b]:] = torch.randint(0, pool, (max_pages - used[b],), generator=gen, dtype=torch.int32)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).to(dtype)
    return q, k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32)


def attend(q_row, k, v, kv_head_of) -> torch.Tensor:
    """q_row [H, D] against contiguous k/v [KVH, n, D]: an explicit softmax in fp64, all heads at once."""
    index = torch.tensor([kv_head_of(h) for h in range(q_row.shape[0])])
    k, v = k.double()[index], v.double()[index]  # [H, n, D]
    scores = (k @ q_row.double()[:, :, None])[:, :, 0] / math.sqrt(q_row.shape[1])  # [H, n]
    weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
    return ((weights / weights.sum(dim=1, keepdim=True))[:, None, :] @ v)[:, 0]


def independent(q, k_pages, v_pages, table, lengths, kv_head_of=None, ignore_lengths=False) -> torch.Tensor:
    """Row by row: concatenate the row's pages, cut at its length, attend in fp64.
    kv_head_of and ignore_lengths build the wrong answers that the tests must tell apart."""
    batch, heads, dim = q.shape
    kv_heads, page = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads
    kv_head_of = kv_head_of or (lambda h: h // group)
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        if ignore_lengths:
            n = -(-n // page) * page
        if n == 0:
            continue
        pages = [int(p) for p in table[b, :-(-n // page)]]
        k = torch.cat([k_pages[p] for p in pages], dim=1)[:, :n]  # [KVH, n, D]
        v = torch.cat([v_pages[p] for p in pages], dim=1)[:, :n]
        out[b] = attend(q[b], k, v, kv_head_of)
    return out


LENGTHS = {16: [0, 16, 37, 48, 1, 33], 1601: [1601, 0, 3 * 1601, 2000, 1]}


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page", [16, 1601])
def test_reference_matches_independent(page, group):
    case = make_case(page, group, LENGTHS[page])
    got = paged_decode_attention_reference(*case)
    assert got.dtype == torch.float32 and got.shape == case[0].shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), independent(*case), rtol=1e-5, atol=1e-5)
    assert got[LENGTHS[page].index(0)].abs().max() == 0  # a row of length 0 gives zeros


@pytest.mark.parametrize("page", [16, 1601])
def test_the_check_tells_wrong_answers_apart(page):
    """The comparison above fails for a kv-head grouping of h % KVH or for keys past the length."""
    case = make_case(page, 4, LENGTHS[page])
    got = paged_decode_attention_reference(*case).double()
    interleaved = independent(*case, kv_head_of=lambda h: h % 2)
    assert (got - interleaved).abs().max() > 0.1
    filled = make_case(page, 4, LENGTHS[page])  # same data; give the stale tails values instead of NaN
    filled[1].nan_to_num_(0.5)
    filled[2].nan_to_num_(-0.5)
    whole_pages = independent(*filled, ignore_lengths=True)
    assert (paged_decode_attention_reference(*filled).double() - whole_pages).abs().max() > 0.05


def test_bf16_and_the_public_function_on_cpu():
    case = make_case(16, 2, LENGTHS[16], dtype=torch.bfloat16)
    expected = independent(*case)
    got = paged_decode_attention(*case)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-2)
    out = torch.full_like(case[0], 7.0)
    assert paged_decode_attention(*case, out=out) is out
    torch.testing.assert_close(out, got, rtol=0, atol=0)


def test_write_pages_puts_tokens_where_the_reference_reads_them():
    """Rows grow one token per step through write_pages into pages of NaN (rows that are done drop out of the
    call); each written slot is the one the table names, no other slot changes, and the reference over the
    grown rows matches attention over the tokens written, kept contiguous."""
    page, kv_heads, dim = 16, 2, 16
    lengths = torch.tensor([40, 45, 57, 0], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    table = torch.randperm(16, generator=gen).to(torch.int32).view(4, 4)
    k_pages = torch.full((16, kv_heads, page, dim), float("nan"))
    v_pages = torch.full_like(k_pages, float("nan"))
    k_all = torch.randn(4, 57, kv_heads, dim, generator=gen)
    v_all = torch.randn(4, 57, kv_heads, dim, generator=gen)
    for step in range(57):
        rows = (lengths > step).nonzero()[:, 0]
        positions = torch.full((len(rows),), step, dtype=torch.int32)
        write_pages(k_pages, v_pages, table[rows], positions, k_all[rows, step], v_all[rows, step])
        for b in rows.tolist():
            assert torch.equal(k_pages[table[b, step // page], :, step % page], k_all[b, step])
            assert torch.equal(v_pages[table[b, step // page], :, step % page], v_all[b, step])
    assert int((~k_pages.isnan()).all(-1).sum()) == int(lengths.sum()) * kv_heads  # nothing else written
    q = torch.randn(4, 4, dim, generator=gen)
    got = paged_decode_attention_reference(q, k_pages, v_pages, table, lengths)
    for b in range(3):
        n = int(lengths[b])
        expected = attend(q[b], k_all[b, :n].transpose(0, 1), v_all[b, :n].transpose(0, 1), lambda h: h // 2)
        torch.testing.assert_close(got[b].double(), expected, rtol=1e-5, atol=1e-5)
    assert got[3].abs().max() == 0


def test_no_host_reads_of_values(monkeypatch):
    """Neither the reference nor write_pages reads a tensor's value on the host (item, tolist, bool, int,
    float, index, numpy), as a CUDA graph needs; the probe itself sees such a read."""
    case = make_case(16, 2, LENGTHS[16])
    reads = []
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n),
                                                                                         _o(self, *a))[1])
    paged_decode_attention_reference(*case)
    k_new = torch.randn(len(LENGTHS[16]), 2, 16)
    write_pages(case[1], case[2], case[3], case[4].clamp(max=47), k_new, k_new)
    assert reads == []
    bool(case[4][0])
    assert reads == ["__bool__"]


def test_shape_errors():
    q, k_pages, v_pages, table, lengths = make_case(16, 2, [3, 4])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention_reference(q[:, :3], k_pages, v_pages, table, lengths)
    with pytest.raises(ValueError, match="lengths"):
        paged_decode_attention_reference(q, k_pages, v_pages, table, lengths[:1])
