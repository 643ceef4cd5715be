"""Continuous batching on the plain model: a fixed set of slots that requests join and leave at every step.

Each request is prefilled alone (batch 1, the plain model forward with a temporary cache), then its K/V are
copied into a slot of one preallocated buffer set. A decode step runs every slot up to the highest busy one
together, one token each, with per-row positions, per-row cache write positions and per-row masks; rows of
free slots in between are computed and ignored (cheaper than gathering the busy rows' caches every step).

One background thread owns the model and the buffers; callers talk to it through `BatchEngine.submit` (any
thread) and receive events through the `emit` callback of their request (called on the engine thread).
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..generation import SamplingParams, TextDecoder, next_tokens
from ..modeling.cache import MllamaCache
from ..modeling.text import MllamaCrossAttentionDecoderLayer, prepare_cross_attention_mask
from .fast import (PrefillGraphs, cross_output, cross_query, fuse_projections, length_bucket, self_output,
                   self_qkv, text_model_of, text_prefill, unsupported, vision_graphs)


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class RequestTooLong(ValueError):
    """prompt + max_tokens exceeds the context the slots were allocated for."""


def check_length(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Raises RequestTooLong, saying what would fit, when prompt + max_tokens exceeds the slots' context."""
    if prompt_len + max_tokens > max_model_len:
        raise RequestTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                             f"{prompt_len + max_tokens}, more than the context of {max_model_len} tokens "
                             f"(--max-model-len); shorten the prompt or lower max_tokens to at most "
                             f"{max(0, max_model_len - prompt_len)}")


# Histogram bucket bounds in seconds (Prometheus `le`), shared by TTFT and inter-token latency.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "total": self.total, "count": self.count}


