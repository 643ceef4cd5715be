"""FP8 (e4m3) linear layers as compressed-tensors stores them (RedHatAI's Llama-3.2-Vision FP8-dynamic checkpoints).

The format (config.json's `quantization_config`, `quant_method: compressed-tensors`, `format: float-quantized`):
each quantized Linear stores `weight` in F8_E4M3 and `weight_scale`, one scale per output channel ([out, 1]);
activations are quantized at run time, one scale per token, so no input scale is stored. Modules named in the
config's `ignore` list (names, or regular expressions after "re:") stay as they are: in the published checkpoints
the vision tower, the projector and lm_head.

`Fp8Linear` holds those tensors under the checkpoint's names and defines the numerics: W8A8 with dynamic
per-token activation scales. `fp8_linear_reference` computes it by dequantizing both operands to float32 and
multiplying (the CPU path, and the definition a GPU kernel must match). Loading: `from_pretrained` reads the
scheme (`fp8_scheme`, which refuses any other), swaps the targeted Linear modules of the model built on the meta
device for Fp8Linear (`use_fp8`), and the weights then load in their stored dtypes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fp8_kernel

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = torch.finfo(torch.float32).tiny  # the scale of an all-zero row: its values quantize to 0, not NaN


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (e4m3 values, float32 scales [..., 1]) with one symmetric scale per row: max|row| / 448."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_TINY)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 product, defined: each token of x quantized with its own scale (quantize_rows), times the e4m3
    weight, both dequantized to float32 ((q_x * s_x) @ (q_w * s_w)^T, computed as (q_x @ q_w^T) * s_x * s_w^T),
    plus bias, in x's dtype."""
    q, scale = quantize_rows(x)
    out = (q.float() @ weight.float().t()) * scale * weight_scale.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# At most this many rows (decode batches), the product runs without scales and both are applied after it: cuBLAS's
# row-wise-scaled FP8 kernels take a 128x128 tile for a handful of rows (H200, q|k|v of the 11B at one row: 19 us,
# against 7.6 us unscaled; bench/results/2026-12-02-h200-fp8-probe-s3.json).
UNSCALED_ROWS = 64
# At most this many rows, the unscaled product is mllama's own split-K Triton kernel (fp8_kernel), which reads the
# weight at nearly the copy rate where cuBLAS does not (bench/fp8_bench.py, part kernels).
KERNEL_ROWS = 16


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear_reference's product on the GPU: the same quantized operands and scales, accumulated in float32
    and scaled in float32 too. Up to KERNEL_ROWS rows, fp8_kernel's split-K products; up to UNSCALED_ROWS, the
    unscaled torch._scaled_mm; for either, both scales follow in one pointwise pass. Above, torch._scaled_mm with
    row-wise scales in the kernel. It differs from the reference by the accumulation order only, and is rounded
    once to x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows(rows)
    if rows.shape[0] <= UNSCALED_ROWS:
        if rows.shape[0] <= KERNEL_ROWS and fp8_kernel.available(q, weight):
            out = fp8_kernel.partial_products(q, weight).sum(0)
        else:
            one = torch.ones((), dtype=torch.float32, device=x.device)  # (made per call: safe in a graph capture)
            out = torch._scaled_mm(q, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = out * scale * weight_scale.float().t()
        out = (out if bias is None else out + bias.float()).to(x.dtype)
    else:
        out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.float().t(),
                               bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 product where x is: on the GPU's FP8 tensor cores for bf16/fp16 inputs on CUDA (torch._scaled_mm
    takes inner and output sizes that are multiples of 16, as every real Mllama layer has), else the reference."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.shape[0] % 16 == 0 \
            and weight.shape[1] % 16 == 0:
        return fp8_linear_cuda(x, weight, weight_scale, bias)
    return fp8_linear_reference(x, weight, weight_scale, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x times a weight [out, in] that is either in x's dtype (scale None) or e4m3 with one scale per output
    channel (scale [out, 1]): the fused q|k|v and gate|up matrices of engine.decode.fuse_projections."""
    return F.linear(x, weight) if scale is None else fp8_linear(x, weight, scale)


class Fp8Linear(nn.Module):
    """A Linear layer with an e4m3 weight [out, in] and a float scale per output channel, `weight_scale`
    [out, 1] (both stored as the checkpoint stores them); see fp8_linear_reference for what it computes."""

    stored_dtypes = ("weight", "weight_scale")  # loaded in the checkpoint's own dtypes, never cast

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def quantized(cls, linear: nn.Linear) -> "Fp8Linear":
        """`linear`'s weight quantized per output channel (bias kept as it is)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        weight, scale = quantize_rows(linear.weight)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


# --- the compressed-tensors scheme --------------------------------------------------------------------------------

# What RedHatAI's FP8-dynamic configs hold, field by field; anything else is refused by name.
_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
            "group_size": None, "block_structure": None}
