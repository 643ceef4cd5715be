"""On CUDA: the FP8 linear layer on the tensor cores (torch._scaled_mm) against its definition, the
dequantize-and-compute reference in float32, at the 11B model's decode and prefill shapes."""
from __future__ import annotations

import pytest
import torch

from mllama.quantization import Fp8Linear, fp8_linear_cuda, fp8_linear_reference

DEVICE = "cuda"


@pytest.mark.parametrize("rows", [1, 8, 64, 301])
@pytest.mark.parametrize("inner, outer", [(4096, 6144), (4096, 28672), (14336, 4096)])
def test_scaled_mm_equals_the_reference(rows, inner, outer):
    g = torch.Generator(device=DEVICE).manual_seed(rows + inner + outer)
    linear = torch.nn.Linear(inner, outer, bias=False, device=DEVICE, dtype=torch.bfloat16)
    linear.weight.data = torch.randn(outer, inner, device=DEVICE, generator=g, dtype=torch.bfloat16) * 0.02
    layer = Fp8Linear.quantized(linear)
    x = torch.randn(rows, inner, device=DEVICE, generator=g, dtype=torch.bfloat16)
    x[0] *= 40  # rows of very different sizes: each gets its own scale
    fast = fp8_linear_cuda(x, layer.weight, layer.weight_scale)
    assert torch.equal(layer(x), fast)  # the module takes this path on CUDA
    exact = fp8_linear_reference(x.float(), layer.weight, layer.weight_scale)  # float32 out: no final rounding
    error = ((fast.float() - exact).abs().amax(dim=-1) / exact.abs().amax(dim=-1)).max().item()
    bf16 = x.float() @ linear.weight.float().t()  # the product FP8 replaces: its own quantization error, printed
    quantization = ((exact - bf16).abs().amax() / bf16.abs().amax()).item()
    print(f"rows {rows}, {inner} -> {outer}: kernel vs definition {error:.2e}, FP8 vs bf16 {quantization:.2e}")
    assert error < 8e-3  # bf16's rounding of the output (2^-8) and the accumulation order, nothing more


def test_a_3d_input_and_bias():
    linear = torch.nn.Linear(256, 512, bias=True, device=DEVICE, dtype=torch.bfloat16)
    layer = Fp8Linear.quantized(linear)
    x = torch.randn(2, 5, 256, device=DEVICE, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 512) and out.dtype == torch.bfloat16
    exact = fp8_linear_reference(x.float(), layer.weight, layer.weight_scale, layer.bias)
    assert ((out.float() - exact).abs().max() / exact.abs().max()).item() < 8e-3
