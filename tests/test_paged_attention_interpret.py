"""The Triton kernel's logic on the CPU, under Triton's interpreter, against the reference. Opt-in, since the
interpreter is slow and CI has no triton:

    MLLAMA_TRITON_INTERPRET=1 python -m pytest tests/test_paged_attention_interpret.py

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it as each kernel, triton's own helpers
included, is defined). Where an earlier test module of the same run has already imported triton, this module
runs itself again in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("MLLAMA_TRITON_INTERPRET") != "1":
    pytest.skip("set MLLAMA_TRITON_INTERPRET=1 to run the Triton kernel under the interpreter",
                allow_module_level=True)
FRESH = "triton" not in sys.modules
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_paged_attention import LENGTHS, independent, make_case  # noqa: E402

fresh_only = pytest.mark.skipif(not FRESH, reason="triton was imported without the interpreter: see "
                                                  "test_in_a_fresh_process")


@pytest.mark.skipif(FRESH, reason="this process imported triton under the interpreter")
def test_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def pa():
    from mllama.engine import paged_attention

    assert "Interpreted" in type(paged_attention._paged_decode_kernel).__name__
    return paged_attention


CASES = {  # name: (page, group, lengths, block_n, splits)
    "page16-cross-pages": (16, 2, LENGTHS[16], 64, None),
    "page16-one-split": (16, 4, LENGTHS[16], 32, 1),
    "page16-g1-many-splits": (16, 1, [0, 48, 5], 16, 7),
    "page64-one-page-per-chunk": (64, 4, [64, 0, 130, 192, 1], 64, 3),
    "page64-small-blocks": (64, 2, [100, 191], 16, 2),
    "page1601-tiles": (1601, 4, [1601, 0, 3203, 1], 64, 5),
}


@fresh_only
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_fp32(pa, name):
    page, group, lengths, block_n, splits = CASES[name]
    case = make_case(page, group, lengths, max_pages=3)
    got = pa.paged_decode_attention_triton(*case, num_splits=splits, block_n=block_n)
    assert got.shape == case[0].shape and got.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got.double(), independent(*case), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, pa.paged_decode_attention_reference(*case), rtol=1e-5, atol=1e-5)
    assert torch.all(got[torch.tensor(lengths) == 0] == 0)


@fresh_only
@pytest.mark.parametrize("splits", [1, 2])
def test_kernel_fp16_writes_into_out(pa, splits):
    """fp16 here: the interpreter's tl.dot gets bf16 wrong (triton 3.9: it multiplies the raw bits); the GPU
    tests cover bf16."""
    case = make_case(16, 4, LENGTHS[16], dtype=torch.float16, dim=32)
    out = torch.full_like(case[0], float("nan"))
    got = pa.paged_decode_attention_triton(*case, out=out, num_splits=splits)
    assert got is out and out.dtype == torch.float16
    torch.testing.assert_close(out.double(), independent(*case), rtol=0, atol=2e-3)


@fresh_only
def test_kernel_reads_no_table_entry_past_the_length(pa):
    """Out-of-range table entries past each row's pages would index outside the pool if read."""
    case = make_case(64, 2, [64, 10, 0], max_pages=4)
    table = case[3].clone()
    for b, n in enumerate([64, 10, 0]):
        table[b, -(-n // 64):] = 10 ** 6
    got = pa.paged_decode_attention_triton(*case[:3], table, case[4], num_splits=2)
    torch.testing.assert_close(got.double(), independent(*case), rtol=1e-5, atol=1e-5)


@fresh_only
@pytest.mark.parametrize("name", ["page16-cross-pages", "page64-one-page-per-chunk", "page1601-tiles"])
def test_kernel_fp8_pages_with_scales(pa, name):
    """FP8 pages and their scales: the kernel against the reference over the dequantized pages."""
    from mllama.quantization import quantize_rows

    page, group, lengths, block_n, splits = CASES[name]
    q, k_pages, v_pages, table, lengths = make_case(page, group, lengths, max_pages=3)
    (kq, ks), (vq, vs) = quantize_rows(k_pages * 7), quantize_rows(v_pages)
    got = pa.paged_decode_attention_triton(q, kq, vq, table, lengths, k_scales=ks[..., 0], v_scales=vs[..., 0],
                                           num_splits=splits, block_n=block_n)
    want = independent(q, kq.float() * ks, vq.float() * vs, table, lengths)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
