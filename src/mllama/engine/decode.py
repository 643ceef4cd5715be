"""One decode step (one new token per row) through the model's own layers, for generate's fast path and the server.

Nothing here computes a layer: `decode_step` calls the text model's decoder layers (modeling/text.py), whose
attention goes through the cache each layer is given (`attend` / `cross_attend`). The engines act from outside:

- `fuse_projections` gives the layers one q|k|v and one gate|up matrix (the Linear weights become views into
  them: no memory is added, the state dict is unchanged), which the layers use when present; FP8 layers
  (mllama.quantization) fuse their per-channel scales alongside, so the fused product is the same FP8 product;
- the caches decide the layout: static buffers written at one slot (generate, below) or pages (engine.paged);
- `LayerCalls` compiles the layer calls: one compiled function serves every layer of a kind, since the layers'
  parameters and caches are its inputs (the cache views never key on a layer's index);
- the step is then captured as a CUDA graph (engine.graphs).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling.attention import attend
from ..modeling.text import MllamaCrossAttentionDecoderLayer, MllamaSelfAttentionDecoderLayer
from ..quantization import Fp8Linear


def text_model_of(model: nn.Module) -> nn.Module:
    inner = model.model
    return getattr(inner, "language_model", inner)


def _fuse(linears: list[nn.Module], name: str = "weight") -> torch.Tensor:
    """Concatenates tensor `name` of `linears` along the output dim and makes each one a view of the result."""
    fused = torch.cat([getattr(l, name).detach() for l in linears], dim=0)
    start = 0
    for linear in linears:
        old = getattr(linear, name)
        setattr(linear, name, nn.Parameter(fused[start:start + old.shape[0]], requires_grad=old.requires_grad))
        start += old.shape[0]
    return fused


def _fused(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, per-channel scales or None) of `linears` as one matrix: FP8 layers' scales are per output
    channel, so concatenated with the weights they give the same products."""
    if all(isinstance(l, Fp8Linear) for l in linears):
        return _fuse(linears), _fuse(linears, "weight_scale")
    if any(isinstance(l, Fp8Linear) for l in linears):
        raise ValueError("cannot fuse FP8 and unquantized projections of one layer into one matrix")
    return _fuse(linears), None


def _is_view_of(fused: torch.Tensor | None, first: nn.Linear) -> bool:
    return fused is not None and fused.device == first.weight.device and \
        fused.data_ptr() == first.weight.data_ptr()


def fuse_projections(model: nn.Module) -> None:
    """q|k|v of every self-attention layer and gate|up of every MLP in one matrix each. Run again after the model
    moved (its weights are no longer views then), it fuses them anew."""
    for module in model.modules():
        if isinstance(module, MllamaSelfAttentionDecoderLayer):
            attn = module.self_attn
            if not _is_view_of(attn.wqkv, attn.q_proj):
                attn.wqkv, attn.wqkv_scale = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        if isinstance(module, (MllamaSelfAttentionDecoderLayer, MllamaCrossAttentionDecoderLayer)):
            mlp = module.mlp
            if not _is_view_of(mlp.w13, mlp.gate_proj):
                mlp.w13, mlp.w13_scale = _fused([mlp.gate_proj, mlp.up_proj])


def unsupported(model: nn.Module) -> str | None:
    """Why the fast path and the serving engine cannot run this model, or None. Their caches attend with SDPA or
    paged kernels, which form no attention weights (an "eager" attn_implementation is refused), and their steps
    are captured with fixed RoPE frequencies (dynamic RoPE, whose frequencies follow each call's positions, is
    refused). Everything else is the model's own layers, so any activation they support runs here too."""
    text = getattr(model.config, "text_config", model.config)
    parts = (text, getattr(model.config, "vision_config", None))
    if any(getattr(part, "_attn_implementation", None) == "eager" for part in parts):
        return "the fast path and the serving engine compute attention with SDPA, and this model's " \
               "attn_implementation is 'eager' (set_attn_implementation('sdpa') allows them)"
    if getattr(text, "rope_parameters", {}).get("rope_type") == "dynamic":
        return "the fast path and the serving engine capture fixed RoPE frequencies, and this model's RoPE is 'dynamic'"
    adapted = next((name for name, module in model.named_modules() if hasattr(module, "base_layer")), None)
    if adapted is not None:
        return f"the fast path and the serving engine fuse the projections' weights, and this model has adapter " \
               f"layers ({adapted}): generate with fast=False, or merge the adapters into the weights first " \
               f"(merge_and_unload())"
    return None


