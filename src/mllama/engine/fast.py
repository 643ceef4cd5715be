"""The fast decode path: static shapes, fused projections, one CUDA graph per (batch, cache length).

It acts on a loaded model from outside: `fuse_projections` re-lays the q/k/v and gate/up weights of the text
layers into single matrices (the original Linear weights become views into them, so the plain model still works
and no memory is added), and `FastDecoder` runs one decode step for a whole batch against the preallocated
`MllamaCache` that the prefill filled. On CUDA the step is captured once as a CUDA graph and replayed.
"""
from __future__ import annotations

import collections
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.cache import MllamaCache
from ..modeling.outputs import ModelOutput
from ..modeling.text import (MllamaCrossAttentionDecoderLayer, MllamaSelfAttentionDecoderLayer,
                             prepare_cross_attention_mask)
from ..modeling.text import apply_rope as _rope
from ..modeling.text import rms_norm as _rms


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


def self_qkv(x, norm_in, wqkv, cos, sin, eps: float, heads: int, kv_heads: int, head_dim: int):
    """Self-attention input of one new token per row: normed, projected (fused q|k|v), rotated."""
    b = x.shape[0]
    q, k, v = F.linear(_rms(x, norm_in, eps), wqkv).split([heads * head_dim, kv_heads * head_dim,
                                                           kv_heads * head_dim], dim=-1)
    q = _rope(q.view(b, 1, heads, head_dim).transpose(1, 2), cos, sin)
    k = _rope(k.view(b, 1, kv_heads, head_dim).transpose(1, 2), cos, sin)
    return q, k, v.view(b, 1, kv_heads, head_dim).transpose(1, 2)


def self_output(x, out, wo, norm_post, w13, w2, eps: float):
    """Output projection, residual, and the MLP (fused gate|up) of a self-attention layer."""
    x = x + F.linear(out.transpose(1, 2).reshape(x.shape[0], 1, -1), wo)
    gate, up = F.linear(_rms(x, norm_post, eps), w13).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w2)


def cross_query(x, norm_in, wq, q_norm, eps: float, heads: int, head_dim: int):
    q = F.linear(_rms(x, norm_in, eps), wq).view(x.shape[0], 1, heads, head_dim)
    return _rms(q, q_norm, eps).transpose(1, 2)


def cross_output(x, out, attn_keep, wo, gate_attn, norm_post, w13, w2, gate_mlp, row_mask, eps: float):
    """attn_keep (or None) zeroes rows of the attention output (Meta's row mask), row_mask those of the MLP."""
    if attn_keep is not None:
        out = out * attn_keep
    x = x + gate_attn.tanh() * F.linear(out.transpose(1, 2).reshape(x.shape[0], 1, -1), wo)
    gate, up = F.linear(_rms(x, norm_post, eps), w13).chunk(2, dim=-1)
    return x + gate_mlp.tanh() * (row_mask[:, 0] * F.linear(F.silu(gate) * up, w2))


def self_layer_step(x, norm_in, wqkv, wo, norm_post, w13, w2, kc, vc, cos, sin, bias, slot,
                    eps: float, heads: int, kv_heads: int, head_dim: int):
    """One self-attention decoder layer for one new token per row; writes k/v at cache slot `slot`.
    A pure function of tensors, so that one compiled version serves every layer."""
    q, k, v = self_qkv(x, norm_in, wqkv, cos, sin, eps, heads, kv_heads, head_dim)
    kc.index_copy_(2, slot, k)
    vc.index_copy_(2, slot, v)
    out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, enable_gqa=heads != kv_heads)
    return self_output(x, out, wo, norm_post, w13, w2, eps)


