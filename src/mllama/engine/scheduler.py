"""The engine's scheduler: the waiting queue, the slots of the running batch, admission, the grouping of prefills
and cancellation.

Plain Python, no torch: what the scheduler must know of a request (how many images it has, whether its pages can
be taken now, whether it needs no vision encoder) the engine passes in as functions, so the rules are tested on
fake requests (tests/test_scheduler.py). A request needs only `cancelled` (set by any thread), `slot` and
`share`.
The queue is shared with the threads that submit (under `lock`); the slots belong to the engine thread.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


# A queue at most this long is prefilled a request at a time (each gets its first token soonest); a longer one in
# groups, which costs less per request (the text part of a prefill is mostly fixed cost).
ONE_AT_A_TIME_QUEUE = 8


class Scheduler:
    def __init__(self, slots: int, max_queue: int, max_prefill_batch: int):
        self.slots: list[Any] = [None] * slots
        self.waiting: collections.deque = collections.deque()
        self.lock = threading.Condition()
        self.reserved: set[int] = set()  # slots of a prefill under way (not yet in `slots`)
        # requests taken off the queue by next_group whose prefill is under way (neither waiting nor in a slot):
        # set with the taking, under the lock, so that a stop waiting for work in flight never misses them
        self.admitting = 0
        self.max_queue, self.max_prefill_batch = max_queue, max_prefill_batch
        self.accepting = True
        self.stopping = False
        self.failed: str | None = None

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def submit(self, request) -> None:
        """Queues a request, or raises EngineStopped / QueueFull at once."""
        self.submit_many([request])

    def submit_many(self, requests: list) -> None:
        """Queues requests together (none is taken before the last is queued), or raises for them all."""
        with self.lock:
            if self.failed is not None:
                raise EngineStopped(f"the engine failed: {self.failed}")
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            # Requests that a free slot takes at the next step are not queued in any real sense.
            free = sum(r is None for r in self.slots)
            if len(self.waiting) + len(requests) > self.max_queue + free:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            now = time.monotonic()
            for request in requests:
                request.submitted = now
                self.waiting.append(request)
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def wait_for_work(self, busy: Callable[[], bool], timeout: float = 0.5) -> bool:
        """Blocks while there is nothing to do (no request waiting or running and `busy()` false); False once
        the engine is stopping."""
        with self.lock:
            while not self.stopping and not self.waiting and not self.running and not busy():
                self.lock.wait(timeout=timeout)
            return not self.stopping

    def next_group(self, images_of: Callable[[Any], int], reserve: Callable[[Any], bool],
                   alone: Callable[[Any], bool], release: Callable[[Any], None]) -> list[tuple[Any, int]]:
        """The next requests to prefill together, each with its free slot, taken off the queue; [] if none can
        start now.

        A group holds requests with the same number of images as the head of the queue, in queue order:
        one at a time for a short queue, else up to max_prefill_batch images (a text-only request counting as
        one), so that a group of 4-image requests stalls the running decodes no longer than one of 1-image
        requests. `reserve` takes a request's pages: a request whose pages are not free ends the group, and
        it and the requests behind it wait, in order. A request `alone` says needs no vision encoder (its
        images are cached) is prefilled on its own: if others are in the group already, `release` gives its
        pages back and it waits for the next group. Waiting requests that `share` a prompt with one in the group
        (the n choices of a prompt; the engine prefills them once) join it while free slots and pages last,
        beyond the group's size. The caller sets `admitting` back to 0 once the group is in its slots (or
        failed)."""
        with self.lock:
            free = [i for i, r in enumerate(self.slots) if r is None and i not in self.reserved]
            if not free or not self.waiting:
                return []
            images = images_of(self.waiting[0])
            size = 1 if len(self.waiting) <= ONE_AT_A_TIME_QUEUE else self.max_prefill_batch
            size = max(1, size // max(1, images))
            group = []
            for r in list(self.waiting):
                if len(group) == min(len(free), size):
                    break
                if images_of(r) != images:
                    continue
                if not reserve(r):
                    break
                if alone(r):
                    if group:
                        release(r)
                    else:
                        group.append(r)
                    break
                group.append(r)
            shares = {r.share for r in group if r.share is not None}
            for r in list(self.waiting) if shares else ():
                if len(group) == len(free):
                    break
                if r not in group and r.share in shares:
                    if not reserve(r):
                        break
                    group.append(r)
            for r in group:
                self.waiting.remove(r)
            self.admitting = len(group)
            return list(zip(group, free))

    def take_cancelled(self) -> tuple[list[int], list[Any]]:
        """The slots of running requests that were cancelled (still in `slots`: the engine frees them) and the
        cancelled requests taken off the queue."""
        slots = [i for i, r in enumerate(self.slots) if r is not None and r.cancelled]
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        return slots, gone

    def take_waiting(self) -> list[Any]:
        """Every queued request, off the queue (to abort them)."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        return waiting

    def fail(self, reason: str) -> list[Any]:
        """The engine failed: no more requests; returns every request it held (queued or running)."""
        self.failed, self.accepting = reason, False
        held = [r for r in self.slots if r is not None] + self.take_waiting()
        self.slots = [None] * len(self.slots)
        return held