_ACTIVATIONS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                "group_size": None, "block_structure": None}


@dataclass
class Fp8Scheme:
    ignore: list[str]  # module names (checkpoint layout or mllama's), or "re:<regular expression>"

    def ignores(self, names: tuple[str, ...]) -> bool:
        """Whether a module, under any of its names, is on the ignore list."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if any(re.match(entry[3:], name) for name in names):
                    return True
            elif entry in names:
                return True
        return False

    def config(self) -> dict:
        """The quantization_config that describes this scheme (what save_pretrained writes)."""
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(_WEIGHTS),
                                              "input_activations": dict(_ACTIVATIONS), "output_activations": None}},
                "ignore": list(self.ignore), "kv_cache_scheme": None}


# quantize="fp8" on load: what RedHatAI's FP8-dynamic recipe quantizes (the text model's Linear layers)
DEFAULT_SCHEME = Fp8Scheme(["re:.*vision_model.*", "re:.*multi_modal_projector.*", "re:.*lm_head"])  # (any layout)
QUANTIZE_CHOICES = ("fp8",)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported: use quantize='fp8' (the text model's linear "
                         f"layers in e4m3, per-channel weight scales, activations quantized per token) or None")


def _check_fields(given: Any, expected: dict, where: str) -> None:
    if not isinstance(given, dict):
        raise ValueError(f"quantization_config.{where} must be an object, got {given!r}")
    for key, value in expected.items():
        if given.get(key) != value:
            raise ValueError(f"quantization_config.{where}.{key} is {given.get(key)!r}: mllama loads FP8 "
                             f"checkpoints with {where} {expected} only (compressed-tensors FP8-dynamic)")


def fp8_scheme(quantization: Any) -> Fp8Scheme:
    """A config's quantization_config -> its Fp8Scheme; ValueError naming the field for anything but
    compressed-tensors FP8 with per-channel weight scales and dynamic per-token activation scales."""
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization_config must be an object, got {quantization!r}")
    method, fmt = quantization.get("quant_method"), quantization.get("format")
    if method != "compressed-tensors" or fmt != "float-quantized":
        raise ValueError(f"this checkpoint is stored quantized with quant_method {method!r}, format {fmt!r}: "
                         f"mllama loads compressed-tensors 'float-quantized' (FP8) checkpoints only; load the bf16 "
                         f"checkpoint instead")
    if quantization.get("kv_cache_scheme") is not None:
        raise ValueError(f"quantization_config.kv_cache_scheme is {quantization['kv_cache_scheme']!r}: mllama "
                         f"loads FP8 checkpoints without a stored K/V cache scheme only")
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"quantization_config.config_groups must hold exactly one group, got {groups!r}")
    (name, group), = groups.items()
    if not isinstance(group, dict) or group.get("targets") != ["Linear"]:
        raise ValueError(f"quantization_config.config_groups.{name}.targets must be ['Linear'], got "
                         f"{group.get('targets') if isinstance(group, dict) else group!r}")
    _check_fields(group.get("weights"), _WEIGHTS, f"config_groups.{name}.weights")
    _check_fields(group.get("input_activations"), _ACTIVATIONS, f"config_groups.{name}.input_activations")
    if group.get("output_activations") is not None:
        raise ValueError(f"quantization_config.config_groups.{name}.output_activations must be null")
    ignore = quantization.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(entry, str) for entry in ignore):
        raise ValueError(f"quantization_config.ignore must be a list of module names, got {ignore!r}")
    return Fp8Scheme(ignore)


def use_fp8(model: nn.Module, scheme: Fp8Scheme, names_of) -> list[str]:
    """Swaps every nn.Linear of `model` that `scheme` does not ignore for an Fp8Linear of the same shape (on the
    same device: the meta device before loading). `names_of(module name)` gives the names a module goes by (its
    own and the checkpoint layouts'). Returns the swapped modules' names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or scheme.ignores(names_of(name)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear(module.in_features, module.out_features, module.bias is not None,
                                        module.weight.device, module.weight.dtype))
        swapped.append(name)
    return swapped