def cross_layer_step(x, norm_in, wq, q_norm, wo, gate_attn, norm_post, w13, w2, gate_mlp, kc, vc, bias, row_mask,
                     eps: float, heads: int, kv_heads: int, head_dim: int, mask_attention: bool):
    """One cross-attention decoder layer for one new token per row, against fixed vision k/v."""
    q = cross_query(x, norm_in, wq, q_norm, eps, heads, head_dim)
    out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, enable_gqa=heads != kv_heads)
    return cross_output(x, out, row_mask if mask_attention else None, wo, gate_attn, norm_post, w13, w2, gate_mlp,
                        row_mask, eps)


_COMPILED: dict[str, object] = {}


def compiled(name: str, fn):
    """torch.compile'd version of a layer function, shared by all decoders; the eager one if compile fails."""
    if name not in _COMPILED:
        try:
            _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
        except Exception:  # an environment without a working compiler falls back to eager kernels
            _COMPILED[name] = fn
    return _COMPILED[name]


class FastDecoder:
    """One decode step for a batch against static buffers, replayable as one CUDA graph across requests.

    Built for (batch, cache length, vision tokens per row: those of the tiles the prefill keeps, see
    MllamaModel.kept_tiles); its `cache` is the preallocated MllamaCache that the prefill
    writes into. `bind` then copies what varies per request (prompt padding, the vision k/v the prefill
    computed, the cross-attention bias of the last prompt row) into static buffers. Each step writes `tokens`
    [B], `positions` [B] (RoPE positions) and `slot` (the cache slot of the new token, the same for all rows).
    """

    def __init__(self, model: nn.Module, batch: int, length: int, vision_tokens: int = 0,
                 use_graph: bool | None = None, compile: bool | None = None):
        fuse_projections(model)
        self.model = model
        self.text = text_model_of(model)
        self.config = self.text.config
        device, dtype = self.text.norm.weight.device, self.text.norm.weight.dtype
        self.batch, self.length, self.vision_tokens = batch, length, vision_tokens
        self.cache = MllamaCache.allocate(self.config, batch, length, device, dtype)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.key_index = torch.arange(length, device=device)
        self.min = torch.finfo(dtype).min
        cross_layers = [i for i, l in enumerate(self.text.layers) if isinstance(l, MllamaCrossAttentionDecoderLayer)]
        kv_shape = (batch, self.config.num_key_value_heads, vision_tokens, self.config.head_dim)
        self.cross_k = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in cross_layers} \
            if vision_tokens else {}
        self.cross_v = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in cross_layers} \
            if vision_tokens else {}
        self.cross_bias = torch.zeros(batch, 1, 1, vision_tokens, dtype=dtype, device=device)
        self.row_mask = torch.ones(batch, 1, 1, 1, dtype=dtype, device=device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        use_compile = device.type == "cuda" if compile is None else compile
        self.self_fn = compiled("self", self_layer_step) if use_compile else self_layer_step
        self.cross_fn = compiled("cross", cross_layer_step) if use_compile else cross_layer_step
        self.graph = None
        self.logits = None
        self.compile_error: str | None = None

    def reset(self) -> MllamaCache:
        """The cache, emptied, for the next request's prefill."""
        self.cache.seq_length = 0
        self.cache.cross_key.clear()
        self.cache.cross_value.clear()
        self.cache.cross_tiles = None
        return self.cache

    def bind(self, key_valid: torch.Tensor, last_cross_mask: torch.Tensor | None) -> None:
        """After the prefill: copy this request's prompt padding and vision k/v into the static buffers."""
        self.key_valid.fill_(True)
        self.key_valid[:, :key_valid.shape[1]].copy_(key_valid.bool())
        if not self.vision_tokens:
            return
        for i in self.cross_k:
            self.cross_k[i].copy_(self.cache.cross_key[i])
            self.cross_v[i].copy_(self.cache.cross_value[i])
        if last_cross_mask is None:  # images without a mask: every row sees every vision token
            self.cross_bias.zero_()
            self.row_mask.fill_(1)
            return
        keep = self.cache.cross_tiles  # the tiles the prefill kept (padding tiles dropped)
        tiles = last_cross_mask.shape[2] * last_cross_mask.shape[3] if keep is None else keep.numel()
        bias, rows = prepare_cross_attention_mask(last_cross_mask, self.vision_tokens // tiles, self.cross_bias.dtype,
                                                  keep)
        self.cross_bias.copy_(bias)
        self.row_mask.copy_(rows)

    # --------------------------------------------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        text, cfg = self.text, self.config
        eps, hd = cfg.rms_norm_eps, cfg.head_dim
        x = text.embed_tokens(self.tokens)[:, None]                          # [B, 1, D]
        cos, sin = (t[:, None] for t in text.rotary_emb(x, self.positions[:, None]))
        visible = self.key_valid & (self.key_index[None] <= self.slot)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, self.min)
        bias = bias[:, None, None, :]                                        # [B, 1, 1, L]
        mask_attention = cfg.compat == "meta"
        for i, layer in enumerate(text.layers):
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                if not self.vision_tokens:
                    continue  # text only: cross-attention layers are the identity
                a, m = layer.cross_attn, layer.mlp
                x = self.cross_fn(x, layer.input_layernorm.weight, a.q_proj.weight, a.q_norm.weight, a.o_proj.weight,
                                  layer.cross_attn_attn_gate, layer.post_attention_layernorm.weight, m.w13,
                                  m.down_proj.weight, layer.cross_attn_mlp_gate, self.cross_k[i], self.cross_v[i],
                                  self.cross_bias, self.row_mask, eps, a.num_heads, a.num_kv_heads, hd,
                                  mask_attention)
            else:
                a, m = layer.self_attn, layer.mlp
                x = self.self_fn(x, layer.input_layernorm.weight, a.wqkv, a.o_proj.weight,
                                 layer.post_attention_layernorm.weight, m.w13, m.down_proj.weight,
                                 self.cache.key[i], self.cache.value[i], cos, sin, bias, self.slot, eps,
                                 a.num_heads, a.num_kv_heads, hd)
        x = text.norm(x)
        return self.model.lm_head(x[:, -1])                                  # [B, vocab]

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Warm-up (and compilation) runs write the cache slot `slot` points at; the real step overwrites it.
        with torch.cuda.stream(stream):
            try:
                self._step()
            except Exception as e:  # the compiler failed here: the same functions run as eager kernels
                self.compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                warnings.warn(f"torch.compile of the decode step failed ({self.compile_error}); using eager kernels")
                self.self_fn, self.cross_fn = self_layer_step, cross_layer_step
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


