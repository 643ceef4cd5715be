"""CUDA graphs, captured once per shape and replayed: the one place that captures them.

A graph records the kernels one call launches, so a replay costs one launch instead of hundreds (the decode step
of the 11B model launches ~1,000, its vision encoder ~900: eagerly the host, not the GPU, sets the pace). Every
graph user in mllama (generate's decode step, the server's decode steps, the vision encoder, one-request text
prefills) goes through `GraphCache`:

- warm-up calls and the capture run on a side stream (as torch requires), after the current stream's work;
- all graphs of a cache share one memory pool, so their intermediates take the memory of the largest, not the sum;
- least recently used graphs are dropped past `max_graphs` (and past `budget_bytes` of the outputs they keep);
- a capture that fails (a host read inside the function, out of memory, a compiler error in the warm-up that
  `on_warm_up_error` could not repair) leaves the cache `failed`, with the reason, and the caller runs eagerly.

The function captured reads its inputs from static tensors, which the caller fills before each replay; its
outputs are the graph's own tensors, overwritten by the next replay.
"""
from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch


def reason_of(error: BaseException) -> str:
    """One line naming an exception, for a fallback's message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


@dataclass
class Captured:
    graph: Any  # torch.cuda.CUDAGraph
    output: Any  # what the function returned during the capture: the graph's static outputs
    state: Any = None  # the caller's (e.g. the static inputs the function reads)
    nbytes: int = 0  # bytes of outputs the graph keeps (counted against budget_bytes)

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


class GraphCache:
    def __init__(self, name: str, max_graphs: int = 64, budget_bytes: int | None = None, warm_ups: int = 2):
        self.name = name
        self.max_graphs, self.budget_bytes, self.warm_ups = max_graphs, budget_bytes, warm_ups
        self.graphs: collections.OrderedDict[Any, Captured] = collections.OrderedDict()
        self.pool = None  # made at the first capture (an unused pool handle does not survive empty_cache())
        self.failed: str | None = None

    def __contains__(self, key) -> bool:
        return key in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def get(self, key) -> Captured | None:
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
        return entry

    def clear(self) -> None:
        """Drops every graph and the pool (their memory goes back to torch's allocator)."""
        self.graphs.clear()
        self.pool = None

    def capture(self, key, fn: Callable[[], Any], state: Any = None,
                on_warm_up_error: Callable[[BaseException], None] | None = None,
                nbytes: Callable[[Any], int] | None = None) -> Captured | None:
        """Captures `fn` for `key` (after warm-up calls) and returns it, not yet replayed; None if it failed."""
        if self.failed is not None:
            return None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):  # first calls: compilation, attention plans, cuBLAS workspaces
                for i in range(self.warm_ups):
                    try:
                        fn()
                    except Exception as e:  # noqa: BLE001 - e.g. the compiler failed: the caller may repair it
                        if i or on_warm_up_error is None:
                            raise
                        on_warm_up_error(e)
                        fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = fn()
        except Exception as e:  # noqa: BLE001 - stay eager from here on, and say why
            torch.cuda.current_stream().wait_stream(stream)
            self.failed = reason_of(e)
            warnings.warn(f"capturing {self.name} as a CUDA graph failed ({self.failed}); it runs eagerly")
            return None
        torch.cuda.current_stream().wait_stream(stream)
        entry = Captured(graph, output, state, nbytes(output) if nbytes is not None else 0)
        self.graphs[key] = entry
        self._evict(keep=key)
        return entry

    def _evict(self, keep) -> None:
        def over() -> bool:
            if len(self.graphs) > self.max_graphs:
                return True
            return self.budget_bytes is not None and sum(g.nbytes for g in self.graphs.values()) > self.budget_bytes

        while len(self.graphs) > 1 and over():
            oldest = next(iter(self.graphs))
            if oldest == keep:
                break
            self.graphs.pop(oldest)
