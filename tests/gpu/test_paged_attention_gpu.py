"""On CUDA: the Triton paged decode-attention kernel against the plain-torch reference at the 11B model's shapes
(H=32, KVH=8, D=128, bf16), for self-attention pages of 64 tokens and cross-attention pages of one 1601-token
image tile, also replayed inside a captured CUDA graph with new lengths."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from mllama.engine import paged_attention as pa  # noqa: E402

DEV = "cuda"
HEADS, KV_HEADS, DIM = 32, 8, 128


def paged_case(lengths: list[int], page: int, max_pages: int, heads=HEADS, kv_heads=KV_HEADS, dim=DIM,
               dtype=torch.bfloat16, seed=0):
    """A shuffled shared pool holding each row's pages; stale tails NaN; unused table entries -1 or random."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    batch = len(lengths)
    used = [-(-n // page) for n in lengths]
    pool = sum(used) + 3
    k_pages = torch.randn(pool, kv_heads, page, dim, device=DEV, generator=gen).to(dtype)
    v_pages = torch.randn(pool, kv_heads, page, dim, device=DEV, generator=gen).to(dtype)
    order = torch.randperm(pool, device=DEV, generator=gen)
    table = torch.full((batch, max_pages), -1, dtype=torch.int32, device=DEV)
    start = 0
    for b, n in enumerate(lengths):
        table[b, :used[b]] = order[start:start + used[b]].int()
        start += used[b]
        if n % page:
            k_pages[table[b, used[b] - 1], :, n % page:] = float("nan")
            v_pages[table[b, used[b] - 1], :, n % page:] = float("nan")
        if b % 2 and used[b] < max_pages:
            table[b, used[b]:] = torch.randint(0, pool, (max_pages - used[b],), device=DEV, generator=gen).int()
    q = torch.randn(batch, heads, dim, device=DEV, generator=gen).to(dtype)
    return q, k_pages, v_pages, table, torch.tensor(lengths, dtype=torch.int32, device=DEV)


def random_lengths(batch: int, page: int, max_pages: int, seed: int) -> list[int]:
    """Random lengths, with 0, one token, exact page multiples and the table's maximum among them."""
    gen = torch.Generator().manual_seed(seed)
    top = page * max_pages
    lengths = torch.randint(1, top + 1, (batch,), generator=gen).tolist()
    special = [0, top, page, 1, 2 * page, page + 1, top - 1]
    for i, n in enumerate(special[:batch]):
        lengths[(i * 7) % batch] = n
    return lengths


def check(case):
    """The kernel (the CUDA path of the public function) against the reference; returns the kernel's answer."""
    got = pa.paged_decode_attention(*case)
    expected = pa.paged_decode_attention_reference(*case)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    err = (got.float() - expected.float()).abs().max().item()
    assert err < 2e-2, err
    assert not got.isnan().any()
    assert torch.all(got[case[4] == 0] == 0)
    return got


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_self_attention_pages_of_64(batch):
    check(paged_case(random_lengths(batch, 64, 64, seed=batch), page=64, max_pages=64, seed=batch))


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_cross_attention_tiles_of_1601(batch):
    gen = torch.Generator().manual_seed(batch)
    lengths = (torch.randint(1, 5, (batch,), generator=gen) * 1601).tolist()
    if batch > 1:
        lengths[1] = 0
    check(paged_case(lengths, page=1601, max_pages=4, seed=batch + 10))


@pytest.mark.parametrize("page,group,dim,dtype", [(16, 1, 16, torch.float32), (32, 2, 64, torch.float16),
                                                  (16, 4, 128, torch.bfloat16), (128, 8, 128, torch.bfloat16)])
def test_other_shapes_and_dtypes(page, group, dim, dtype):
    lengths = random_lengths(5, page, 9, seed=page + group)
    case = paged_case(lengths, page, 9, heads=2 * group, kv_heads=2, dim=dim, dtype=dtype, seed=3)
    got = check(case)
    if dtype == torch.float32:  # IEEE products, not TF32
        torch.testing.assert_close(got, pa.paged_decode_attention_reference(*case), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_every_split_count_gives_the_same_answer(splits):
    case = paged_case(random_lengths(4, 64, 16, seed=9), page=64, max_pages=16, seed=4)
    got = pa.paged_decode_attention_triton(*case, num_splits=splits)
    err = (got.float() - pa.paged_decode_attention_reference(*case).float()).abs().max().item()
    assert err < 2e-2, err


def test_cuda_path_is_the_kernel_and_writes_into_out(monkeypatch):
    case = paged_case([100, 0, 640], page=64, max_pages=10)
    monkeypatch.setattr(pa, "paged_decode_attention_reference", lambda *a: pytest.fail("reference used"))
    out = torch.full_like(case[0], float("nan"))
    assert pa.paged_decode_attention(*case, out=out) is out
    monkeypatch.undo()
    assert (out.float() - pa.paged_decode_attention_reference(*case).float()).abs().max() < 2e-2


@pytest.mark.parametrize("page,max_pages", [(64, 64), (1601, 4)])
def test_replay_in_a_cuda_graph_with_new_lengths(page, max_pages):
    """Captured once; new lengths (and a new query and a new token per row via write_pages) written into the
    same tensors give the new answer on replay. No host sync inside the capture (it would raise)."""
    top = page * max_pages
    q, k_pages, v_pages, table, lengths = paged_case([top] * 3, page, max_pages, seed=5)  # rows own all pages
    first = random_lengths(3, page, max_pages, seed=1)
    lengths.copy_(torch.tensor(first, dtype=torch.int32))
    positions = lengths.clamp(min=1) - 1  # the new token is the row's last
    k_new = torch.randn(3, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    out = torch.empty_like(q)

    def step():
        pa.write_pages(k_pages, v_pages, table, positions, k_new, v_new)
        pa.paged_decode_attention(q, k_pages, v_pages, table, lengths, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new in [first, [0, top, page + 3], [1, 2 * page, 7]]:
        lengths.copy_(torch.tensor(new, dtype=torch.int32))
        positions.copy_(lengths.clamp(min=1) - 1)
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        graph.replay()
        torch.cuda.synchronize()
        expected = pa.paged_decode_attention_reference(q, k_pages, v_pages, table, lengths)
        assert (out.float() - expected.float()).abs().max().item() < 2e-2, new
        for b, n in enumerate(new):  # the new token of row b went where the reference reads it
            n = max(n, 1) - 1
            assert torch.equal(k_pages[table[b, n // page], :, n % page], k_new[b])