@dataclass
class Event:
    """What the engine tells a request. `text` and `token_ids` are new since the last event; `finish_reason`
    ("stop", "length", "abort") is set on the last one; `error` (a message) replaces everything else."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)  # a request is itself, not its fields: compared and hashed by identity (queue, sets)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixels, aspect ratios, cross mask
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    # --- engine state (engine thread only, except `cancelled`)
    cancelled: bool = False
    slot: int = -1
    length: int = 0
    generated: list[int] = field(default_factory=list)
    decoder: TextDecoder | None = None
    text: str = ""
    sent: int = 0
    generator: torch.Generator | None = None
    submitted: float = 0.0
    last_token_time: float = 0.0
    pending_logprobs: list[dict] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        # A plain flag: the engine looks at it before every step, so the slot is free by the next one.
        self.cancelled = True


class SlotBuffers:
    """Preallocated decode state for `slots` rows: self K/V per self-attention layer, vision K/V per
    cross-attention layer, and per-row positions and masks."""

    def __init__(self, text_model, slots: int, max_len: int, max_vision: int, device, dtype):
        config = text_model.config
        self.cache = MllamaCache.allocate(config, slots, max_len, device, dtype)
        cross = [i for i, l in enumerate(text_model.layers) if isinstance(l, MllamaCrossAttentionDecoderLayer)]
        shape = (slots, config.num_key_value_heads, max_vision, config.head_dim)
        self.cross_k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in cross}
        self.cross_v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in cross}
        self.min = torch.finfo(dtype).min
        # Vision keys a slot does not have are masked; a text-only slot masks all (its output is zeroed anyway).
        self.cross_bias = torch.full((slots, 1, 1, max_vision), self.min, device=device, dtype=dtype)
        self.row_mask = torch.zeros(slots, 1, 1, 1, device=device, dtype=dtype)
        self.attn_keep = torch.zeros(slots, 1, 1, 1, device=device, dtype=dtype)
        self.vision_len = [0] * slots
        self.key_index = torch.arange(max_len, device=device)
        self.row_index = torch.arange(slots, device=device)
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k in self.cache.key.values())
        per_vision = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k in self.cross_k.values())
        self.bytes_per_token, self.bytes_per_vision_token = per_token, per_vision
        self.allocated_bytes = per_token * slots * max_len + per_vision * slots * max_vision


LAYER_FUNCTIONS = (self_qkv, self_output, cross_query, cross_output)


@torch.no_grad()
def decode_step(text, lm_head, buffers: SlotBuffers, tokens: torch.Tensor, positions: torch.Tensor,
                length: int, vision: int, functions=LAYER_FUNCTIONS) -> torch.Tensor:
    """One token for rows 0..n-1 (n = len(tokens)); row r writes its K/V at positions[r] and attends to keys
    0..positions[r]. `length` bounds the keys looked at (> every position), `vision` the vision keys (0: no row
    sees an image, cross layers are skipped). Returns logits [n, vocab]. Needs `fuse_projections` on the model.
    Shapes depend only on (n, length, vision), so one CUDA graph per such triple replays it."""
    self_qkv, self_out, cross_q, cross_out = functions
    n = tokens.shape[0]
    config = text.config
    heads, kv_heads, head_dim, eps = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                      config.rms_norm_eps)
    gqa = heads != kv_heads
    rows = buffers.row_index[:n]
    x = text.embed_tokens(tokens[:, None])                                      # [n, 1, hidden]
    cos, sin = (t[:, None] for t in text.rotary_emb(x, positions[:, None]))     # [n, 1, 1, head_dim]
    keys = buffers.key_index[:length]
    self_bias = torch.zeros(n, 1, 1, length, device=x.device, dtype=x.dtype)
    self_bias.masked_fill_((keys[None, :] > positions[:, None])[:, None, None, :], buffers.min)
    for i, layer in enumerate(text.layers):
        mlp = layer.mlp
        if isinstance(layer, MllamaCrossAttentionDecoderLayer):
            if not vision:
                continue  # no row sees an image: the layer is the identity for all of them
            attn = layer.cross_attn
            q = cross_q(x, layer.input_layernorm.weight, attn.q_proj.weight, attn.q_norm.weight, eps, heads, head_dim)
            out = F.scaled_dot_product_attention(q, buffers.cross_k[i][:n, :, :vision],
                                                 buffers.cross_v[i][:n, :, :vision],
                                                 attn_mask=buffers.cross_bias[:n, :, :, :vision], enable_gqa=gqa)
            x = cross_out(x, out, buffers.attn_keep[:n], attn.o_proj.weight, layer.cross_attn_attn_gate,
                          layer.post_attention_layernorm.weight, mlp.w13, mlp.down_proj.weight,
                          layer.cross_attn_mlp_gate, buffers.row_mask[:n], eps)
        else:
            attn = layer.self_attn
            q, k, v = self_qkv(x, layer.input_layernorm.weight, attn.wqkv, cos, sin, eps, heads, kv_heads, head_dim)
            k_cache, v_cache = buffers.cache.key[i], buffers.cache.value[i]
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            out = F.scaled_dot_product_attention(q, k_cache[:n, :, :length], v_cache[:n, :, :length],
                                                 attn_mask=self_bias, enable_gqa=gqa)
            x = self_out(x, out, attn.o_proj.weight, layer.post_attention_layernorm.weight, mlp.w13,
                         mlp.down_proj.weight, eps)
    return lm_head(text.norm(x)[:, 0])


def _compiled_functions():
    """torch.compile'd layer functions (batch size dynamic after the first recompile); eager ones if the
    compiler is unavailable here."""
    try:
        return tuple(torch.compile(fn, fullgraph=True) for fn in LAYER_FUNCTIONS)
    except Exception:
        return LAYER_FUNCTIONS


def _bucket(value: int, buckets: tuple[int, ...], cap: int) -> int:
    return min(cap, next((b for b in buckets if b >= value), cap))


ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


MAX_GRAPHS = 128


class DecodeRunner:
    """Runs `decode_step` for the first n slots: on CUDA as CUDA graphs (one per rows bucket, key-length bucket and
    vision length, captured on first use) over compiled layer functions; elsewhere eagerly.
    Rows between n and the bucket are free slots: they compute garbage at position 0 that nobody reads (a slot's
    prefill rewrites its cache before use).

    All graphs share one memory pool and write their logits into one static buffer, so none of them keeps memory
    of its own once captured: the GPU memory of the graphs is that of the largest step, however many shapes have
    been seen. At most MAX_GRAPHS are kept (least recently used out)."""

    def __init__(self, model, text, buffers: SlotBuffers, use_graphs: bool):
        fuse_projections(model)
        self.model, self.text, self.buffers = model, text, buffers
        self.use_graphs = use_graphs
        slots = buffers.row_index.shape[0]
        device = buffers.row_index.device
        # Inputs of a step (static addresses, read by every graph): tokens given by the host, positions, and per row
        # whether the host gave its token or the row continues from the previous step's greedy choice, `carried`.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.from_host = torch.ones(slots, dtype=torch.long, device=device)
        self.carried = torch.zeros(slots, dtype=torch.long, device=device)
        # Output besides the logits: each row's greedy token (argmax), which the next step can take without the
        # host reading it first (see BatchEngine._launch).
        self.greedy = torch.zeros(slots, dtype=torch.long, device=device)
        self.functions = _compiled_functions() if use_graphs else LAYER_FUNCTIONS
        self.graphs: collections.OrderedDict[tuple[int, int, int], torch.cuda.CUDAGraph] = collections.OrderedDict()
        self.logits: torch.Tensor | None = None  # [slots, vocab], written by every graph
        self.pool = None  # made at the first capture (a pool handle unused by any graph does not survive
        # torch.cuda.empty_cache())
        self.compile_error: str | None = None

    def _eager(self, n: int, length: int, vision: int) -> torch.Tensor:
        tokens = torch.where(self.from_host[:n] > 0, self.tokens[:n], self.carried[:n])
        logits = decode_step(self.text, self.model.lm_head, self.buffers, tokens, self.positions[:n], length,
                             vision, self.functions)
        self.greedy[:n].copy_(logits.argmax(-1))
        return logits

    def _capture(self, key) -> torch.cuda.CUDAGraph:
        if self.logits is None:
            head = self.model.lm_head.weight
            self.logits = torch.empty(self.tokens.shape[0], head.shape[0], dtype=head.dtype, device=head.device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            try:
                self._eager(*key)
            except Exception as e:  # the compiler failed here: run the same functions as eager kernels
                self.compile_error = f"{type(e).__name__}: {str(e).strip()[:200]}"
                warnings.warn(f"torch.compile of the batched decode step failed ({self.compile_error}); "
                              "using eager kernels")
                self.functions = LAYER_FUNCTIONS
            self._eager(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:key[0]].copy_(self._eager(*key))
        return graph

    def __call__(self, tokens: list[int], positions: list[int], vision: int,
                 from_host: list[bool] | None = None) -> torch.Tensor:
        """tokens/positions: one entry per slot 0..n-1 (free slots: 0). A row whose `from_host` entry is False
        ignores its entry in `tokens` and takes the greedy token the previous call chose for it (still on the
        device). Returns logits [n, vocab]; `self.greedy[:n]` holds their argmax."""
        n = len(tokens)
        slots = self.tokens.shape[0]
        length = max(positions) + 1
        given = [1] * n if from_host is None else [int(bool(f)) for f in from_host]
        if not self.use_graphs:
            self.carried[:n].copy_(self.greedy[:n])
            self.tokens[:n].copy_(torch.tensor(tokens))
            self.positions[:n].copy_(torch.tensor(positions))
            self.from_host[:n].copy_(torch.tensor(given))
            return self._eager(n, length, vision)
        rows = _bucket(n, ROW_BUCKETS, slots)
        key_len = min(length_bucket(length), self.buffers.key_index.shape[0])
        pad = rows - n
        # greedy -> carried outside the graphs: a capture's warm-up runs write `greedy` but never read it
        self.carried[:rows].copy_(self.greedy[:rows])
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, given + [1] * pad],
                            dtype=torch.long).pin_memory()
        self.tokens[:rows].copy_(host[0], non_blocking=True)
        self.positions[:rows].copy_(host[1], non_blocking=True)
        self.from_host[:rows].copy_(host[2], non_blocking=True)
        key = (rows, key_len, vision)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            while len(self.graphs) >= MAX_GRAPHS:
                self.graphs.popitem(last=False)
            self.graphs[key] = self._capture(key)
        self.graphs[key].replay()
        return self.logits[:n]


@dataclass
class _Prefill:
    """A prefill between its vision part (maybe still running on the side stream) and its text part."""
    group: list
    lengths: list[int]
    width: int
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    inputs: dict
    keep: torch.Tensor | None = None
    states: torch.Tensor | None = None
    ready: Any = None  # a CUDA event recorded after the vision part, or None when nothing is pending
    ratio_mask_host: torch.Tensor | None = None  # aspect_ratio_mask on the host, for the encoder's planning
    ids_host: torch.Tensor | None = None


@dataclass
class _Step:
    """A decode step queued on the device. `logits` is set when a row needs the host's choice (sampling, a
    repetition penalty, min_new_tokens, logprobs): the step is then read at once. Otherwise only its greedy
    tokens come back, copied to `tokens` (host) behind the step, ready once `done` (a CUDA event) is."""
    requests: list
    start: float
    launch_seconds: float
    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    done: Any = None


class BatchEngine:
    """The scheduler: admission, prefill, batched decode, sampling, stopping, cancellation, statistics."""

    PREFILL_WIDTH = 64  # prefill widths are multiples of this

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 max_images: int = 4, max_prefill_batch: int = 4, use_graphs: bool | None = None,
                 overlap_prefill: bool | None = None):
        if max_batch < 1 or max_queue < 0 or max_prefill_batch < 1:
            raise ValueError(f"max_batch and max_prefill_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_prefill_batch} and {max_queue}")
        if (reason := unsupported(model)) is not None:
            raise ValueError(reason)
        self.max_prefill_batch = max_prefill_batch
        self.warm_up_seconds = 0.0
        self.model = model
        self.tokenizer = tokenizer
        self.text = text_model_of(model)
        config = model.config
        text_config = config.text_config
        limit = text_config.max_position_embeddings
        self.max_model_len = min(limit, 4096) if max_model_len is None else int(max_model_len)
        if not 1 <= self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in 1..{limit} (the model's max_position_embeddings), "
                             f"got {self.max_model_len}")
        vision = config.vision_config
        self.tokens_per_image = vision.max_num_tiles * vision.num_patches
        self.max_vision = max_images * self.tokens_per_image
        self.max_batch, self.max_queue = max_batch, max_queue
        self.meta_compat = getattr(text_config, "compat", "meta") == "meta"
        gen = dict(getattr(model, "generation_config", None) or {})
        eos = gen.get("eos_token_id", text_config.eos_token_id)
        self.eos = tuple([eos] if isinstance(eos, int) else (eos or ()))
        self.defaults = gen
        device = next(model.parameters()).device
        self.device, self.dtype = device, next(model.parameters()).dtype
        self.buffers = SlotBuffers(self.text, max_batch, self.max_model_len, self.max_vision, device, self.dtype)
        self.runner = DecodeRunner(model, self.text, self.buffers,
                                   device.type == "cuda" if use_graphs is None else use_graphs)
        # the vision encoder of prefills as CUDA graphs too (the same function; see fast.VisionGraphs)
        self.vision_runner = vision_graphs(model) if self.runner.use_graphs else None
        if self.vision_runner is not None:  # the largest prefill group's images: the buffer never grows later
            self.vision_runner.reserve(max(max_prefill_batch, max_images))
        # one-request prefills' text part as CUDA graphs (fast.PrefillGraphs): a first token ~15 ms sooner
        self.prefill_graphs = PrefillGraphs(model) if self.runner.use_graphs else None
        # Prefills with images run their vision part on a side stream while the running batch keeps decoding on
        # the engine thread's (higher-priority) stream, and their text part once that is done: a new image no
        # longer stops every running request for the encoder's 50 ms. One such prefill is in flight at a time.
        # Off on CUDA by default: on the H200 it was slower (the encoder and the decode steps share the GPU: at
        # concurrency 64 the per-token p50 went from 12-13 to 29 ms), and its first version met a CUDA "illegal
        # instruction" whose cause was not found. On CPU (no streams) the same scheduling runs, tested, by default.
        self.overlap_prefill = device.type != "cuda" if overlap_prefill is None else overlap_prefill
        self.can_overlap = hasattr(model, "model") and hasattr(model.model, "vision_model")
        self.side_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.pending: _Prefill | None = None
        self.inflight: _Step | None = None  # the last decode step, queued, its tokens not read yet
        self.reserved: set[int] = set()  # slots of the pending prefill
        self.admitting = 0  # requests taken from the queue whose prefill is under way
        self.overlapped = 0  # prefills whose vision part ran beside decode steps
        self.failed: str | None = None  # why the engine thread ended, if it failed
        self.on_failure: Callable[[str], None] | None = None  # called on the engine thread after a failure
        self.slots: list[GenerationRequest | None] = [None] * max_batch
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.accepting = True
        self.thread: threading.Thread | None = None
        # statistics (read by /metrics; ints and floats are updated atomically enough under the GIL)
        self.outcomes: collections.Counter = collections.Counter()
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.busy = collections.Counter()  # engine-thread seconds: prefill, decode (to logits on the host), emit

    # -------------------------------------------------------------------------------------------------------
    # Public API (any thread)

    def start(self) -> "BatchEngine":
        if self.runner.use_graphs:
            self._warm_up()
        self.thread = threading.Thread(target=self._loop, name="mllama-engine", daemon=True)
        self.thread.start()
        return self

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        check_length(prompt_len, max_tokens, self.max_model_len)

    def submit(self, request: GenerationRequest) -> None:
        """Queues a request or raises QueueFull / EngineStopped / RequestTooLong at once."""
        self.check_length(len(request.prompt_ids), request.params.max_new_tokens)
        with self.lock:
            if self.failed is not None:
                raise EngineStopped(f"the engine failed: {self.failed}")
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            # Requests that a free slot takes at the next step are not queued in any real sense.
            free = sum(r is None for r in self.slots)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            request.submitted = time.monotonic()
            self.waiting.append(request)
            self.lock.notify()

    def stop(self, deadline: float = 0.0) -> None:
        """Stops taking requests; lets running and queued ones finish for `deadline` seconds, then aborts
        what is left and ends the thread."""
        with self.lock:
            self.accepting = False
            self.lock.notify()
        end = time.monotonic() + deadline
        while time.monotonic() < end and (self.running or self.waiting or self.admitting or self.pending is not None
                                          or self.inflight is not None):
            time.sleep(0.02)
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def stats(self) -> dict:
        """A plain snapshot of the counters /metrics shows (picklable: it crosses the engine process' pipe)."""
        return {"outcomes": dict(self.outcomes), "tokens_generated": self.tokens_generated,
                "prompt_tokens": self.prompt_tokens, "queue_depth": self.queue_depth, "running": self.running,
                "max_batch": self.max_batch, "steps": self.steps, "cache_bytes_in_use": self.cache_bytes_in_use(),
                "cache_bytes_allocated": self.buffers.allocated_bytes, "ttft": self.ttft.snapshot(),
                "itl": self.itl.snapshot(), "busy_seconds": dict(self.busy), "overlapped_prefills": self.overlapped}

    def cache_bytes_in_use(self) -> int:
        total = 0
        for slot, r in enumerate(list(self.slots)):
            if r is not None:
                total += r.length * self.buffers.bytes_per_token
                total += self.buffers.vision_len[slot] * self.buffers.bytes_per_vision_token
        return total

    # -------------------------------------------------------------------------------------------------------
    # Engine thread

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - e.g. a CUDA error: the device is unusable from here on
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.accepting = False
            error = f"the engine failed: {self.failed}"
            with self.lock:
                waiting, self.waiting = list(self.waiting), collections.deque()
            requests = [r for r in self.slots if r is not None] + waiting
            requests += [r for r, _ in self.pending.group] if self.pending is not None else []
            self.slots = [None] * len(self.slots)
            self.pending = self.inflight = None
            for r in requests:
                self.outcomes["error"] += 1
                r.emit(Event(error=error))
            if self.on_failure is not None:
                self.on_failure(self.failed)

    def _run(self) -> None:
        if self.device.type == "cuda":  # decode steps go before the side stream's encoder kernels
            torch.cuda.set_stream(torch.cuda.Stream(device=self.device, priority=-1))
        while True:
            with self.lock:
                while (not self.stopping and not self.waiting and not self.running and self.pending is None
                       and self.inflight is None):
                    self.lock.wait(timeout=0.5)
                if self.stopping:
                    break
            self._drop_cancelled()
            self._admit()
            self._complete_pending()
            if self.running or self.inflight is not None:
                self._step()
        if self.inflight is not None:  # its tokens are the requests' last ones: emitted before the aborts
            step, self.inflight = self.inflight, None
            self._land(step)
        for slot, r in enumerate(self.slots):
            if r is not None:
                self._finish(r, "abort")
        if self.pending is not None:
            for r, _ in self.pending.group:
                self.outcomes["aborted"] += 1
                r.emit(Event(finish_reason="abort", prompt_tokens=len(r.prompt_ids)))
            self.pending = None
            self.reserved.clear()
        while self.waiting:
            r = self.waiting.popleft()
            self.outcomes["aborted"] += 1
            r.emit(Event(finish_reason="abort", prompt_tokens=len(r.prompt_ids)))

    def _drop_cancelled(self) -> None:
        # Every request ends with one final event, a cancelled one too: whoever counts requests in flight (the
        # server's admission, across a process boundary) learns here that its slot or queue place is free.
        gone = []
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self.slots[slot] = None
                gone.append(r)
        with self.lock:
            kept = [r for r in self.waiting if not r.cancelled]
            gone += [r for r in self.waiting if r.cancelled]
            self.waiting = collections.deque(kept)
        for r in gone:
            self.outcomes["cancelled"] += 1
            r.emit(Event(finish_reason="cancelled", prompt_tokens=len(r.prompt_ids),
                         completion_tokens=len(r.generated)))

    def _warm_up(self) -> None:
        """Compiles the layer functions (for one row, then for a dynamic row count) and captures the first graphs
        before the first request, so that no request pays for it. Writes only position 0 of free slots.

        Then a graph for every batch-size bucket up to --max-batch, with no image and with one, at the shortest
        key length: besides the capture, each new shape makes the attention kernels set themselves up (cuDNN
        builds a plan per shape, 0.15-1.2 s on the H200), which a first burst of requests would otherwise meet
        one bucket after another while the batch fills."""
        t0 = time.perf_counter()
        for n in (1, 2):
            for vision in (0, self.max_vision):
                self.runner([0] * n, [0] * n, vision)
        slots = self.buffers.row_index.shape[0]
        for rows in sorted({min(b, slots) for b in ROW_BUCKETS}):
            for vision in (0, min(self.tokens_per_image, self.max_vision)):
                self.runner([0] * rows, [0] * rows, vision)
        self._warm_up_prefill()
        torch.cuda.synchronize()
        self.warm_up_seconds = time.perf_counter() - t0

    def _warm_up_prefill(self) -> None:
        """Prefills of one-image requests (black tiles) with 1..max tiles and of a text-only request, into slot 0,
        and groups of them (below), then the slots are freed: the kernels' first-call set-up for these shapes
        (cuDNN attention plans above all: 150-1200 ms for each new shape on the H200,
        bench/results/2026-11-29-h200-prefill-shapes.json) happens here, not in the first clients' TTFT."""
        config = self.model.config
        vision = getattr(config, "vision_config", None)
        bos = getattr(config.text_config, "bos_token_id", None) or 0
        params = SamplingParams(max_new_tokens=1, do_sample=False)
        warm = [([bos] * 16, {})]
        if vision is not None and hasattr(self.model, "model") and hasattr(self.model.model, "vision_model"):
            tiles, size = vision.max_num_tiles, vision.image_size
            ids = [bos, config.image_token_index] + [bos] * 14
            for used in range(1, tiles + 1):  # aspect ratio id `used` is 1 x used tiles
                mask = torch.zeros(1, len(ids), 1, tiles, dtype=torch.long)
                mask[:, 1:, :, :used] = 1
                warm.append((ids, {"pixel_values": torch.zeros(1, 1, tiles, 3, size, size),
                                   "aspect_ratio_ids": torch.full((1, 1), used, dtype=torch.long),
                                   "aspect_ratio_mask": (torch.arange(tiles) < used).long()[None, None],
                                   "cross_attention_mask": mask}))
        groups = [[(ids, inputs)] for ids, inputs in warm]
        # Groups as _admit forms them from a long queue (2..--max-prefill-batch requests), text-only and with one
        # image of the most tiles (the usual case for photos): the text part of a group runs eagerly, with shapes
        # of its own.
        for rows in range(2, min(self.max_prefill_batch, self.max_batch) + 1):
            groups += [[warm[0]] * rows] + ([[warm[-1]] * rows] if len(warm) > 1 else [])
        for group in groups:
            requests = [GenerationRequest(prompt_ids=ids, params=params, model_inputs=inputs, emit=lambda event: None)
                        for ids, inputs in group]
            self._prefill([(request, slot) for slot, request in enumerate(requests)])
            for slot in range(len(group)):
                self.slots[slot] = None
        self.outcomes.clear()
        self.ttft = Histogram()
        self.tokens_generated = self.prompt_tokens = 0

    def _admit(self) -> None:
        """Prefills waiting requests into free slots, a group at a time (requests with the same number of images,
        at most --max-prefill-batch): one group per decode step when requests are running, so that prefills
        (the vision encoder above all) never stall the running decodes for more than one group."""
        while True:
            if self.pending is not None:
                return  # its text part comes first
            with self.lock:
                free = [i for i, r in enumerate(self.slots) if r is None and i not in self.reserved]
                if not free or not self.waiting:
                    return
                images = self._image_count(self.waiting[0])
                # A short queue is prefilled a request at a time (each gets its first token soonest); a long one
                # in groups, which costs less per request (the text part of a prefill is mostly fixed cost).
                size = 1 if len(self.waiting) <= 8 else self.max_prefill_batch
                # counted in images (a text-only request as one), so a group of 4-image requests stalls the running
                # decodes no longer than a group of 1-image ones
                size = max(1, size // max(1, images))
                group = []
                for r in list(self.waiting):
                    if len(group) == min(len(free), size):
                        break
                    if self._image_count(r) == images:
                        group.append(r)
                for r in group:
                    self.waiting.remove(r)
                self.admitting = len(group)  # neither waiting nor in a slot: stop() must still wait for them
            pairs = list(zip(group, free))
            try:
                if images and self.running and self.can_overlap and self.overlap_prefill:
                    self._start_overlapped(pairs)
                    return
                self._prefill_group(pairs)
            finally:
                self.admitting = 0
            if self.running > len(group):
                return  # decode the running batch before the next group

    def _start_overlapped(self, group: list[tuple[GenerationRequest, int]]) -> None:
        """Queues the group's vision part on the side stream and returns; _complete_pending does the rest."""
        start = time.perf_counter()
        try:
            prefill = self._prepare(group)
            overlapped = self._encode(prefill, overlap=True)
        except Exception:  # noqa: BLE001 - the plain path finds the request at fault and fails only that one
            self.busy["prefill"] += time.perf_counter() - start
            self._prefill_group(group)
            return
        self.busy["prefill"] += time.perf_counter() - start
        self.reserved.update(slot for _, slot in group)
        self.pending = prefill
        self.overlapped += overlapped

    def _complete_pending(self) -> None:
        """The text part of the pending prefill, once its vision part is done (or at once with nothing to
        decode meanwhile)."""
        p = self.pending
        if p is None or (self.running and p.ready is not None and not p.ready.query()):
            return
        self.pending = None
        self._prefill_group(p.group, lambda group: self._complete(p))

    @staticmethod
    def _image_count(r: GenerationRequest) -> int:
        pixels = r.model_inputs.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[1])

    def _prefill_group(self, group: list[tuple[GenerationRequest, int]], attempt=None) -> None:
        """`attempt` (default: the whole prefill) on the group; if it fails, each request is prefilled again on
        its own, so that only the request at fault fails."""
        start, stepped = time.perf_counter(), self.busy["decode"] + self.busy["emit"]
        try:
            (attempt or self._prefill)(group)
            return
        except Exception as e:  # a bad request must not take the engine (or the rest of its group) down
            failure = e
        finally:  # decode steps run between the group's images are counted as decode
            self.busy["prefill"] += time.perf_counter() - start - (self.busy["decode"] + self.busy["emit"] - stepped)
        for r, slot in group:
            self.slots[slot] = None
            self.reserved.discard(slot)
        if len(group) > 1 or attempt is not None:  # run them one by one, so only the request at fault fails
            for pair in group:
                self._prefill_group([pair])
            return
        r = group[0][0]
        self.outcomes["error"] += 1
        r.emit(Event(error=f"{type(failure).__name__}: {failure}"))

    @torch.no_grad()
    def _prefill(self, group: list[tuple[GenerationRequest, int]]) -> None:
        """One forward of the plain model over the group's prompts, left-padded (real tokens keep positions
        0..L-1, so each row computes what it would alone); then each row's K/V go to its slot."""
        prefill = self._prepare(group)
        self._encode(prefill, overlap=False, interleave=True)
        self._complete(prefill)

    def _prepare(self, group: list[tuple[GenerationRequest, int]]) -> "_Prefill":
        lengths = [len(r.prompt_ids) for r, _ in group]
        # Widths rounded up (more left padding, exact): attention kernels that build a plan per shape (cuDNN's,
        # 150-1200 ms each on the H200) then meet a few widths again and again, not a new one per prompt length.
        width, rows = -(-max(lengths) // self.PREFILL_WIDTH) * self.PREFILL_WIDTH, len(group)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for row, (r, _) in enumerate(group):
            ids[row, width - lengths[row]:] = torch.tensor(r.prompt_ids)
            mask[row, width - lengths[row]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {}
        for name in group[0][0].model_inputs:
            parts = [r.model_inputs[name] for r, _ in group]
            if name == "cross_attention_mask":  # [1, L, N, T]: pad on the left like the prompts
                parts = [F.pad(m, (0, 0, 0, 0, width - m.shape[1], 0)) for m in parts]
            inputs[name] = torch.cat(parts)
        ratio_mask_host = inputs.get("aspect_ratio_mask")
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return _Prefill(group, lengths, width, ids.to(self.device), mask.to(self.device),
                        positions.to(self.device), inputs, ratio_mask_host=ratio_mask_host, ids_host=ids)

    def _encode(self, p: "_Prefill", overlap: bool, interleave: bool = False) -> bool:
        """The vision part of a prefill: projected vision tokens of the kept tiles, into p.states. With
        `overlap`, queued on the side stream (the engine thread returns at once and decode steps go on while the
        GPU encodes; p.ready then marks the end) if every graph it needs was captured before. Returns whether it
        was queued that way."""
        pixels = p.inputs.get("pixel_values")
        if pixels is None or not self.can_overlap:
            return False  # text only, or a model without a vision encoder: the whole forward runs in _complete
        inner = self.model.model
        mask = p.inputs.get("cross_attention_mask")
        ratio_ids, ratio_mask = p.inputs.get("aspect_ratio_ids"), p.inputs.get("aspect_ratio_mask")
        inner.check_image_inputs(p.ids_host, pixels, ratio_ids, ratio_mask, mask)  # before anything is queued
        p.keep = inner.kept_tiles(mask, pixels)
        rows = range(pixels.shape[0])
        if self.vision_runner is not None and p.ratio_mask_host is not None:
            ratio_mask = p.ratio_mask_host  # the graphs plan on the host: no read-back behind queued encoder work
            if overlap and not all(self.vision_runner.captured(pixels[r:r + 1], ratio_ids[r:r + 1],
                                                               ratio_mask[r:r + 1]) for r in rows):
                overlap = False  # graphs are captured on the engine's stream, never beside running decode steps
        # One request's images at a time: the encoder only meets one-request shapes, which the start-up warm-up
        # covers, and without overlap a decode step of the running batch goes between two requests, so that a
        # group of four stops the batch for one encoder run at a time, not four in a row.
        stream = self.side_stream if overlap else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            parts = []
            for row in rows:
                if row and interleave and not overlap and self.running:
                    if self.device.type == "cuda":  # the encoder's wait counts as prefill time, not decode
                        torch.cuda.current_stream(self.device).synchronize()
                    self._step()
                parts.append(inner.encode_images(pixels[row:row + 1], ratio_ids[row:row + 1],
                                                 ratio_mask[row:row + 1], p.keep, self.vision_runner))
            p.states = parts[0] if len(parts) == 1 else torch.cat(parts)
            if stream is not None:
                p.ready = torch.cuda.Event()
                p.ready.record(stream)
        return overlap

    @torch.no_grad()
    def _complete(self, p: "_Prefill") -> None:
        """The text part of a prefill (the whole forward if nothing was encoded before), then the slots."""
        group, lengths, width = p.group, p.lengths, p.width
        if p.ready is not None:  # encoded on the side stream: this stream waits for it, then owns the tokens
            torch.cuda.current_stream().wait_event(p.ready)
            p.states.record_stream(torch.cuda.current_stream())
        if p.states is not None or not p.inputs:  # images encoded already, or text only: the text part alone
            if p.states is None:
                self.text._check_ids(p.ids_host)  # (the image path checked them before its encoder ran)
            given = (p.ids, p.mask, p.positions, p.inputs.get("cross_attention_mask"), p.states, p.keep)
            # one-request prefills only: a group's text part as a graph too was measured no faster (its launches
            # overlap the last image's encoder work; bench/results/2026-11-29-h200-serve-load-s5-group-prefill-
            # graphs.json), and its graphs' outputs would hold rows x 210 MB each
            replayed = self.prefill_graphs(*given) if self.prefill_graphs is not None and len(group) == 1 else None
            logits, cache = replayed if replayed is not None else text_prefill(self.model, *given)
        else:  # inputs the encoder path left alone (a model without a vision encoder): the model's own forward
            cache = MllamaCache.allocate(self.model.config, len(group), width, self.device, self.dtype)
            logits = self.model(input_ids=p.ids, attention_mask=p.mask, position_ids=p.positions, cache=cache,
                                use_cache=True, logits_to_keep=1, **p.inputs).logits[:, -1]
        b = self.buffers
        vision = cache.cross_length()
        cross_rows = self._cross_rows(cache, p.inputs.get("cross_attention_mask"), vision)
        for row, (r, slot) in enumerate(group):
            pad = width - lengths[row]
            for i, k in cache.key.items():
                b.cache.key[i][slot, :, :lengths[row]] = k[row, :, pad:]
                b.cache.value[i][slot, :, :lengths[row]] = cache.value[i][row, :, pad:]
            b.vision_len[slot] = vision
            b.cross_bias[slot].fill_(b.min)
            if vision:
                for i in cache.cross_key:
                    b.cross_k[i][slot, :, :vision] = cache.cross_key[i][row]
                    b.cross_v[i][slot, :, :vision] = cache.cross_value[i][row]
                additive, row_mask = cross_rows
                b.cross_bias[slot, :, :, :vision] = additive[row]
                b.row_mask[slot] = row_mask[row]
                b.attn_keep[slot] = row_mask[row] if self.meta_compat else 1.0
            else:
                b.row_mask[slot] = 0.0
                b.attn_keep[slot] = 0.0
            r.slot, r.length = slot, lengths[row]
            r.decoder = TextDecoder(self.tokenizer, skip_special_tokens=True)
            if r.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(int(r.seed))
            self.slots[slot] = r
            self.reserved.discard(slot)
            self.prompt_tokens += lengths[row]
        self._sample_and_emit([r for r, _ in group], logits)

    def _cross_rows(self, cache: MllamaCache, mask: torch.Tensor | None, vision: int):
        """What every generated token of each row sees: the vision keys its last prompt token saw (the rule
        generate() follows). Returns (additive bias [rows, 1, 1, vision], row mask [rows, 1, 1, 1])."""
        if not vision:
            return None
        if mask is None:  # images without a mask: every row sees every vision token
            rows = cache.cross_key[next(iter(cache.cross_key))].shape[0]
            return (torch.zeros(rows, 1, 1, vision, device=self.device, dtype=self.dtype),
                    torch.ones(rows, 1, 1, 1, device=self.device, dtype=self.dtype))
        keep = cache.cross_tiles  # the tiles the prefill kept (padding tiles no row sees are dropped)
        tiles = mask.shape[2] * mask.shape[3] if keep is None else keep.numel()
        return prepare_cross_attention_mask(mask[:, -1:], vision // tiles, self.dtype, keep)

    def _step(self) -> None:
        """One decode step of the running batch. A step whose rows all decode greedily without logprobs is read
        one step late: the next step is queued first (its rows take their tokens straight from the device), and the
        host detokenizes, checks stops and sends events while the GPU computes it, instead of the GPU waiting for
        the host between steps. A request that ends in the step read late was computed once more in the step
        queued meanwhile; that row is ignored (a request's last position is known beforehand, so no row ever
        writes past the context)."""
        launched = self._launch()
        previous, self.inflight = self.inflight, None
        if previous is not None:
            self._land(previous)
        if launched is not None:
            if launched.logits is not None:
                self._land(launched)
            else:
                self.inflight = launched

    @staticmethod
    def _chosen_on_host(r: GenerationRequest, count: int) -> bool:
        """Whether the token after `count` generated ones is not the plain argmax: sampled (with the request's own
        generator, as generate() alone would), repeats penalised, words banned, invalid scores replaced, or EOS not
        allowed yet."""
        p = r.params
        return (p.do_sample or p.repetition_penalty != 1.0 or bool(p.bad_words_ids) or p.remove_invalid_values
                or bool(count < p.min_new_tokens and p.eos_token_id))

    def _launch(self) -> _Step | None:
        """Queues a decode step for every running request that has a token left to make; returns it, or None."""
        carried = set(self.inflight.requests) if self.inflight is not None else set()
        active, counts = [], []
        for r in self.slots:
            if r is None:
                continue
            count = len(r.generated) + (r in carried)  # tokens it will have once the step in flight is read
            if count >= r.params.max_new_tokens:
                continue  # its last token is in flight: it ends when that step is read
            active.append(r)
            counts.append(count)
        if not active:
            return None
        n = max(r.slot for r in active) + 1
        tokens, positions, given = [0] * n, [0] * n, [True] * n
        for r in active:
            if r in carried:
                given[r.slot] = False  # its token is the greedy choice of the step in flight, on the device
            else:
                tokens[r.slot] = r.generated[-1]
            positions[r.slot] = r.length  # the new token's index = its RoPE position (prompts are unpadded)
        # Vision keys looked at: rounded up to whole images (a row's keys past its own are masked), so that the
        # steps' shapes, and the CUDA graphs, take few values even though dropped padding tiles vary the lengths.
        vision = max(self.buffers.vision_len[r.slot] for r in active)
        vision = min(self.max_vision, -(-vision // self.tokens_per_image) * self.tokens_per_image)
        start = time.perf_counter()
        try:
            logits = self.runner(tokens, positions, vision, given)
        except Exception as e:  # fail the batch, keep serving
            for r in active:
                self.slots[r.slot] = None
                self.outcomes["error"] += 1
                r.emit(Event(error=f"{type(e).__name__}: {e}"))
            return None
        self.steps += 1
        for r in active:
            r.length += 1
        if any(self._chosen_on_host(r, c) or r.logprobs is not None for r, c in zip(active, counts)):
            return _Step(active, start, 0.0, logits=logits)
        if self.device.type == "cuda":
            tokens = torch.empty(n, dtype=torch.long, pin_memory=True)
            tokens.copy_(self.runner.greedy[:n], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            tokens, done = self.runner.greedy[:n].clone(), None
        return _Step(active, start, time.perf_counter() - start, tokens=tokens, done=done)

    def _land(self, step: _Step) -> None:
        """Emits a queued step's tokens to its requests that still run (not cancelled or ended meanwhile)."""
        live = [r for r in step.requests if self.slots[r.slot] is r]
        if step.logits is not None:
            self._sample_and_emit(live, step.logits[[r.slot for r in live]], step.start)
            return
        wait = time.perf_counter()
        if step.done is not None:
            step.done.synchronize()
        chosen = step.tokens.tolist()
        self.busy["decode"] += step.launch_seconds + time.perf_counter() - wait
        self._emit(live, [chosen[r.slot] for r in live])

    def _sample_and_emit(self, requests: list[GenerationRequest], logits: torch.Tensor,
                         start: float | None = None) -> None:
        """Greedy rows take one batched argmax and one transfer to the host for the whole step; rows chosen on
        the host (_chosen_on_host) go through next_tokens one by one."""
        greedy = logits.argmax(-1)
        special = [row for row, r in enumerate(requests) if self._chosen_on_host(r, len(r.generated))]
        wanted = [row for row, r in enumerate(requests) if r.logprobs is not None]
        logprobs = torch.log_softmax(logits[wanted].float(), dim=-1) if wanted else None
        chosen = greedy.tolist()
        for row in special:
            r = requests[row]
            try:
                seen = torch.tensor([r.prompt_ids + r.generated], device=logits.device) \
                    if r.params.repetition_penalty != 1.0 or r.params.bad_words_ids else None
                chosen[row] = int(next_tokens(logits[row:row + 1], seen, r.params, len(r.generated), r.generator)[0])
            except Exception as e:  # noqa: BLE001 - this request's sampling failed: it ends, the batch goes on
                self._fail(r, "sampling", e)
        if start is not None:
            self.busy["decode"] += time.perf_counter() - start
        self._emit(requests, chosen, logprobs, wanted)

    def _emit(self, requests: list[GenerationRequest], chosen: list[int], logprobs: torch.Tensor | None = None,
              wanted: list[int] = ()) -> None:
        """Appends each request's chosen token, records latencies and sends what is new (or ends the request)."""
        now = time.monotonic()
        emit_start = time.perf_counter()
        for row, r in enumerate(requests):
            if self.slots[r.slot] is not r:
                continue  # failed while its token was chosen (_fail freed the slot)
            token = chosen[row]
            if r.generated:
                self.itl.observe(now - r.last_token_time)
            else:
                self.ttft.observe(now - r.submitted)
            r.last_token_time = now
            r.generated.append(token)
            self.tokens_generated += 1
            r.pending_ids.append(token)
            try:
                if logprobs is not None and r.logprobs is not None:
                    r.pending_logprobs.append(self._logprob_entry(logprobs[wanted.index(row)], token, r.logprobs))
                self._advance_text(r, token)
            except Exception as e:  # noqa: BLE001 - detokenizing or the caller's emit failed: end this request only
                self._fail(r, "emitting its output", e)
        self.busy["emit"] += time.perf_counter() - emit_start

    def _fail(self, r: GenerationRequest, stage: str, error: BaseException) -> None:
        """Ends one request with an error event; the engine and the other requests go on."""
        if 0 <= r.slot < len(self.slots) and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        self.outcomes["error"] += 1
        try:
            r.emit(Event(error=f"{stage} failed: {type(error).__name__}: {error}", prompt_tokens=len(r.prompt_ids),
                         completion_tokens=len(r.generated)))
        except Exception:  # noqa: BLE001 - its caller is gone; nobody else to tell
            pass

    def _logprob_entry(self, row: torch.Tensor, token: int, top: int) -> dict:
        entry = {"id": token, "logprob": float(row[token]), "top": []}
        if top:
            values, ids = torch.topk(row, top)
            entry["top"] = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return entry

    def _advance_text(self, r: GenerationRequest, token: int) -> None:
        finish = None
        if token in self.eos:
            finish = "stop"  # the EOS token itself adds no text (special tokens are skipped)
        else:
            r.text += r.decoder.push(token)
        if finish is None and len(r.generated) >= r.params.max_new_tokens:
            finish = "length"
        if finish is not None:
            r.text += r.decoder.flush()  # bytes of an incomplete character held back so far
        if r.stop:
            # Search only where a new match can start: text before `sent` was checked when it was emitted.
            window = max(len(s) for s in r.stop) + 16
            start = max(0, r.sent - window)
            hits = [i for i in (r.text.find(s, start) for s in r.stop) if i >= 0]
            if hits:
                r.text = r.text[:min(hits)]
                finish = "stop"
        if finish is None:
            # Hold back a tail that could still become a stop string, so a stop string is never streamed.
            hold = max((len(s) - 1 for s in r.stop), default=0)
            ready = max(r.sent, len(r.text) - hold)
            if ready > r.sent or r.pending_logprobs:
                piece, r.sent = r.text[r.sent:ready], ready
                r.emit(Event(text=piece, token_ids=r.pending_ids, logprobs=r.pending_logprobs))
                r.pending_ids, r.pending_logprobs = [], []
            return
        self._finish(r, finish)

    def _finish(self, r: GenerationRequest, reason: str) -> None:
        self.slots[r.slot] = None
        self.outcomes[{"stop": "stop", "length": "length"}.get(reason, "aborted")] += 1
        piece = r.text[r.sent:]
        r.sent = len(r.text)
        r.emit(Event(text=piece, token_ids=r.pending_ids, logprobs=r.pending_logprobs, finish_reason=reason,
                     prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated)))
        r.pending_ids, r.pending_logprobs = [], []


def sampling_params(engine: BatchEngine, max_tokens: int, temperature: float | None, top_p: float | None
                    ) -> SamplingParams:
    """OpenAI's knobs over the checkpoint's generation_config: temperature 0 means greedy; a temperature not
    given takes the checkpoint's do_sample/temperature/top_p (so an instruct checkpoint keeps its defaults)."""
    d = engine.defaults
    if temperature is None:
        do_sample = bool(d.get("do_sample", False))
        temperature = float(d.get("temperature") or 1.0)
    else:
        do_sample = temperature > 0
        temperature = temperature if temperature > 0 else 1.0
    top_p = float(d.get("top_p") or 1.0) if top_p is None else float(top_p)
    params = SamplingParams(max_new_tokens=max_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                            top_k=0, eos_token_id=engine.eos)
    params.validate()
    return params

