"""Waiting in tests: for an observable state (a metric, an event, a process state), never for a duration.

The guard only turns a hang into a failure with a message; it is far above how long anything waited for here
really takes, even on a busy machine, so it never decides whether a test passes."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

GUARD = 180.0  # seconds: a hang guard, not a speed check


def wait_until(predicate: Callable[[], T], what: str, guard: float = GUARD, poll: float = 0.02,
               state: Callable[[], object] | None = None) -> T:
    """Calls `predicate` until it returns something true, and returns that. After `guard` seconds it fails,
    naming `what` was awaited and, if given, what `state()` says now. The pause between two calls only keeps the
    loop from spinning; the order of events comes from the state the predicate reads."""
    end = time.monotonic() + guard
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            now = f"; now: {state()}" if state is not None else ""
            raise AssertionError(f"gave up after {guard:.0f} s waiting for {what}{now}")
        time.sleep(poll)  # poll
