"""generate's fast path: static caches, fused projections and CUDA graphs, over the model's own layers.

`FastDecoder` runs one decode step for a whole batch (engine.decode.decode_step) against the preallocated
`MllamaCache` that the prefill filled, captured once as a CUDA graph on CUDA. `VisionGraphs` and `PrefillGraphs`
replay the vision encoder and one-request text prefills as graphs (used by generate and by the server's engine).
Every graph goes through engine.graphs.GraphCache.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..modeling.cache import MllamaCache, kv_bytes_per_token
from ..modeling.outputs import ModelOutput
from ..modeling.text import MllamaCrossAttentionDecoderLayer, prepare_cross_attention_mask
from .decode import (FixedCrossKV, LayerCalls, SlotKV, decode_step, fuse_projections, text_model_of,
                     unsupported)
from .graphs import GraphCache, reason_of


# What the fast path keeps per model (its decoders, its vision graphs), outside the model: gone with the model.
_STATE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def engine_state(model: nn.Module) -> dict:
    return _STATE.setdefault(model, {})


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
        self.caches = {i: SlotKV(self.cache.key[i], self.cache.value[i], self.slot) for i in self.cache.key}
        self.caches.update({i: FixedCrossKV(self.cross_k[i], self.cross_v[i]) for i in self.cross_k})
        self.cross_bias = torch.zeros(batch, 1, 1, vision_tokens, dtype=dtype, device=device)
        self.row_mask = torch.ones(batch, 1, 1, 1, dtype=dtype, device=device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        use_compile = device.type == "cuda" if compile is None else compile
        # its own compiled code, for its own shapes (static: the fastest kernels at this batch and length)
        self.calls = LayerCalls(f"fast_decode_b{batch}_l{length}_v{vision_tokens}", use_compile, dynamic=False)
        self.graphs = GraphCache("generate's decode step", max_graphs=1)
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

    def _step(self) -> torch.Tensor:
        visible = self.key_valid & (self.key_index[None] <= self.slot)
        bias = torch.zeros(visible.shape, dtype=self.cross_bias.dtype, device=visible.device)
        bias = bias.masked_fill_(~visible, self.min)[:, None, None, :]        # [B, 1, 1, L]
        return decode_step(self.model, self.tokens, self.positions, self.caches, self_mask=bias,
                           cross_mask=self.cross_bias, row_mask=self.row_mask, vision=bool(self.vision_tokens),
                           call=self.calls)

    def _compiler_failed(self, error: BaseException) -> None:
        self.compile_error = reason_of(error)
        self.calls.eager()

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
        # Warm-up (and compilation) runs write the cache slot `slot` points at; the real step overwrites it.
        entry = self.graphs.get(0) or self.graphs.capture(0, self._step, on_warm_up_error=self._compiler_failed)
        return self._step() if entry is None else entry.replay()


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
        self.graphs = GraphCache("the vision encoder", max_graphs=self.MAX_GRAPHS)
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
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, pixels, ids, order, inverse, groups, b, n)
            if entry is None:  # (the reason is in self.graphs.failed)
                return self._run(pixels, ids, order, inverse, groups, b, n)
        inputs = entry.state
        for static, value in zip(inputs[:4], (pixels, ids, order, inverse)):
            static.copy_(value)
        for static, (_, rows) in zip(inputs[4], groups):
            if rows is not None:
                static.copy_(rows)
        return ModelOutput(last_hidden_state=entry.replay())

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
        torch.cuda.empty_cache()  # the old pool's memory (freed with its graphs); the next capture makes a new one
        self.out = torch.empty(size, dtype=weight.dtype, device=weight.device)

    def _capture(self, key, pixels, ids, order, inverse, groups, b: int, n: int):
        inputs = (pixels.clone(), ids.clone(), order.clone(), inverse.clone(),
                  [None if rows is None else rows.clone() for _, rows in groups])
        static_groups = [(count, rows) for (count, _), rows in zip(groups, inputs[4])]

        def run() -> torch.Tensor:
            result = self._run(*inputs[:4], static_groups, b, n).last_hidden_state
            out = self.out[:result.numel()].view(result.shape)
            out.copy_(result)
            return out

        return self.graphs.capture(key, run, state=inputs)


def text_prefill(model: nn.Module, ids, mask, positions, cross_mask=None, states=None, keep=None, cross=None):
    """The text part of a prefill, into a fresh cache as wide as the prompts: -> (last-row logits, cache).
    `states`/`keep`: vision tokens encoded beforehand (MllamaModel.encode_images) and the tiles they hold, or None
    for text only; or `cross` = (keys, values, keep): the images' cross-attention K/V computed before (per cross
    layer [rows, kv_heads, tokens, head_dim]: the server's image cache), placed in the cache as a later step
    finds them. The ids must have been checked (MllamaModel.check_image_inputs, or the text model's
    _check_ids): this forward does not read them on the host."""
    param = next(model.parameters())
    cache = MllamaCache.allocate(model.config, ids.shape[0], ids.shape[1], param.device, model.dtype)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, ids_checked=True)
    if states is not None:
        inputs.update(cross_attention_mask=cross_mask, cross_attention_states=states, cross_tiles=keep)
    elif cross is not None:
        cache.cross_key, cache.cross_value, cache.cross_tiles = cross
        inputs.update(cross_attention_mask=cross_mask)
    return model(cache=cache, use_cache=True, logits_to_keep=1, **inputs).logits[:, -1], cache


class PrefillGraphs:
    """`text_prefill` of one-request prefills replayed as CUDA graphs, one per (prompt width, vision tokens).

    Run eagerly, the text part of a prefill launches about 1,700 kernels and the host cannot keep up with the
    GPU: on the H200 a one-image request's first token came 10-20 ms after the GPU's own ~61 ms of work
    ("engine_prefill_profile" in bench/results/2026-11-29-h200-serve-load-s4-overlap.json). A replay is one
    launch. Inputs are copied into static buffers; the outputs (last-row logits and the prompt's cache) are the
    graph's own static tensors, overwritten by its next replay, so a caller uses them before then. Each graph
    keeps its outputs (the prompt's caches: up to ~350 MB at 1,024 tokens and four tiles): past `budget_bytes`
    the least recently used graphs are dropped. Prompt ids must be checked by the caller (the eager forward's
    check reads them on the host, which a graph cannot do).
    """

    def __init__(self, model: nn.Module, budget_bytes: int = 2 * 2**30, use_graphs: bool = True):
        self.model = model
        self.use_graphs = use_graphs  # False: the same calls, run eagerly (for CPU tests)
        self.graphs = GraphCache("the text prefill", max_graphs=64, budget_bytes=budget_bytes, warm_ups=1)

    @property
    def failed(self) -> str | None:
        return self.graphs.failed

    @staticmethod
    def _bytes(output) -> int:
        logits, cache = output
        tensors = [logits, *cache.key.values(), *cache.value.values(), *cache.cross_key.values(),
                   *cache.cross_value.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, ids, mask, positions, cross_mask=None, states=None, keep=None, cross=None):
        """-> (logits [rows, vocab], MllamaCache of the prompt), the same as the eager forward (text_prefill, with
        the same arguments); None if a graph could not be captured (self.failed says why), and the caller runs the
        eager forward. `cross` (images' K/V from the image cache) is copied into the graph's own buffers."""
        if self.failed is not None:
            return None
        if not self.use_graphs:
            return text_prefill(self.model, ids, mask, positions, cross_mask, states, keep, cross)
        layers, (keys, values, cross_keep) = ((), (None, None, None)) if cross is None else (tuple(cross[0]), cross)
        given = (ids, mask, positions, cross_mask, states, keep, cross_keep,
                 *(keys[i] for i in layers), *(values[i] for i in layers))
        key = (layers, *(None if t is None else (tuple(t.shape), t.dtype) for t in given))
        entry = self.graphs.get(key)
        if entry is None:
            static = tuple(None if t is None else t.clone() for t in given)

            def run():
                kv = static[7:]
                images = None if cross is None else (dict(zip(layers, kv[:len(layers)])),
                                                     dict(zip(layers, kv[len(layers):])), static[6])
                return text_prefill(self.model, *static[:6], cross=images)

            entry = self.graphs.capture(key, run, state=static, nbytes=self._bytes)
            if entry is None:
                return None
        for buffer, value in zip(entry.state, given):
            if buffer is not None:
                buffer.copy_(value)
        return entry.replay()


def vision_graphs(model: nn.Module) -> VisionGraphs | None:
    """The model's VisionGraphs (made on first use), or None for a model without a vision encoder."""
    inner = getattr(model, "model", None)
    vision = getattr(inner, "vision_model", None)
    if vision is None:
        return None
    state = engine_state(model)
    runner = state.get("vision_graphs")
    if runner is None:
        runner = state["vision_graphs"] = VisionGraphs(vision,
                                                                 vision.patch_embedding.weight.device.type == "cuda")
    return runner


def length_bucket(length: int) -> int:
    # Cache lengths are rounded up so that requests of similar size share a decoder (and its CUDA graph).
    return -(-length // 256) * 256


WORKSPACE_BYTES = 2 * 2**30  # activations of the prefill and the vision encoder, beyond the caches


def cache_bytes(config, batch: int, length: int, vision_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a decoder's static buffers: self-attention K/V over `length`, cross K/V over the vision tokens."""
    text = getattr(config, "text_config", config)
    per_token = kv_bytes_per_token(text, dtype)
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


def get_decoder(model: nn.Module, batch: int, length: int, vision_tokens: int, keep: int = 4) -> FastDecoder:
    """A decoder for this shape, reused across requests (the model keeps the `keep` most recent ones)."""
    if (reason := unsupported(model)) is not None:
        raise ValueError(f"{reason}: generate with fast=False")
    decoders = engine_state(model).setdefault("decoders", {})
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
