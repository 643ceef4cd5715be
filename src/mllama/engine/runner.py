"""The server's decode step for the running batch, over the paged caches, replayed as CUDA graphs."""
from __future__ import annotations

import warnings

import torch

from .decode import LayerCalls, decode_step, fuse_projections
from .graphs import GraphCache, reason_of
from .paged import PagedCaches


def _bucket(value: int, buckets: tuple[int, ...], cap: int) -> int:
    return min(cap, next((b for b in buckets if b >= value), cap))


ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeRunner:
    """One decode step for slots 0..n-1 over the paged caches (engine.decode.decode_step through the model's own
    layers): on CUDA as CUDA graphs, one per rows bucket and per "does any row see an image", over compiled layer
    calls; elsewhere eagerly. Rows between n and the bucket are free slots: their tables point at the scratch
    page, so what they compute touches no request. Every graph writes its logits into one buffer."""

    def __init__(self, model, caches: PagedCaches, use_graphs: bool):
        fuse_projections(model)
        self.model, self.caches = model, caches
        self.use_graphs = use_graphs
        slots = caches.self_table.shape[0]
        device = caches.self_table.device
        # Inputs of a step (static addresses, read by every graph): tokens given by the host, and per row whether
        # the host gave its token or the row continues from the previous step's greedy choice, `carried`.
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.from_host = torch.ones(slots, dtype=torch.long, device=device)
        self.carried = torch.zeros(slots, dtype=torch.long, device=device)
        # Output besides the logits: each row's greedy token (argmax), which the next step can take without the
        # host reading it first (see BatchEngine._launch).
        self.greedy = torch.zeros(slots, dtype=torch.long, device=device)
        # one compiled function for every layer call; its row count becomes dynamic at the first recompile
        self.calls = LayerCalls("engine_decode_layer", compile=use_graphs, dynamic=None)
        self.graphs = GraphCache("the server's decode step", max_graphs=2 * len(ROW_BUCKETS))
        self.logits: torch.Tensor | None = None  # [slots, vocab], written by every graph
        self.compile_error: str | None = None

    def _eager(self, n: int, vision: bool) -> torch.Tensor:
        c = self.caches
        tokens = torch.where(self.from_host[:n] > 0, self.tokens[:n], self.carried[:n])
        logits = decode_step(self.model, tokens, c.positions[:n], c.views, row_mask=c.row_mask[:n], vision=vision,
                             call=self.calls)
        self.greedy[:n].copy_(logits.argmax(-1))
        return logits

    def _compiler_failed(self, error: BaseException) -> None:
        self.compile_error = reason_of(error)
        warnings.warn(f"torch.compile of the batched decode step failed ({self.compile_error}); using eager kernels")
        self.calls.eager()

    def _graph(self, rows: int, vision: bool):
        if self.logits is None:
            head = self.model.lm_head.weight
            self.logits = torch.empty(self.tokens.shape[0], head.shape[0], dtype=head.dtype, device=head.device)

        def step() -> torch.Tensor:
            self.logits[:rows].copy_(self._eager(rows, vision))
            return self.logits[:rows]

        key = (rows, vision)
        return self.graphs.get(key) or self.graphs.capture(key, step, on_warm_up_error=self._compiler_failed)

    @torch.no_grad()
    def __call__(self, tokens: list[int], positions: list[int], vision: bool,
                 from_host: list[bool] | None = None) -> torch.Tensor:
        """tokens/positions: one entry per slot 0..n-1 (free slots: 0). A row whose `from_host` entry is False
        ignores its entry in `tokens` and takes the greedy token the previous call chose for it (still on the
        device). Returns logits [n, vocab]; `self.greedy[:n]` holds their argmax."""
        n = len(tokens)
        given = [1] * n if from_host is None else [int(bool(f)) for f in from_host]
        rows = _bucket(n, ROW_BUCKETS, self.tokens.shape[0]) if self.use_graphs else n
        pad = rows - n
        # greedy -> carried outside the graphs: a capture's warm-up runs write `greedy` but never read it
        self.carried[:rows].copy_(self.greedy[:rows])
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, given + [1] * pad], dtype=torch.long)
        if self.use_graphs:
            host = host.pin_memory()
        self.tokens[:rows].copy_(host[0], non_blocking=True)
        self.caches.positions[:rows].copy_(host[1], non_blocking=True)
        self.from_host[:rows].copy_(host[2], non_blocking=True)
        if not self.use_graphs:
            return self._eager(n, vision)
        entry = self._graph(rows, vision)
        if entry is None:  # (why: self.graphs.failed)
            return self._eager(rows, vision)[:n]
        return entry.replay()[:n]
