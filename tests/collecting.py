"""An engine request's events, collected for a test."""
from __future__ import annotations

import threading

from mllama.engine.requests import Event


class Collector:
    """The `emit` of one request: keeps its events; `done` is set by the final one. With `fail_on=k` it raises on
    the k-th event that is not final, as a client callback that breaks would."""

    def __init__(self, fail_on: int | None = None):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.fail_on = fail_on

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason or event.error:
            self.done.set()
        elif self.fail_on is not None and len(self.events) == self.fail_on:
            raise RuntimeError("the client's callback broke")

    @property
    def ids(self) -> list[int]:
        return [i for e in self.events for i in e.token_ids]
