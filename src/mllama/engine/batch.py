"""Continuous batching: requests join and leave the running batch at every decode step.

The engine is put together from parts that each have a file: the requests and their events (requests.py), the
queue, slots, admission and grouping (scheduler.py, no torch), the paged K/V memory and the image cache
(paged.py), the decode step over the pages as CUDA graphs (runner.py, over decode.py's step through the model's
own layers), prefills (here: the vision part, then the text part, then the pages; decode steps of the running
batch go between the images of a group), and what a request is sent (output.py). This module runs them.

One background thread owns the model and the caches; callers talk to it through `BatchEngine.submit` (any
thread) and receive events through the `emit` callback of their request (called on the engine thread).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..constraints import Constraint, Grammars
from ..processing.cross_attention_mask import generated_row
from ..sampling import SamplingParams, TextDecoder
from .choice import Choice, Chooser, chosen_on_host, to_host
from .decode import fuse_projections, text_model_of, unsupported
from .fast import PrefillGraphs, vision_graphs
from .graphs import reason_of
from .output import advance_text, final_event
from .paged import PagedCaches, check_kv_cache_dtype, describe_images, plan_pools
from .prefill import Prefill, Prefiller
from .requests import Event, GenerationRequest, check_length
from .runner import ROW_BUCKETS, DecodeRunner
from .scheduler import Scheduler
from .stats import Histogram

# GPU memory the page pools leave free: activations of prefills and of the vision encoder (beyond its output
# buffer, reserved before the pools are sized), compiled kernels' workspaces, and the decode graphs' pool.
WORKSPACE_BYTES = 6 * 2**30
PREFILL_GRAPH_BYTES = 2 * 2**30  # outputs kept by one-request prefill graphs (fast.PrefillGraphs)


@dataclass
class _Step:
    """A decode step queued on the device, read by the host one step late (BatchEngine._step). Its tokens are the
    decode graph's argmax, except for rows that need more (engine.choice): then `logits` is kept until their
    choice is queued behind the step (`choice`, with their logprobs). Either way the tokens are on the device,
    where the next step takes them, and copied to `tokens` (host), ready once `done` (a CUDA event) is."""
    requests: list
    start: float
    launch_seconds: float = 0.0
    rows: int = 0
    logits: torch.Tensor | None = None
    choice: Choice | None = None
    tokens: torch.Tensor | None = None
    done: Any = None


class BatchEngine:
    """The scheduler: admission, prefill, batched decode, sampling, stopping, cancellation, statistics."""

    def __init__(self, model, tokenizer, *, max_batch: int | None = None, max_queue: int = 64,
                 max_model_len: int | None = None, max_images: int = 4, max_prefill_batch: int = 4,
                 use_graphs: bool | None = None, overlap_prefill: bool | None = None,
                 gpu_memory_utilization: float = 0.9, cross_share: float = 0.5, cache_images: bool = True,
                 pages: tuple[int, int] | None = None, kv_cache_dtype: str = "auto"):
        """pages: (text pages, tile pages) to allocate instead of sizing the pools from the GPU's memory (each
        count includes the scratch page); kv_cache_dtype: "auto" (the model's dtype) or "fp8"; see engine.paged."""
        if (max_batch is not None and max_batch < 1) or max_queue < 0 or max_prefill_batch < 1:
            raise ValueError(f"max_batch and max_prefill_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{max_prefill_batch} and {max_queue}")
        if not 0 < gpu_memory_utilization <= 1 or not 0 < cross_share < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] and cross_share in (0, 1), got "
                             f"{gpu_memory_utilization} and {cross_share}")
        if (reason := unsupported(model)) is not None:
            raise ValueError(reason)
        check_kv_cache_dtype(kv_cache_dtype)
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
        self.max_images, self.max_tiles = max_images, vision.max_num_tiles
        self.max_queue = max_queue
        gen = dict(getattr(model, "generation_config", None) or {})
        eos = gen.get("eos_token_id", text_config.eos_token_id)
        self.eos = tuple([eos] if isinstance(eos, int) else (eos or ()))
        self.defaults = gen
        device = next(model.parameters()).device
        self.device, self.dtype = device, model.dtype
        use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        # The fused q|k|v and gate|up matrices first: they replace the loaded weights, whose freed blocks stay with
        # the allocator, mostly in segments it cannot give back; the pools are then sized from what the driver
        # still has (the 90B's fusion alone left 23 GiB so, and sized before it, the pools ran out of memory).
        fuse_projections(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # the vision encoder of prefills as CUDA graphs (fast.VisionGraphs); its output buffer first, as part of
        # the workspace the pools leave room for
        self.vision_runner = vision_graphs(model) if use_graphs else None
        if self.vision_runner is not None:  # the largest prefill group's images: the buffer never grows later
            self.vision_runner.reserve(max(max_prefill_batch, max_images))
        plan = plan_pools(text_config, vision.num_patches, vision.max_num_tiles, device=device, dtype=self.dtype,
                          max_batch=max_batch, max_model_len=self.max_model_len, max_images=max_images,
                          gpu_memory_utilization=gpu_memory_utilization, cross_share=cross_share,
                          workspace_bytes=WORKSPACE_BYTES + PREFILL_GRAPH_BYTES, pages=pages,
                          kv_cache_dtype=kv_cache_dtype)
        self.max_batch = plan.slots
        self.caches = PagedCaches(self.text, plan.slots, plan.self_pages, plan.tile_pages, self.max_model_len,
                                  max_images * vision.max_num_tiles, vision.num_patches, device, self.dtype,
                                  cache_images=cache_images and getattr(text_config, "compat", "meta") == "meta",
                                  kv_cache_dtype=kv_cache_dtype)
        self.runner = DecodeRunner(model, self.caches, use_graphs)
        # one-request prefills' text part as CUDA graphs (fast.PrefillGraphs): a first token ~15 ms sooner
        self.prefill_graphs = PrefillGraphs(model, PREFILL_GRAPH_BYTES) if use_graphs else None
        # Prefills with images run their vision part on a side stream while the running batch keeps decoding on
        # the engine thread's (higher-priority) stream, and their text part once that is done: a new image no
        # longer stops every running request for the encoder's 50 ms. One such prefill is in flight at a time.
        # Off on CUDA by default: on the H200 it was slower (the encoder and the decode steps share the GPU: at
        # concurrency 64 the per-token p50 went from 12-13 to 29 ms), and its first version met a CUDA "illegal
        # instruction" whose cause was not found. On CPU (no streams) the same scheduling runs, tested, by default.
        self.overlap_prefill = device.type != "cuda" if overlap_prefill is None else overlap_prefill
        self.can_overlap = hasattr(model, "model") and hasattr(model.model, "vision_model")
        self.side_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.prefiller = Prefiller(model, self.caches, self.vision_runner, self.prefill_graphs, self.side_stream,
                                   self.can_overlap, vision.max_num_tiles)
        self.pending: Prefill | None = None
        self.inflight: _Step | None = None  # the last decode step, queued, its tokens not read yet
        self.overlapped = 0  # prefills whose vision part ran beside decode steps
        self.on_failure: Callable[[str], None] | None = None  # called on the engine thread after a failure
        # the queue, the slots, admission and grouping (engine.scheduler); slots belong to the engine thread
        self.scheduler = Scheduler(self.max_batch, max_queue, max_prefill_batch)
        self.thread: threading.Thread | None = None
        # statistics (read by /metrics; ints and floats are updated atomically enough under the GIL)
        self.outcomes: collections.Counter = collections.Counter()
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.shared_prefills = 0  # requests whose prompt was prefilled once for another that shares it
        self.steps = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.busy = collections.Counter()  # engine-thread seconds: prefill, decode (to logits on the host), emit
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        # each row's token when the argmax is not enough (engine.choice)
        self.chooser = Chooser(self.grammars, self._end_tokens, self.max_batch, device)

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
        """Queues a request or raises QueueFull / EngineStopped / RequestTooLong at once (ValueError for a
        grammar that does not compile)."""
        self.submit_many([request])

    def submit_many(self, requests: list[GenerationRequest]) -> None:
        """Queues requests together, or none of them (as submit raises). Those that share a prompt (`share`:
        the n choices of one) are admitted together as far as free slots allow, and prefilled once."""
        images = {}
        for request in requests:
            self.check_length(len(request.prompt_ids), request.params.max_new_tokens)
            if request.grammar is not None:
                request.constraint = Constraint(self.grammars(), request.grammar)
            key = request.share if request.share is not None else id(request)
            if key not in images:  # (hashing pixels here, not on the engine; once for a shared prompt)
                images[key] = self.describe_images(request.model_inputs)
            request.images = images[key]
            self.check_fits(request)
        self.scheduler.submit_many(requests)

    def stop(self, deadline: float = 0.0) -> None:
        """Stops taking requests; lets running and queued ones finish for `deadline` seconds, then aborts
        what is left and ends the thread."""
        sched = self.scheduler
        sched.accepting = False
        sched.wake()
        end = time.monotonic() + deadline
        while time.monotonic() < end and (self.running or sched.waiting or sched.admitting or self.pending is not None
                                          or self.inflight is not None):
            time.sleep(0.02)
        sched.stopping = True
        sched.wake()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def grammars(self) -> Grammars:
        """llguidance's view of the tokenizer, made at the first constrained request (about 1 s)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.lm_head.weight.shape[0])
            return self._grammars

    def describe_images(self, inputs: dict) -> list[tuple[str | None, int]]:
        return describe_images(inputs, self.max_images, self.max_tiles, getattr(self.text.config, "compat", "meta"))

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuses at once, with the numbers, a request that could never fit the page pools."""
        self.caches.check_fits(len(request.prompt_ids), request.params.max_new_tokens, request.images)

    def _all_cached(self, r: GenerationRequest) -> bool:
        return bool(r.images) and all(key is not None and entry.ready and self.caches.images.enabled
                                      for key, entry in r.holding.images)

    def _cached(self, group: list[tuple[GenerationRequest, int]]) -> bool:
        """Whether a group is one prompt (one request, or requests that share it) whose images are all cached."""
        first = group[0][0]
        one = len(group) == 1 or (first.share is not None and all(r.share == first.share for r, _ in group))
        return one and self._all_cached(first)

    def _reserve(self, r: GenerationRequest) -> bool:
        r.holding = self.caches.reserve(len(r.prompt_ids) + r.params.max_new_tokens, r.images)
        return r.holding is not None

    def _free(self, slot: int) -> None:
        """Ends a slot's request: its pages go back (cached images stay cached), the slot reads scratch."""
        r = self.slots[slot]
        self.slots[slot] = None
        self.caches.unbind_row(slot)
        self._release(r)

    def _release(self, r: GenerationRequest | None) -> None:
        if r is not None and r.holding is not None:
            self.caches.release(r.holding)
            r.holding = None

    @property
    def slots(self) -> list:
        return self.scheduler.slots

    @property
    def reserved(self) -> set[int]:
        return self.scheduler.reserved

    @property
    def failed(self) -> str | None:
        return self.scheduler.failed

    @property
    def accepting(self) -> bool:
        return self.scheduler.accepting

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    def stats(self) -> dict:
        """A plain snapshot of the counters /metrics shows (picklable: it crosses the engine process' pipe)."""
        c = self.caches
        images = c.images
        self_used = c.self_allocator.total - c.self_allocator.free
        tile_used = images.allocator.total - images.allocator.free
        return {"outcomes": dict(self.outcomes), "tokens_generated": self.tokens_generated,
                "prompt_tokens": self.prompt_tokens, "queue_depth": self.queue_depth, "running": self.running,
                "max_batch": self.max_batch, "steps": self.steps,
                "cache_bytes_in_use": self_used * c.bytes_per_self_page
                + (tile_used - images.idle_pages) * c.bytes_per_tile_page,
                "cache_bytes_allocated": c.self_allocator.total * c.bytes_per_self_page
                + images.allocator.total * c.bytes_per_tile_page,
                "pages": {"self": {"used": self_used, "free": c.self_allocator.free},
                          "tile": {"used": tile_used, "free": images.allocator.free,
                                   "cached_idle": images.idle_pages}},
                "image_cache": {"hits": images.hits, "misses": images.misses, "evictions": images.evictions,
                                "images": len(images.entries)},
                "ttft": self.ttft.snapshot(), "itl": self.itl.snapshot(), "busy_seconds": dict(self.busy),
                "overlapped_prefills": self.overlapped, "shared_prefills": self.shared_prefills}

    # -------------------------------------------------------------------------------------------------------
    # Engine thread

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - e.g. a CUDA error: the device is unusable from here on
            requests = self.scheduler.fail(reason_of(e))
            error = f"the engine failed: {self.failed}"
            requests += [r for r, _ in self.pending.group] if self.pending is not None else []
            self.pending = self.inflight = None
            for r in requests:
                self.outcomes["error"] += 1
                r.emit(Event(error=error))
            if self.on_failure is not None:
                self.on_failure(self.failed)

    def _run(self) -> None:
        if self.device.type == "cuda":  # decode steps go before the side stream's encoder kernels
            torch.cuda.set_stream(torch.cuda.Stream(device=self.device, priority=-1))
        while self.scheduler.wait_for_work(lambda: self.pending is not None or self.inflight is not None):
            self._drop_cancelled()
            self._admit()
            self._complete_pending()
            if self.running or self.inflight is not None:
                self._step()
        if self.inflight is not None:  # its tokens are the requests' last ones: emitted before the aborts
            step, self.inflight = self.inflight, None
            self._texts(*self._land(step))
        for slot, r in enumerate(self.slots):
            if r is not None:
                self._finish(r, "abort")
        if self.pending is not None:
            for r, _ in self.pending.group:
                self.outcomes["aborted"] += 1
                r.emit(Event(finish_reason="abort", prompt_tokens=len(r.prompt_ids)))
            self.pending = None
            self.reserved.clear()
        for r in self.scheduler.take_waiting():
            self.outcomes["aborted"] += 1
            r.emit(Event(finish_reason="abort", prompt_tokens=len(r.prompt_ids)))

    def _drop_cancelled(self) -> None:
        # Every request ends with one final event, a cancelled one too: whoever counts requests in flight (the
        # server's admission, across a process boundary) learns here that its slot or queue place is free.
        running, waiting = self.scheduler.take_cancelled()
        gone = [self.slots[slot] for slot in running] + waiting
        for slot in running:
            self._free(slot)
        for r in gone:
            self.outcomes["cancelled"] += 1
            r.emit(Event(finish_reason="cancelled", prompt_tokens=len(r.prompt_ids),
                         completion_tokens=len(r.generated)))

    def _warm_up(self) -> None:
        """Compiles the layer calls (for one row, then for a dynamic row count) and captures a decode graph for
        every rows bucket up to --max-batch, with and without images, before the first request, so that no
        request pays for it (all rows free: they touch the scratch pages only). Then prefills of every shape the
        first requests meet (_warm_up_prefill)."""
        t0 = time.perf_counter()
        for n in (1, 2):  # the second row count makes the compiled layer calls dynamic in it
            for vision in (False, True):
                self.runner([0] * n, [0] * n, vision)
        slots = len(self.slots)
        for rows in sorted({min(b, slots) for b in ROW_BUCKETS}):
            for vision in (False, True):
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
            requests = [GenerationRequest(prompt_ids=ids, params=params, model_inputs=inputs, emit=lambda event: None,
                                          images=[(None, self.max_tiles)] * (1 if inputs else 0))
                        for ids, inputs in group]  # (black warm-up images are not cached)
            for request in requests:
                if not self._reserve(request):
                    raise RuntimeError("the page pools cannot hold the start-up warm-up's requests")
            self._prefill([(request, slot) for slot, request in enumerate(requests)])
            for slot in range(len(group)):
                self._free(slot)
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
            pairs = self.scheduler.next_group(self._image_count, self._reserve, self._all_cached, self._release)
            if not pairs:
                return
            images = self._image_count(pairs[0][0])
            try:
                if images and self.running and self.can_overlap and self.overlap_prefill:
                    self._start_overlapped(pairs)
                    return
                self._prefill_group(pairs)
            finally:
                self.scheduler.admitting = 0
            if self.running > len(pairs):
                return  # decode the running batch before the next group

    def _start_overlapped(self, group: list[tuple[GenerationRequest, int]]) -> None:
        """Queues the group's vision part on the side stream and returns; _complete_pending does the rest."""
        start = time.perf_counter()
        try:
            prefill = self.prefiller.prepare(group, cached=self._cached(group))
            overlapped = self.prefiller.encode(prefill, overlap=True)
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
        for r, slot in group:  # (their pages stay theirs for the retry below)
            self.slots[slot] = None
            self.caches.unbind_row(slot)
            self.reserved.discard(slot)
        if len(group) > 1 or attempt is not None:  # run them one by one, so only the request at fault fails
            for pair in group:
                self._prefill_group([pair])
            return
        r = group[0][0]
        self._release(r)
        self.outcomes["error"] += 1
        r.emit(Event(error=f"{type(failure).__name__}: {failure}"))

    @torch.no_grad()
    def _prefill(self, group: list[tuple[GenerationRequest, int]]) -> None:
        """One forward of the plain model over the group's prompts, left-padded (real tokens keep positions
        0..L-1, so each row computes what it would alone); then each row's K/V go to its slot."""
        prefill = self.prefiller.prepare(group, cached=self._cached(group))
        self.prefiller.encode(prefill, overlap=False, between=self._between_images)
        self._complete(prefill)

    @torch.no_grad()
    def _complete(self, p: Prefill) -> None:
        """The text part of a prefill, then the requests into their slots and their first tokens."""
        logits, cache = self.prefiller.text_part(p)
        cross_mask = p.inputs.get("cross_attention_mask")
        # [rows, N, T]: what every generated token sees
        last_seen = generated_row(cross_mask)[:, 0].cpu() if cross_mask is not None else None
        for (r, slot), row in zip(p.group, p.rows):
            self.prefiller.bind(r, slot, cache, row, p.width - p.lengths[row],
                                None if last_seen is None else last_seen[row], fill=not p.cached)
            r.slot, r.length = slot, p.lengths[row]
            r.decoder = TextDecoder(self.tokenizer, skip_special_tokens=r.skip_special_tokens)
            if r.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(int(r.seed))
            self.slots[slot] = r
            self.reserved.discard(slot)
            self.prompt_tokens += p.lengths[row]
            if r.prompt_logprobs is not None:
                r.pending_logprobs = self._prompt_entries(r)
        self.shared_prefills += len(p.group) - len(p.lengths)
        rows = p.rows if len(p.lengths) < len(p.group) else slice(None)
        self._sample_and_emit([r for r, _ in p.group], logits[rows])

    PROMPT_LOGPROB_ROWS = 512  # prompt positions turned into logprobs at a time (float32 rows of the vocabulary)

    def _prompt_entries(self, r: GenerationRequest) -> list[dict]:
        """The logprob entries of a request's prompt tokens ({"id", "logprob", "top", "prompt": True}; the first
        token's logprob and top are None), from a plain forward of the model over the prompt alone (its images
        included): what scoring a text (echo with logprobs) asks for."""
        inputs = {name: value.to(self.device) for name, value in r.model_inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = torch.tensor([r.prompt_ids], device=self.device)
        logits = self.model(input_ids=ids, **inputs).logits[0]
        entries = [{"id": r.prompt_ids[0], "logprob": None, "top": None, "prompt": True}]
        for start in range(0, len(r.prompt_ids) - 1, self.PROMPT_LOGPROB_ROWS):
            rows = torch.log_softmax(logits[start:start + self.PROMPT_LOGPROB_ROWS].float(), dim=-1)
            following = ids[0, start + 1:start + 1 + rows.shape[0]]
            vocab = rows.shape[-1]  # (the image token is past it: the model never predicts it, so it has none)
            chosen = rows.gather(1, following.clamp(max=vocab - 1)[:, None]).squeeze(1).tolist()
            top = torch.topk(rows, r.prompt_logprobs, dim=-1) if r.prompt_logprobs else None
            values, where = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
            for i, token in enumerate(following.tolist()):
                entries.append({"id": token, "logprob": chosen[i] if token < vocab else None, "prompt": True,
                                "top": list(zip(where[i], values[i])) if top is not None else []})
        return entries

    def _between_images(self) -> None:
        """A decode step of the running batch between two requests' images of a group prefill."""
        if not self.running:
            return
        if self.device.type == "cuda":  # the encoder's wait counts as prefill time, not decode
            torch.cuda.current_stream(self.device).synchronize()
        self._step()

    def _step(self) -> None:
        """One decode step of the running batch, read one step late: the next step is queued first, taking its
        tokens straight from the device, and the host reads, detokenizes, checks stops and sends events while the
        GPU computes it, instead of the GPU waiting for the host between steps. Rows that need more than the
        argmax (sampling, a grammar, ...) have their choice queued behind their step as soon as the previous
        step's tokens are read (a grammar's next mask needs them), so it too is ready before the next step
        starts. A request that ends in the step read late was computed once more in the step queued meanwhile;
        that row is ignored (a request's last position is known beforehand, so no row ever writes past the
        context)."""
        launched = self._launch()
        previous, self.inflight = self.inflight, None
        landed = self._land(previous) if previous is not None else None
        if launched is not None and launched.logits is not None:
            self._queue_choice(launched)
        if landed is not None:
            self._texts(*landed)
        self.inflight = launched

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
                given[r.slot] = False  # its token is the choice of the step in flight, on the device
            else:
                tokens[r.slot] = r.generated[-1]
            positions[r.slot] = r.length  # the new token's index = its RoPE position (prompts are unpadded)
        vision = any(r.images for r in active)  # (False: no row sees an image, the cross layers are skipped)
        start = time.perf_counter()
        try:
            logits = self.runner(tokens, positions, vision, given)
        except Exception as e:  # fail the batch, keep serving
            for r in active:
                self._free(r.slot)
                self.outcomes["error"] += 1
                r.emit(Event(error=f"{type(e).__name__}: {e}"))
            return None
        self.steps += 1
        for r in active:
            r.length += 1
        step = _Step(active, start, rows=n)
        if any(chosen_on_host(r, c) or r.logprobs is not None for r, c in zip(active, counts)):
            step.logits = logits  # its choice is queued once the step in flight is read (_step)
        else:
            self._copy_tokens(step)
        step.launch_seconds = time.perf_counter() - start
        return step

    def _queue_choice(self, step: _Step) -> None:
        """Queues the choice of a step's rows into the runner's greedy tokens, where the next step reads them."""
        start = time.perf_counter()
        step.requests = [r for r in step.requests if self.slots[r.slot] is r]
        step.choice = self.chooser(step.requests, step.logits, [r.slot for r in step.requests], self.runner.greedy)
        step.logits = None
        for i, e in step.choice.failed.items():
            self._fail(step.requests[i], "sampling", e)
        step.choice.to_host()
        self._copy_tokens(step)
        step.launch_seconds += time.perf_counter() - start

    def _copy_tokens(self, step: _Step) -> None:
        step.tokens = to_host(self.runner.greedy[:step.rows])
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()

    def _land(self, step: _Step) -> tuple[list[GenerationRequest], list[int]]:
        """Reads a queued step's tokens (waiting for it) and appends them (_append); returns what _texts sends."""
        wait = time.perf_counter()
        if step.done is not None:
            step.done.synchronize()
        tokens = step.tokens.tolist()
        self.busy["decode"] += step.launch_seconds + time.perf_counter() - wait
        chosen = [tokens[r.slot] for r in step.requests]
        entries = step.choice.entries(step.requests, chosen) if step.choice is not None else None
        return self._append(step.requests, chosen, entries)

    def _sample_and_emit(self, requests: list[GenerationRequest], logits: torch.Tensor) -> None:
        """The first tokens of prefilled requests: chosen, read and sent at once."""
        out = logits.argmax(-1)
        choice = self.chooser(requests, logits, list(range(len(requests))), out)
        for i, e in choice.failed.items():
            self._fail(requests[i], "sampling", e)
        chosen = out.tolist()
        self._texts(*self._append(requests, chosen, choice.entries(requests, chosen)))

    def _end_tokens(self, r: GenerationRequest) -> tuple[int, ...]:
        return self.eos if r.end_tokens is None else r.end_tokens

    def _append(self, requests: list[GenerationRequest], chosen: list[int], entries: list | None
                ) -> tuple[list[GenerationRequest], list[int]]:
        """Appends each request's chosen token (and logprob entry) to those that still run (not cancelled,
        failed or ended meanwhile), records latencies and moves a grammar past the token (before its next mask is
        made); returns those requests and their tokens, for _texts (which skips any that failed here)."""
        now = time.monotonic()
        live = [row for row, r in enumerate(requests) if self.slots[r.slot] is r]
        for row in live:
            r, token = requests[row], chosen[row]
            if r.generated:
                self.itl.observe(now - r.last_token_time)
            else:
                self.ttft.observe(now - r.submitted)
            r.last_token_time = now
            r.generated.append(token)
            self.tokens_generated += 1
            r.pending_ids.append(token)
            if entries is not None and entries[row] is not None:
                r.pending_logprobs.append(entries[row])
            if r.constraint is not None:
                try:
                    r.constraint.accept(token, self._end_tokens(r))
                except Exception as e:  # noqa: BLE001
                    self._fail(r, "sampling", e)
        return [requests[row] for row in live], [chosen[row] for row in live]

    def _texts(self, requests: list[GenerationRequest], chosen: list[int]) -> None:
        """Sends each request what its new token adds (or ends the request)."""
        emit_start = time.perf_counter()
        for r, token in zip(requests, chosen):
            if self.slots[r.slot] is not r:
                continue  # failed or ended since
            try:
                self._advance_text(r, token)
            except Exception as e:  # noqa: BLE001 - detokenizing or the caller's emit failed: end this request only
                self._fail(r, "emitting its output", e)
        self.busy["emit"] += time.perf_counter() - emit_start

    def _fail(self, r: GenerationRequest, stage: str, error: BaseException) -> None:
        """Ends one request with an error event; the engine and the other requests go on."""
        if 0 <= r.slot < len(self.slots) and self.slots[r.slot] is r:
            self._free(r.slot)
        self.outcomes["error"] += 1
        try:
            r.emit(Event(error=f"{stage} failed: {type(error).__name__}: {error}", prompt_tokens=len(r.prompt_ids),
                         completion_tokens=len(r.generated)))
        except Exception:  # noqa: BLE001 - its caller is gone; nobody else to tell
            pass

    def _advance_text(self, r: GenerationRequest, token: int) -> None:
        finish = advance_text(r, token, self.eos if r.end_tokens is None else r.end_tokens)
        if finish is not None:
            self._finish(r, finish)

    def _finish(self, r: GenerationRequest, reason: str) -> None:
        self._free(r.slot)
        self.outcomes[{"stop": "stop", "length": "length"}.get(reason, "aborted")] += 1
        r.emit(final_event(r, reason))


def sampling_params(engine: BatchEngine, max_tokens: int, temperature: float | None, top_p: float | None,
                    top_k: int = 0, repetition_penalty: float = 1.0, min_tokens: int = 0,
                    ignore_eos: bool = False, logit_bias: tuple[tuple[int, float], ...] = (),
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    stop_token_ids: tuple[int, ...] = (), min_p: float = 0.0) -> SamplingParams:
    """OpenAI's knobs over the checkpoint's generation_config: temperature 0 means greedy; a temperature not
    given takes the checkpoint's do_sample/temperature/top_p (so an instruct checkpoint keeps its defaults).
    vLLM's extras: top_k (0 = off), min_p (0 = off), repetition_penalty (1 = off), min_tokens (no end token before them),
    ignore_eos (only max_tokens and stop strings end the answer), stop_token_ids (more end tokens: min_tokens
    holds them back too). OpenAI's logit_bias and presence/frequency penalties as SamplingParams defines them."""
    d = engine.defaults
    if temperature is None:
        do_sample = bool(d.get("do_sample", False))
        temperature = float(d.get("temperature") or 1.0)
    else:
        do_sample = temperature > 0
        temperature = temperature if temperature > 0 else 1.0
    top_p = float(d.get("top_p") or 1.0) if top_p is None else float(top_p)
    params = SamplingParams(max_new_tokens=max_tokens, min_new_tokens=min_tokens, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty,
                            eos_token_id=(() if ignore_eos else engine.eos) + tuple(stop_token_ids),
                            logit_bias=logit_bias,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    params.validate()
    return params
