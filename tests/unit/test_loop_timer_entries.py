"""selectws.transport.loop: objects that are their own timer (TimerEntry, EventLoop.arm / disarm).

A connection's one timer is the connection itself: the loop keeps the entries due in the same tick in one
bucket (a list threaded through the entries), with one heap Timer per bucket. What these tests pin: no Timer and
no float per entry, O(1) moves later and earlier, a disarmed entry is referenced by nothing (freed at once), never
early, ``timer_count`` counts entries (not buckets). A real loop and the real clock; waits of tens of ms at most.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest

from selectws.transport.loop import EventLoop, Timer, TimerEntry


class Entry(TimerEntry):
    """Like a connection: slots, its own timer, called when it is due."""

    __slots__ = ("__weakref__", "calls", "on_call")

    def __init__(self) -> None:
        self._tnext = self._tprev = None
        self.calls: list[float] = []
        self.on_call = None

    def __call__(self) -> None:
        self.calls.append(time.monotonic())
        if self.on_call is not None:
            self.on_call()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    yield ev
    ev.close()


def run_until(loop: EventLoop, condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        loop.run_once(0.01)


def test_entries_due_together_share_one_heap_timer_and_each_counts_as_a_timer(loop: EventLoop) -> None:
    when = time.monotonic() + 30.0
    entries = [Entry() for _ in range(50)]
    for entry in entries:
        loop.arm(entry, when)
    assert all(entry.armed for entry in entries)
    assert loop.timer_count == 50  # one timer per entry, as far as anyone counting timers is concerned
    assert loop.timer_heap_size == 1  # but one heap entry (and one Timer, one float) for the whole tick
    assert sum(1 for obj in gc.get_objects() if isinstance(obj, Timer) and obj._loop is loop) == 1


def test_an_armed_entry_fires_once_never_before_its_deadline(loop: EventLoop) -> None:
    entry = Entry()
    when = time.monotonic() + 0.03
    loop.arm(entry, when)
    run_until(loop, lambda: entry.calls)
    assert entry.calls[0] >= when  # rounded up to its tick (under 1/128 of the delay, or 1 ms): never early
    assert not entry.armed and loop.timer_count == 0
    loop.run_once(0.03)
    assert len(entry.calls) == 1


def test_rearming_later_or_earlier_moves_the_one_timer(loop: EventLoop) -> None:
    entry = Entry()
    now = time.monotonic()
    loop.arm(entry, now + 0.02)
    loop.arm(entry, now + 0.1)  # later: moved, not fired at the first deadline
    run_until(loop, lambda: time.monotonic() > now + 0.06)
    assert entry.calls == [] and loop.timer_count == 1
    loop.arm(entry, now + 0.07)  # earlier than the queued deadline: moved too, no second timer
    assert loop.timer_count == 1
    run_until(loop, lambda: entry.calls)
    assert now + 0.07 <= entry.calls[0] < now + 0.1
    run_until(loop, lambda: time.monotonic() > now + 0.13)
    assert len(entry.calls) == 1 and loop.timer_count == 0


def test_a_disarmed_entry_never_fires_and_is_referenced_by_nothing(loop: EventLoop) -> None:
    entry = Entry()
    other = Entry()
    alive = weakref.ref(entry)
    when = time.monotonic() + 0.02
    loop.arm(entry, when)
    loop.arm(other, when)  # the same bucket: it stays
    loop.disarm(entry)
    loop.disarm(entry)  # twice: nothing more happens
    assert not entry.armed and loop.timer_count == 1
    del entry
    assert alive() is None  # by reference count alone, now: not when the deadline would have come
    run_until(loop, lambda: other.calls)
    assert loop.timer_count == 0


def test_the_last_entry_leaving_a_bucket_cancels_its_timer(loop: EventLoop) -> None:
    entries = [Entry() for _ in range(3)]
    when = time.monotonic() + 0.02
    for entry in entries:
        loop.arm(entry, when)
    for entry in entries:
        loop.disarm(entry)
    assert loop.timer_count == 0
    assert loop.timer_heap_size == 1  # the bucket's Timer, cancelled: popped at its deadline as usual
    run_until(loop, lambda: loop.timer_heap_size == 0)
    assert all(entry.calls == [] for entry in entries)


def test_an_entry_may_rearm_itself_or_disarm_another_of_its_bucket_when_it_fires(loop: EventLoop) -> None:
    first, second, third = Entry(), Entry(), Entry()
    when = time.monotonic() + 0.02
    for entry in (first, second, third):
        loop.arm(entry, when)

    def first_fires() -> None:
        first.on_call = None  # once
        loop.disarm(second)
        loop.arm(first, time.monotonic() + 0.02)

    first.on_call = first_fires
    run_until(loop, lambda: third.calls)
    assert second.calls == [] and not second.armed
    assert len(first.calls) == 1 and first.armed
    run_until(loop, lambda: len(first.calls) == 2)
    assert loop.timer_count == 0


def test_an_entry_armed_for_a_past_time_fires_in_the_next_iteration(loop: EventLoop) -> None:
    entry = Entry()
    loop.arm(entry, time.monotonic() - 5.0)
    loop.run_once(0.5)
    assert len(entry.calls) == 1


def test_an_entry_armed_for_ever_never_fires(loop: EventLoop) -> None:
    entry = Entry()
    loop.arm(entry, float("inf"))
    loop.run_once(0.02)
    assert entry.calls == [] and entry.armed and loop.timer_count == 1
    loop.disarm(entry)
    assert loop.timer_count == 0


def test_entries_of_many_ticks_fire_in_deadline_order(loop: EventLoop) -> None:
    now = time.monotonic()
    order: list[int] = []
    entries = []
    for i in (5, 1, 4, 2, 3):
        entry = Entry()
        entry.on_call = lambda i=i: order.append(i)
        loop.arm(entry, now + i * 0.02)
        entries.append(entry)
    run_until(loop, lambda: len(order) == 5)
    assert order == [1, 2, 3, 4, 5]