class VisionGraphs:
    """The vision encoder replayed as CUDA graphs, one per input shape and valid-token layout.

    A prefill with an image is bound by the host otherwise: the encoder launches about 900 kernels, and on the
    H200 the first token took 79 ms of which the GPU was busy 61.5 ms. The valid-first token order (the only
    host read of the encoder) is computed before each replay; what it decides about shapes (the valid counts)
    is part of the graph's key, the order itself an input. Graphs share one memory pool and write their output
    into one buffer (sized for the largest batch of images seen), so their memory is that of the largest encoder
    run however many shapes have been seen; a caller uses the output before the next call.
    Call it as the model's `vision_runner`; with use_graphs False it runs the same code eagerly (for CPU tests).
    """

    MAX_GRAPHS = 16

    def __init__(self, vision_model: nn.Module, use_graphs: bool = True):
        self.vision = vision_model
        self.use_graphs = use_graphs
        self.graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self.pool = None  # the graphs' shared memory pool, made with the output buffer
        self.out: torch.Tensor | None = None  # flat output buffer shared by the graphs

    def _run(self, pixels, ids, order, inverse, groups, b: int, n: int):
        x = self.vision.embed(pixels, ids)
        return self.vision._forward_reordered(x, ids.reshape(b * n, 1), (order, inverse, groups), b, n)

    def _plan(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor):
        """The valid-first order, computed on the host (a mask already on the GPU is read back once), and the key
        of the graph that replays it."""
        from ..modeling.vision import vision_token_order

        vm = self.vision
        b, n, t = pixel_values.shape[:3]
        tile_mask = aspect_ratio_mask.reshape(b * n, t).cpu()
        order, inverse, groups = vision_token_order(tile_mask, vm.num_patches, vm.num_pad)
        layout = tuple((count, None if rows is None else tuple(rows.tolist())) for count, rows in groups)
        key = (tuple(pixel_values.shape), tuple(aspect_ratio_ids.shape), layout)
        return order, inverse, groups, key

    def captured(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                 aspect_ratio_mask: torch.Tensor) -> bool:
        """Whether a call with these inputs would replay a graph captured before (rather than capture one)."""
        return not self.use_graphs or not self.vision.exact_reorder or \
            self._plan(pixel_values, aspect_ratio_ids, aspect_ratio_mask)[3] in self.graphs

    def __call__(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                 aspect_ratio_mask: torch.Tensor, **unused) -> ModelOutput:
        vm = self.vision
        weight = vm.patch_embedding.weight
        if not vm.exact_reorder:  # the mask form was asked for: nothing to replay
            return vm(pixel_values, aspect_ratio_ids, aspect_ratio_mask.to(weight.device))
        b, n = pixel_values.shape[:2]
        order, inverse, groups, key = self._plan(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        pixels = pixel_values.to(weight.device, weight.dtype)
        ids = aspect_ratio_ids.to(weight.device)
        device = weight.device
        order, inverse = order.to(device, non_blocking=True), inverse.to(device, non_blocking=True)
        groups = [(count, None if rows is None else rows.to(device, non_blocking=True)) for count, rows in groups]
        if not self.use_graphs:
            return self._run(pixels, ids, order, inverse, groups, b, n)
        self.reserve(b * n)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            while len(self.graphs) >= self.MAX_GRAPHS:
                self.graphs.popitem(last=False)
            self.graphs[key] = self._capture(pixels, ids, order, inverse, groups, b, n)
        graph, inputs, out = self.graphs[key]
        for static, value in zip(inputs[:4], (pixels, ids, order, inverse)):
            static.copy_(value)
        for static, (_, rows) in zip(inputs[4], groups):
            if rows is not None:
                static.copy_(rows)
        graph.replay()
        return ModelOutput(last_hidden_state=out)

    def reserve(self, images: int) -> None:
        """An output buffer for `images` images at once. A server reserves its largest prefill group up front, so
        that the buffer never has to grow (which drops every graph) while it serves."""
        vm = self.vision
        size = images * vm.max_num_tiles * vm.num_patches * vm.config.vision_output_dim
        if self.out is not None and self.out.numel() >= size:
            return
        weight = vm.patch_embedding.weight
        self.graphs.clear()
        self.out = None
        torch.cuda.empty_cache()  # the old pool's memory (freed with its graphs), then a new pool
        self.pool = torch.cuda.graph_pool_handle()
        self.out = torch.empty(size, dtype=weight.dtype, device=weight.device)

    def _capture(self, pixels, ids, order, inverse, groups, b: int, n: int):
        inputs = (pixels.clone(), ids.clone(), order.clone(), inverse.clone(),
                  [None if rows is None else rows.clone() for _, rows in groups])
        static_groups = [(count, rows) for (count, _), rows in zip(groups, inputs[4])]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # first calls (attention plans, cuBLAS set-up) outside the capture
            for _ in range(2):
                self._run(*inputs[:4], static_groups, b, n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            result = self._run(*inputs[:4], static_groups, b, n).last_hidden_state
            out = self.out[:result.numel()].view(result.shape)
            out.copy_(result)
        return graph, inputs, out


def text_prefill(model: nn.Module, ids, mask, positions, cross_mask=None, states=None, keep=None):
    """The text part of a prefill, into a fresh cache as wide as the prompts: -> (last-row logits, cache).
    `states`/`keep`: vision tokens encoded beforehand (MllamaModel.encode_images) and the tiles they hold, or None
    for text only. The ids must have been checked (MllamaModel.check_image_inputs, or the text model's
    _check_ids): this forward does not read them on the host."""
    param = next(model.parameters())
    cache = MllamaCache.allocate(model.config, ids.shape[0], ids.shape[1], param.device, param.dtype)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, ids_checked=True)
    if states is not None:
        inputs.update(cross_attention_mask=cross_mask, cross_attention_states=states, cross_tiles=keep)
    return model(cache=cache, use_cache=True, logits_to_keep=1, **inputs).logits[:, -1], cache


class PrefillGraphs:
    """`text_prefill` of one-request prefills replayed as CUDA graphs, one per (prompt width, vision tokens).

    Run eagerly, the text part of a prefill launches about 1,700 kernels and the host cannot keep up with the
    GPU: on the H200 a one-image request's first token came 10-20 ms after the GPU's own ~61 ms of work
    ("engine_prefill_profile" in bench/results/2026-11-29-h200-serve-load-s4-overlap.json). A replay is one
    launch. Inputs are copied into static buffers; the outputs (last-row logits and the prompt's cache) are the
    graph's own static tensors, overwritten by its next replay, so a caller uses them before then. The graphs
    share one memory pool for their intermediates. Prompt ids must be checked by the caller (the eager forward's
    check reads them on the host, which a graph cannot do).
    """

    def __init__(self, model: nn.Module, budget_bytes: int = 2 * 2**30, use_graphs: bool = True):
        self.model = model
        self.use_graphs = use_graphs  # False: the same calls, run eagerly (for CPU tests)
        self.graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self.pool = None
        # Each graph keeps its outputs (the prompt's caches: up to ~350 MB at 1,024 tokens and four tiles): the
        # least recently used graphs are dropped to keep their total under the budget.
        self.budget_bytes = budget_bytes
        self.failed: str | None = None  # why a capture failed (the caller then stays eager)

    def _forward(self, static: tuple):
        return text_prefill(self.model, *static)

    @staticmethod
    def _bytes(logits: torch.Tensor, cache: MllamaCache) -> int:
        tensors = [logits, *cache.key.values(), *cache.value.values(), *cache.cross_key.values(),
                   *cache.cross_value.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, ids, mask, positions, cross_mask=None, states=None, keep=None):
        """-> (logits [rows, vocab], MllamaCache of the prompt), the same as the eager forward; None if a graph
        could not be captured (self.failed says why), and the caller runs the eager forward."""
        if self.failed is not None:
            return None
        given = (ids, mask, positions, cross_mask, states, keep)
        if not self.use_graphs:
            return self._forward(given)
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in given)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            captured = self._capture(given)
            if captured is None:
                return None
            self.graphs[key] = captured
            while len(self.graphs) > 1 and sum(g[-1] for g in self.graphs.values()) > self.budget_bytes:
                self.graphs.popitem(last=False)
        graph, static, logits, cache, _ = self.graphs[key]
        for buffer, value in zip(static, given):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return logits, cache

    def _capture(self, given: tuple):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static = tuple(None if t is None else t.clone() for t in given)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):  # first calls (attention plans, cuBLAS set-up) outside the capture
                self._forward(static)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph, pool=self.pool):
                logits, cache = self._forward(static)
        except Exception as e:  # noqa: BLE001 - e.g. a host read inside the forward, or out of memory for the
            # graph's own outputs: stay eager from here on
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"capturing the prefill as a CUDA graph failed ({self.failed}); prefills run eagerly")
            return None
        return graph, static, logits, cache, self._bytes(logits, cache)


