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
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..generation import SamplingParams, TextDecoder, next_tokens
from ..modeling.cache import MllamaCache
from ..modeling.text import MllamaCrossAttentionDecoderLayer, apply_rope, prepare_cross_attention_mask


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


class RequestTooLong(ValueError):
    """prompt + max_tokens exceeds the context the slots were allocated for."""


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


@dataclass
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
        self.has_images = [False] * slots
        self.vision_len = [0] * slots
        self.key_index = torch.arange(max_len, device=device)
        per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k in self.cache.key.values())
        per_vision = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k in self.cross_k.values())
        self.bytes_per_token, self.bytes_per_vision_token = per_token, per_vision
        self.allocated_bytes = per_token * slots * max_len + per_vision * slots * max_vision


def _text_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


@torch.no_grad()
def decode_step(text, lm_head, buffers: SlotBuffers, tokens: torch.Tensor, positions: torch.Tensor,
                length: int, use_cross: bool) -> torch.Tensor:
    """One token for rows 0..n-1 (n = len(tokens)); row r writes its K/V at positions[r] and attends to keys
    0..positions[r]. `length` bounds the keys looked at (max position + 1). Returns logits [n, vocab]."""
    n = tokens.shape[0]
    config = text.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gqa = heads != kv_heads
    rows = torch.arange(n, device=tokens.device)
    x = text.embed_tokens(tokens[:, None])                                      # [n, 1, hidden]
    cos, sin = text.rotary_emb(positions[:, None])                              # [n, 1, 1, head_dim]
    keys = buffers.key_index[:length]
    self_bias = torch.zeros(n, 1, 1, length, device=x.device, dtype=x.dtype)
    self_bias.masked_fill_((keys[None, :] > positions[:, None])[:, None, None, :], buffers.min)
    vision = max(buffers.vision_len[:n]) if use_cross else 0
    for i, layer in enumerate(text.layers):
        if isinstance(layer, MllamaCrossAttentionDecoderLayer):
            if not vision:
                continue  # no row sees an image: the layer is the identity for all of them
            attn = layer.cross_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(n, 1, heads, head_dim)).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, buffers.cross_k[i][:n, :, :vision],
                                                 buffers.cross_v[i][:n, :, :vision],
                                                 attn_mask=buffers.cross_bias[:n, :, :, :vision], enable_gqa=gqa)
            # attn_keep: the row mask under Meta's rule; 0 for text-only rows in both modes (the plain model
            # skips cross layers entirely for them).
            out = out * buffers.attn_keep[:n]
            x = x + layer.cross_attn_attn_gate.tanh() * attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
            h = buffers.row_mask[:n, 0] * layer.mlp(layer.post_attention_layernorm(x))
            x = x + layer.cross_attn_mlp_gate.tanh() * h
        else:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, 1, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(n, 1, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(n, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = buffers.cache.key[i], buffers.cache.value[i]
            k_cache[rows, :, positions] = k[:, :, 0]
            v_cache[rows, :, positions] = v[:, :, 0]
            out = F.scaled_dot_product_attention(q, k_cache[:n, :, :length], v_cache[:n, :, :length],
                                                 attn_mask=self_bias, enable_gqa=gqa)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm_head(text.norm(x)[:, 0])


class BatchEngine:
    """The scheduler: admission, prefill, batched decode, sampling, stopping, cancellation, statistics."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 max_images: int = 4):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.text = _text_model(model)
        config = model.config
        text_config = config.text_config
        limit = text_config.max_position_embeddings
        self.max_model_len = min(limit, 4096) if max_model_len is None else int(max_model_len)
        if not 1 <= self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in 1..{limit} (the model's max_position_embeddings), "
                             f"got {self.max_model_len}")
        vision = config.vision_config
        self.max_vision = max_images * vision.max_num_tiles * vision.num_patches
        self.max_batch, self.max_queue = max_batch, max_queue
        self.meta_compat = getattr(text_config, "compat", "meta") == "meta"
        gen = dict(getattr(model, "generation_config", None) or {})
        eos = gen.get("eos_token_id", text_config.eos_token_id)
        self.eos = tuple([eos] if isinstance(eos, int) else (eos or ()))
        self.defaults = gen
        device = next(model.parameters()).device
        self.device, self.dtype = device, next(model.parameters()).dtype
        self.buffers = SlotBuffers(self.text, max_batch, self.max_model_len, self.max_vision, device, self.dtype)
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

    # -------------------------------------------------------------------------------------------------------
    # Public API (any thread)

    def start(self) -> "BatchEngine":
        self.thread = threading.Thread(target=self._loop, name="mllama-engine", daemon=True)
        self.thread.start()
        return self

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                                 f"{prompt_len + max_tokens}, more than the context of {self.max_model_len} tokens "
                                 f"(--max-model-len); shorten the prompt or lower max_tokens to at most "
                                 f"{max(0, self.max_model_len - prompt_len)}")

    def submit(self, request: GenerationRequest) -> None:
        """Queues a request or raises QueueFull / EngineStopped / RequestTooLong at once."""
        self.check_length(len(request.prompt_ids), request.params.max_new_tokens)
        with self.lock:
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
        while time.monotonic() < end and (self.running or self.waiting):
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

    def cache_bytes_in_use(self) -> int:
        total = 0
        for slot, r in enumerate(list(self.slots)):
            if r is not None:
                total += r.length * self.buffers.bytes_per_token
                total += self.buffers.vision_len[slot] * self.buffers.bytes_per_vision_token
        return total

    # -------------------------------------------------------------------------------------------------------
    # Engine thread

    def _free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    self.lock.wait(timeout=0.5)
                if self.stopping:
                    break
            self._drop_cancelled()
            self._admit()
            if self.running:
                self._step()
        for slot, r in enumerate(self.slots):
            if r is not None:
                self._finish(r, "abort")
        while self.waiting:
            r = self.waiting.popleft()
            self.outcomes["aborted"] += 1
            r.emit(Event(finish_reason="abort", prompt_tokens=len(r.prompt_ids)))

    def _drop_cancelled(self) -> None:
        for slot, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self.slots[slot] = None
                self.outcomes["cancelled"] += 1
        with self.lock:
            kept = [r for r in self.waiting if not r.cancelled]
            self.outcomes["cancelled"] += len(self.waiting) - len(kept)
            self.waiting = collections.deque(kept)

    def _admit(self) -> None:
        while True:
            with self.lock:
                slot = self._free_slot()
                if slot is None or not self.waiting:
                    return
                request = self.waiting.popleft()
            try:
                self._prefill(request, slot)
            except Exception as e:  # a bad request must not take the engine down
                self.slots[slot] = None
                self.outcomes["error"] += 1
                request.emit(Event(error=f"{type(e).__name__}: {e}"))

    @torch.no_grad()
    def _prefill(self, r: GenerationRequest, slot: int) -> None:
        ids = torch.tensor([r.prompt_ids], dtype=torch.long, device=self.device)
        length = ids.shape[1]
        inputs = {k: v.to(self.device) for k, v in r.model_inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        cache = MllamaCache.allocate(self.model.config, 1, length, self.device, self.dtype)
        # The same call generate() makes for a lone unpadded prompt (mask of ones, positions 0..L-1).
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         position_ids=torch.arange(length, device=self.device)[None], cache=cache, use_cache=True,
                         logits_to_keep=1, **inputs)
        b = self.buffers
        for i, k in cache.key.items():
            b.cache.key[i][slot, :, :length] = k[0]
            b.cache.value[i][slot, :, :length] = cache.value[i][0]
        vision = cache.cross_length()
        b.vision_len[slot] = vision
        b.has_images[slot] = vision > 0
        if vision:
            for i in cache.cross_key:
                b.cross_k[i][slot, :, :vision] = cache.cross_key[i][0]
                b.cross_v[i][slot, :, :vision] = cache.cross_value[i][0]
            mask = inputs["cross_attention_mask"]
            per_tile = vision // (mask.shape[2] * mask.shape[3])
            # Rule shared with generate(): every generated token sees what the last prompt token saw.
            additive, row_mask = prepare_cross_attention_mask(mask[:, -1:], per_tile, self.dtype)
            b.cross_bias[slot].fill_(b.min)
            b.cross_bias[slot, :, :, :vision] = additive[0]
            b.row_mask[slot] = row_mask[0]
            b.attn_keep[slot] = row_mask[0] if self.meta_compat else 1.0
        else:
            b.row_mask[slot] = 0.0
            b.attn_keep[slot] = 0.0
        r.slot, r.length = slot, length
        r.decoder = TextDecoder(self.tokenizer, skip_special_tokens=True)
        if r.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(int(r.seed))
        self.slots[slot] = r
        self.prompt_tokens += length
        self._sample_and_emit([r], out.logits[:, -1])

    def _step(self) -> None:
        active = [r for r in self.slots if r is not None]
        n = max(r.slot for r in active) + 1
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        for r in active:
            tokens[r.slot] = r.generated[-1]
            positions[r.slot] = r.length  # the new token's index = its RoPE position (prompts are unpadded)
        length = int(positions.max()) + 1
        try:
            logits = decode_step(self.text, self.model.lm_head, self.buffers, tokens.to(self.device),
                                 positions.to(self.device), length, any(self.buffers.has_images[:n]))
        except Exception as e:  # fail the batch, keep serving
            for r in active:
                self.slots[r.slot] = None
                self.outcomes["error"] += 1
                r.emit(Event(error=f"{type(e).__name__}: {e}"))
            return
        self.steps += 1
        for r in active:
            r.length += 1
        self._sample_and_emit(active, logits[[r.slot for r in active]])

    def _sample_and_emit(self, requests: list[GenerationRequest], logits: torch.Tensor) -> None:
        now = time.monotonic()
        logits = logits.float()
        want_logprobs = any(r.logprobs is not None for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        for row, r in enumerate(requests):
            seen = torch.tensor([r.prompt_ids + r.generated], device=logits.device) \
                if r.params.repetition_penalty != 1.0 else None
            token = int(next_tokens(logits[row:row + 1], seen, r.params, len(r.generated), r.generator)[0])
            if r.generated:
                self.itl.observe(now - r.last_token_time)
            else:
                self.ttft.observe(now - r.submitted)
            r.last_token_time = now
            r.generated.append(token)
            self.tokens_generated += 1
            r.pending_ids.append(token)
            if logprobs is not None and r.logprobs is not None:
                r.pending_logprobs.append(self._logprob_entry(logprobs[row], token, r.logprobs))
            self._advance_text(r, token)

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

