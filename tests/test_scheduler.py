"""The scheduler's rules on fake requests (no model): queue limits, groups of prefills, waiting for pages,
prefilling cached requests alone, cancellation."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from mllama.engine.scheduler import EngineStopped, QueueFull, Scheduler


@dataclass(eq=False)
class Fake:
    name: str
    images: int = 0
    cached: bool = False
    cancelled: bool = False
    slot: int = -1
    submitted: float = 0.0
    share: str | None = None


def _queue(scheduler: Scheduler, *requests: Fake) -> None:
    for r in requests:
        scheduler.submit(r)


def _group(scheduler: Scheduler, reserve=lambda r: True, released=None):
    released = [] if released is None else released
    return scheduler.next_group(lambda r: r.images, reserve, lambda r: r.cached, released.append)


def test_a_short_queue_goes_one_at_a_time_and_a_long_one_in_groups():
    s = Scheduler(slots=6, max_queue=16, max_prefill_batch=4)
    _queue(s, *(Fake(f"t{i}") for i in range(3)))
    assert [(r.name, slot) for r, slot in _group(s)] == [("t0", 0)]
    assert s.admitting == 1 and [r.name for r in s.waiting] == ["t1", "t2"]
    _queue(s, *(Fake(f"u{i}") for i in range(8)))  # 10 waiting: groups of max_prefill_batch
    assert [(r.name, slot) for r, slot in _group(s)] == [("t1", 0), ("t2", 1), ("u0", 2), ("u1", 3)]
    s.slots[:4] = ["busy"] * 4
    s.reserved.add(4)  # a slot of a prefill under way is not free either
    assert [(r.name, slot) for r, slot in _group(s)] == [("u2", 5)]


def test_groups_count_images_and_keep_the_queue_order():
    s = Scheduler(slots=8, max_queue=16, max_prefill_batch=4)
    _queue(s, Fake("a", 2), Fake("b", 1), Fake("c", 2), Fake("d", 2), *(Fake(f"t{i}") for i in range(6)))
    # the head has 2 images: groups of 4 // 2 requests with 2 images each, the others left where they were
    assert [r.name for r, _ in _group(s)] == ["a", "c"]
    assert [r.name for r in s.waiting][:3] == ["b", "d", "t0"]


def test_a_request_whose_pages_are_not_free_waits_with_those_behind_it():
    s = Scheduler(slots=8, max_queue=16, max_prefill_batch=4)
    _queue(s, *(Fake(f"t{i}") for i in range(10)))
    free = {"t0", "t1", "t3"}  # t2's pages are not free: t3, though it would fit, must not pass it
    assert [r.name for r, _ in _group(s, reserve=lambda r: r.name in free)] == ["t0", "t1"]
    assert [r.name for r in s.waiting] == [f"t{i}" for i in range(2, 10)]
    assert _group(s, reserve=lambda r: False) == [] and len(s.waiting) == 8


def test_a_request_with_cached_images_is_prefilled_alone():
    s = Scheduler(slots=8, max_queue=16, max_prefill_batch=4)
    _queue(s, *(Fake(f"t{i}", 1) for i in range(9)))
    s.waiting[2].cached = True
    released = []
    assert [r.name for r, _ in _group(s, released=released)] == ["t0", "t1"]  # it ends the group, unreserved
    assert [r.name for r in released] == ["t2"] and s.waiting[0].name == "t2"
    assert [r.name for r, _ in _group(s, released=released)] == ["t2"]  # then goes alone
    assert len(released) == 1


def test_cancelled_requests_leave_the_slots_and_the_queue():
    s = Scheduler(slots=3, max_queue=16, max_prefill_batch=4)
    running = [Fake("r0"), Fake("r1", cancelled=True), None]
    s.slots[:] = running
    _queue(s, Fake("w0"), Fake("w1"), Fake("w2"))
    s.waiting[1].cancelled = True
    slots, gone = s.take_cancelled()
    assert slots == [1] and [r.name for r in gone] == ["w1"]
    assert [r.name for r in s.waiting] == ["w0", "w2"]


def test_the_queue_limit_counts_free_slots_and_a_stopped_scheduler_refuses():
    s = Scheduler(slots=2, max_queue=1, max_prefill_batch=4)
    _queue(s, Fake("a"), Fake("b"), Fake("c"))  # two go to the free slots at the next step, one waits
    with pytest.raises(QueueFull, match="--max-queue 1"):
        s.submit(Fake("d"))
    assert [r.name for r in s.fail("CUDA error")] == ["a", "b", "c"] and not s.waiting
    with pytest.raises(EngineStopped, match="the engine failed: CUDA error"):
        s.submit(Fake("e"))
    stopped = Scheduler(slots=2, max_queue=1, max_prefill_batch=4)
    stopped.accepting = False
    with pytest.raises(EngineStopped, match="shutting down"):
        stopped.submit(Fake("f"))


def test_choices_that_share_a_prompt_join_its_group_while_slots_and_pages_last():
    s = Scheduler(slots=4, max_queue=16, max_prefill_batch=4)
    s.submit_many([Fake("a0", share="a"), Fake("b"), Fake("a1", share="a"), Fake("a2", share="a"),
                   Fake("a3", share="a"), Fake("a4", share="a")])
    # a short queue goes one at a time, but a0's siblings come with it (b keeps its place), up to the free slots
    assert [(r.name, slot) for r, slot in _group(s)] == [("a0", 0), ("a1", 1), ("a2", 2), ("a3", 3)]
    assert [r.name for r in s.waiting] == ["b", "a4"]
    s.slots[:4] = [None] * 4
    assert [r.name for r, _ in _group(s)] == ["b"]  # it shares with nobody: a4 waits for a group of its own
    s.submit_many([Fake("a5", share="a"), Fake("a6", share="a")])
    pages = iter([True, True, False])  # a4's and a5's pages are free, a6's are not: a6 waits
    assert [r.name for r, _ in _group(s, reserve=lambda r: next(pages))] == ["a4", "a5"]
    with pytest.raises(QueueFull):  # together or not at all
        s.submit_many([Fake(f"x{i}") for i in range(20)])
    assert [r.name for r in s.waiting] == ["a6"]
