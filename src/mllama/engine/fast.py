"""The fast decode path: static shapes, fused projections, one CUDA graph per (batch, cache length).

It acts on a loaded model from outside: `fuse_projections` re-lays the q/k/v and gate/up weights of the text
layers into single matrices (the original Linear weights become views into them, so the plain model still works
and no memory is added), and `FastDecoder` runs one decode step for a whole batch against the preallocated
`MllamaCache` that the prefill filled. On CUDA the step is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.cache import MllamaCache
from ..modeling.text import (MllamaCrossAttentionDecoderLayer, MllamaSelfAttentionDecoderLayer,
                             prepare_cross_attention_mask)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenates the weights of `linears` along the output dim and makes each weight a view of the result."""
    fused = torch.cat([l.weight.detach() for l in linears], dim=0)
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=linear.weight.requires_grad)
        start += rows
    return fused


def fuse_projections(model: nn.Module) -> None:
    """Once per model: wqkv for self-attention, wkv for cross-attention, w13 (gate|up) for every MLP."""
    for module in model.modules():
        if getattr(module, "_fused", False):
            continue
        if isinstance(module, MllamaSelfAttentionDecoderLayer):
            attn = module.self_attn
            attn.wqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            module.mlp.w13 = _fuse([module.mlp.gate_proj, module.mlp.up_proj])
            module._fused = True
        elif isinstance(module, MllamaCrossAttentionDecoderLayer):
            module.mlp.w13 = _fuse([module.mlp.gate_proj, module.mlp.up_proj])
            module._fused = True


def text_model_of(model: nn.Module) -> nn.Module:
    inner = model.model
    return getattr(inner, "language_model", inner)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    return (xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, mlp.w13).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)


class FastDecoder:
    """One decode step for a batch, on the buffers of a prefilled preallocated cache.

    Static inputs (written before each step): `tokens` [B], `positions` [B] (RoPE positions), `slot` [1] (the
    cache slot the step writes, the same for every row). The self-attention mask is recomputed inside the step from
    `key_valid` [B, L] (prompt padding) and `slot`; the cross-attention bias and row mask are those of the last
    prompt row, fixed for the request.
    """

    def __init__(self, model: nn.Module, cache: MllamaCache, key_valid: torch.Tensor,
                 last_cross_mask: torch.Tensor | None, use_graph: bool | None = None):
        fuse_projections(model)
        self.model = model
        self.text = text_model_of(model)
        self.cache = cache
        self.config = self.text.config
        device, dtype = self.text.norm.weight.device, self.text.norm.weight.dtype
        batch, length = key_valid.shape
        self.length = length
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = key_valid.bool().to(device)
        self.key_index = torch.arange(length, device=device)
        self.min = torch.finfo(dtype).min
        self.cross_bias = self.row_mask = None
        if cache.cross_key and last_cross_mask is not None:
            tokens_per_tile = cache.cross_length() // (last_cross_mask.shape[2] * last_cross_mask.shape[3])
            self.cross_bias, self.row_mask = prepare_cross_attention_mask(last_cross_mask.to(device),
                                                                          tokens_per_tile, dtype)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        self.logits = None

    # --------------------------------------------------------------------------------------------------------
    def _self_attention(self, layer, x, cos, sin, bias):
        attn, cfg = layer.self_attn, self.config
        b = x.shape[0]
        q, k, v = F.linear(x, attn.wqkv).split([attn.num_heads * attn.head_dim,
                                                attn.num_kv_heads * attn.head_dim,
                                                attn.num_kv_heads * attn.head_dim], dim=-1)
        q = _rope(q.view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        kc, vc = self.cache.key[attn.layer_idx], self.cache.value[attn.layer_idx]
        kc.index_copy_(2, self.slot, k)
        vc.index_copy_(2, self.slot, v)
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, enable_gqa=attn.num_heads != attn.num_kv_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))

    def _cross_attention(self, layer, x):
        attn = layer.cross_attn
        b = x.shape[0]
        q = attn.q_norm(attn.q_proj(x).view(b, 1, attn.num_heads, attn.head_dim)).transpose(1, 2)
        k, v = self.cache.cross_key[attn.layer_idx], self.cache.cross_value[attn.layer_idx]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.cross_bias,
                                             enable_gqa=attn.num_heads != attn.num_kv_heads)
        if self.row_mask is not None and self.config.compat == "meta":
            out = out * self.row_mask
        return attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))

    def _step(self) -> torch.Tensor:
        text, eps = self.text, self.config.rms_norm_eps
        x = text.embed_tokens(self.tokens)[:, None]                          # [B, 1, D]
        cos, sin = text.rotary_emb(self.positions[:, None])
        visible = self.key_valid & (self.key_index[None] <= self.slot)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, self.min)
        bias = bias[:, None, None, :]                                        # [B, 1, 1, L]
        for i, layer in enumerate(text.layers):
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if not self.cache.has_cross(i):
                    continue
                x = x + layer.cross_attn_attn_gate.tanh() * self._cross_attention(layer, _rms(
                    x, layer.input_layernorm.weight, eps))
                h = _mlp(layer.mlp, _rms(x, layer.post_attention_layernorm.weight, eps))
                if self.row_mask is not None:
                    h = self.row_mask[:, 0] * h
                x = x + layer.cross_attn_mlp_gate.tanh() * h
            else:
                x = x + self._self_attention(layer, _rms(x, layer.input_layernorm.weight, eps), cos, sin, bias)
                x = x + _mlp(layer.mlp, _rms(x, layer.post_attention_layernorm.weight, eps))
        x = text.norm(x)
        return self.model.lm_head(x[:, -1])                                  # [B, vocab]

    # --------------------------------------------------------------------------------------------------------
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # The warm-up runs write the cache slot `slot` points at, which the real step then overwrites.
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int | torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions.reshape(-1))
        if isinstance(slot, torch.Tensor):
            self.slot.copy_(slot.reshape(1))
        else:
            self.slot.fill_(slot)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits
