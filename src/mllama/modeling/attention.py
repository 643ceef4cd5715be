"""The attention product shared by the text and vision layers, in the two implementations a config can name.

"sdpa" (the default) calls torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel (flash,
memory-efficient, cuDNN) where the inputs allow; "eager" writes the softmax out, in the order transformers' eager
path uses (scores in the input dtype, softmax in fp32, cast back), so both libraries' eager outputs match closely.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, implementation: str | None,
           weights: list | None = None) -> torch.Tensor:
    """q [B, H, S, hd] over k, v [B, kv_heads, K, hd] with an additive `mask` (broadcast to [B, H, S, K]) ->
    [B, H, S, hd]. `implementation` is the config's `_attn_implementation` (None = sdpa, the default). With a
    `weights` list (output_attentions) the softmax [B, H, S, K] is appended to it; no SDPA kernel forms it, so such
    a call runs the eager form whatever the implementation."""
    if implementation != "eager" and weights is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if weights is not None:
        weights.append(probs)
    return probs @ v