RECOMPILE_LIMIT = 64


class LayerCalls:
    """How `decode_step` calls a layer: directly, or through torch.compile. Each instance compiles its own code
    (a code object of its own, so its shapes never count against another's recompile limit); a compiler that
    fails is reported by the first call (the caller then switches to `eager()`)."""

    def __init__(self, name: str, compile: bool, dynamic: bool | None = None):
        def call(layer, *args):
            return layer(*args)

        call.__code__ = call.__code__.replace(co_name=name)
        self.name, self.compiled = name, compile
        if compile:
            # Each (layer kind, rows range the layers branch on, image or not) is a variant of the one code object:
            # the FP8 products alone branch at 16 and 64 rows, and the serving engine's 90B passed dynamo's default
            # of 8 at its warm-up (then every step ran eagerly). The limit is global in torch; raised, never lowered.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        self.fn = torch.compile(call, dynamic=dynamic, fullgraph=True) if compile else call

    def eager(self) -> None:
        self.fn, self.compiled = (lambda layer, *args: layer(*args)), False

    def __call__(self, layer, *args):
        return self.fn(layer, *args)


EAGER = LayerCalls("eager_layer", compile=False)


def decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, caches: dict, *,
                self_mask: torch.Tensor | None = None, cross_mask: torch.Tensor | None = None,
                row_mask: torch.Tensor | None = None, vision: bool = True, call: LayerCalls = EAGER) -> torch.Tensor:
    """tokens [B] at RoPE positions [B] through every layer -> logits [B, vocab]. caches[i] is layer i's cache
    (self: `attend`, cross: `cross_attend`); the masks are those the layers take (None where a cache needs
    none); vision False skips the cross-attention layers (no row sees an image: they are the identity)."""
    text = text_model_of(model)
    x = text.embed_tokens(tokens)[:, None]                                  # [B, 1, hidden]
    cos, sin = (t[:, None] for t in text.rotary_emb(x, positions[:, None]))
    for i, layer in enumerate(text.layers):
        if isinstance(layer, MllamaCrossAttentionDecoderLayer):
            if vision:
                x = call(layer, x, None, cross_mask, row_mask, caches[i])
        else:
            x = call(layer, x, cos, sin, self_mask, caches[i])
    return model.lm_head(text.norm(x)[:, 0])


class SlotKV:
    """One self-attention layer's K/V in static buffers [B, kv_heads, L, head_dim] (generate's fast path): the
    step writes every row's new token at `slot` (a one-element tensor: generate's rows advance together) and
    attends over all L positions under the step's mask, which hides the slots not written yet and the padding."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, slot: torch.Tensor):
        self.key, self.value, self.slot = key, value, slot

    def attend(self, layer_idx, q, k, v, mask, implementation=None, weights=None) -> torch.Tensor:
        self.key.index_copy_(2, self.slot, k)
        self.value.index_copy_(2, self.slot, v)
        return attend(q, self.key, self.value, mask, implementation)


class FixedCrossKV:
    """One cross-attention layer's vision K/V in static buffers [B, kv_heads, vision tokens, head_dim]."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def cross_attend(self, layer_idx, q, mask, implementation=None, weights=None) -> torch.Tensor:
        return attend(q, self.key, self.value, mask, implementation)