def vision_graphs(model: nn.Module) -> VisionGraphs | None:
    """The model's VisionGraphs (made on first use), or None for a model without a vision encoder."""
    inner = getattr(model, "model", None)
    vision = getattr(inner, "vision_model", None)
    if vision is None:
        return None
    runner = model.__dict__.get("_vision_graphs")
    if runner is None:
        runner = model.__dict__["_vision_graphs"] = VisionGraphs(vision,
                                                                 vision.patch_embedding.weight.device.type == "cuda")
    return runner


def length_bucket(length: int) -> int:
    # Cache lengths are rounded up so that requests of similar size share a decoder (and its CUDA graph).
    return -(-length // 256) * 256


WORKSPACE_BYTES = 2 * 2**30  # activations of the prefill and the vision encoder, beyond the caches


def cache_bytes(config, batch: int, length: int, vision_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a decoder's static buffers: self-attention K/V over `length`, cross K/V over the vision tokens."""
    text = getattr(config, "text_config", config)
    per_token = 2 * text.num_key_value_heads * text.head_dim * torch.finfo(dtype).bits // 8
    cross_layers = len(text.present_cross_attention_layers)
    self_layers = text.num_hidden_layers - cross_layers
    return batch * per_token * (self_layers * length + cross_layers * vision_tokens)


def check_fits(model: nn.Module, batch: int, length: int, vision_tokens: int, dtype: torch.dtype,
               device: torch.device) -> None:
    """Refuses, before anything is allocated, a request whose caches and workspace exceed the free GPU memory."""
    if device.type != "cuda":
        return
    need = cache_bytes(model.config, batch, length, vision_tokens, dtype) + WORKSPACE_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if need > free:
        raise ValueError(f"this request needs {need / 2**30:.1f} GiB of GPU memory for its caches and workspace "
                         f"(batch {batch}, {length} tokens, {vision_tokens} vision tokens per row) but only "
                         f"{free / 2**30:.1f} GiB are free: use a smaller batch, fewer new tokens or fewer images")


def unsupported(model: nn.Module) -> str | None:
    """Why the fast path's layer functions cannot compute this model, or None. They are written for the MLP the
    published checkpoints use (SiLU gate): another hidden_act would be computed wrongly, so it is refused; so is
    dynamic RoPE, whose frequencies follow each call's positions where the captured graphs fix them; and an
    "eager" attn_implementation, since they compute attention with SDPA."""
    text = getattr(model.config, "text_config", model.config)
    parts = (text, getattr(model.config, "vision_config", None))
    if any(getattr(part, "_attn_implementation", None) == "eager" for part in parts):
        return "the fast path and the serving engine compute attention with SDPA, and this model's " \
               "attn_implementation is 'eager' (set_attn_implementation('sdpa') allows them)"
    act = getattr(text, "hidden_act", "silu")
    if act != "silu":
        return f"the fast path and the serving engine compute SiLU MLPs, and this model's hidden_act is {act!r}"
    if getattr(text, "rope_parameters", {}).get("rope_type") == "dynamic":
        return "the fast path and the serving engine capture fixed RoPE frequencies, and this model's RoPE is 'dynamic'"
    return None


def get_decoder(model: nn.Module, batch: int, length: int, vision_tokens: int, keep: int = 4) -> FastDecoder:
    """A decoder for this shape, reused across requests (the model keeps the `keep` most recent ones)."""
    if (reason := unsupported(model)) is not None:
        raise ValueError(f"{reason}: generate with fast=False")
    decoders = model.__dict__.setdefault("_fast_decoders", {})
    compat = getattr(model.config, "compat", "meta")  # baked into the captured graph
    key = (batch, length_bucket(length), vision_tokens, compat)
    if key in decoders:
        decoders[key] = decoders.pop(key)  # most recently used last
    else:
        while len(decoders) >= keep:
            decoders.pop(next(iter(decoders)))
        weight = text_model_of(model).norm.weight
        if weight.device.type == "cuda":
            torch.cuda.empty_cache()  # evicted decoders' buffers count as free below
        check_fits(model, batch, key[1], vision_tokens, weight.dtype, weight.device)
        decoders[key] = FastDecoder(model, batch, key[1], vision_tokens)
    return decoders[key]
