"""selectws.transport.loop: timers (cancel, compaction, re-arming in place), one iteration at a time, signals.

Everything runs on a real :class:`EventLoop` (a real selector, the real clock); the waits are a few tens of
milliseconds at most.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
import weakref
from collections.abc import Iterator

import pytest

from selectws.transport.loop import EventLoop


class Callback:
    """A timer callback object, like a connection that is its own timer callback (``__call__``)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self) -> None:
        self.calls.append(time.monotonic())


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


# ---------------------------------------------------------------------------------------------- cancel
def test_a_cancelled_timer_releases_its_callback_at_once(loop: EventLoop) -> None:
    callback = Callback()
    alive = weakref.ref(callback)
    timer = loop.call_later(20.0, callback)  # a connection's close timeout is about this long
    timer.cancel()
    del callback
    # Not after the deadline, not after a collection: now, by reference count alone.
    assert alive() is None
    assert timer.cancelled
    assert loop.timer_count == 0


def test_a_fired_timer_releases_its_callback(loop: EventLoop) -> None:
    callback = Callback()
    alive = weakref.ref(callback)
    timer = loop.call_later(0.0, callback)
    loop.run_once(0.5)
    assert len(callback.calls) == 1
    del callback
    assert alive() is None
    timer.cancel()  # cancelling a timer that already fired changes nothing
    assert loop.timer_count == 0 and loop.timer_heap_size == 0


def test_a_cancelled_timer_never_fires(loop: EventLoop) -> None:
    callback = Callback()
    loop.call_later(0.0, callback).cancel()
    loop.run_once(0.02)
    loop.run_once(0.02)
    assert callback.calls == []
    assert loop.timer_heap_size == 0  # its entry was popped when its deadline came


def test_timer_count_is_the_live_timers_and_cancelling_twice_counts_once(loop: EventLoop) -> None:
    timers = [loop.call_later(10.0 + i, Callback()) for i in range(10)]
    assert loop.timer_count == 10
    timers[3].cancel()
    timers[3].cancel()
    assert loop.timer_count == 9
    assert loop.timer_heap_size == 10  # below the compaction minimum: the entry stays until its deadline


# ---------------------------------------------------------------------------------------------- compaction
def test_the_heap_is_compacted_when_more_than_half_of_its_entries_are_cancelled(loop: EventLoop) -> None:
    timers = [loop.call_later(100.0 + i, Callback()) for i in range(200)]
    for timer in timers[:100]:  # exactly half: not more than half yet
        timer.cancel()
    assert loop.timer_heap_size == 200
    assert loop.timer_count == 100
    timers[100].cancel()  # 101 of 200
    assert loop.timer_heap_size == 99
    assert loop.timer_count == 99
    # What is left is a valid heap: fresh due timers pushed on it come out in deadline order, and no live timer
    # of the 99 (all 100 s away) comes out with them.
    fired: list[int] = []
    now = time.monotonic()
    for i in (5, 3, 9, 1):
        loop.call_at(now - 1.0 + i * 0.001, lambda i=i: fired.append(i))
    loop.run_once(0.5)
    assert fired == [1, 3, 5, 9]
    assert loop.timer_count == 99 and loop.timer_heap_size == 99


def test_a_small_heap_is_not_compacted(loop: EventLoop) -> None:
    timers = [loop.call_later(100.0 + i, Callback()) for i in range(100)]
    for timer in timers[:90]:
        timer.cancel()
    assert loop.timer_heap_size == 100  # at most 100 entries: never rebuilt (asyncio's minimum)
    assert loop.timer_count == 10


def test_compaction_while_timers_run_keeps_the_live_ones(loop: EventLoop) -> None:
    """A timer callback that cancels most of the heap rebuilds it under _run_timers' feet: nothing is lost."""
    now = time.monotonic()
    fired: list[int] = []
    victims = [loop.call_at(now - 1.0 + i * 1e-6, lambda i=i: fired.append(i)) for i in range(1, 301)]

    def cancel_most() -> None:
        fired.append(0)
        for timer in victims[:250]:
            timer.cancel()

    loop.call_at(now - 2.0, cancel_most)  # the earliest: runs first
    loop.run_once(0.5)
    assert fired == [0, *range(251, 301)]
    assert loop.timer_count == 0 and loop.timer_heap_size == 0


# ---------------------------------------------------------------------------------------------- re-arming
def test_a_rearmed_timer_fires_at_its_new_deadline_and_not_before(loop: EventLoop) -> None:
    callback = Callback()
    timer = loop.call_later(0.03, callback)
    new_deadline = timer.when + 0.07
    timer.when = new_deadline  # re-armed in place, as ServerConnection._set_timer does: no new heap entry
    assert loop.timer_heap_size == 1
    run_until(loop, lambda: time.monotonic() > timer.when - 0.07 + 0.02)  # well past the old deadline
    assert callback.calls == []
    assert loop.timer_count == 1 and loop.timer_heap_size == 1  # queued again, once
    run_until(loop, lambda: callback.calls)
    assert callback.calls[0] >= new_deadline
    assert len(callback.calls) == 1 and loop.timer_count == 0


def test_a_rearmed_timer_can_still_be_cancelled(loop: EventLoop) -> None:
    callback = Callback()
    alive = weakref.ref(callback)
    timer = loop.call_later(0.01, callback)
    timer.when += 0.02
    run_until(loop, lambda: time.monotonic() > timer.when - 0.005)  # re-queued by now
    timer.cancel()
    del callback
    assert alive() is None
    assert loop.timer_count == 0
    loop.run_once(0.05)
    assert loop.timer_heap_size == 0


# ---------------------------------------------------------------------------------------------- run_once / run
def test_run_once_runs_a_due_timer_and_returns(loop: EventLoop) -> None:
    callback = Callback()
    loop.call_later(0.0, callback)
    start = time.monotonic()
    loop.run_once(5.0)
    assert len(callback.calls) == 1
    assert time.monotonic() - start < 1.0
    assert loop.iterations == 1


def test_run_once_waits_no_longer_than_its_timeout(loop: EventLoop) -> None:
    callback = Callback()
    loop.call_later(30.0, callback)
    start = time.monotonic()
    loop.run_once(0.02)
    assert time.monotonic() - start < 1.0
    assert callback.calls == []
    loop.run_once(0.0)  # a poll
    assert loop.iterations == 2


def test_run_once_wakes_for_a_timer_before_its_timeout(loop: EventLoop) -> None:
    callback = Callback()
    loop.call_later(0.02, callback)
    start = time.monotonic()
    while not callback.calls:
        loop.run_once(10.0)
        assert time.monotonic() - start < 2.0
    assert loop.iterations <= 3


def test_run_once_dispatches_io_then_timers_then_the_end_of_iteration_hooks(loop: EventLoop) -> None:
    order: list[str] = []
    a, b = socket.socketpair()
    try:

        class Reader:
            def handle_event(self, mask: int) -> None:
                a.recv(16)
                order.append("io")

        loop.register(a, selectors.EVENT_READ, Reader())
        loop.call_later(0.0, lambda: order.append("timer"))
        loop.end_of_iteration.append(lambda: order.append("end"))
        b.send(b"x")
        time.sleep(0.005)
        loop.run_once(1.0)
        assert order == ["io", "timer", "end"]
        loop.unregister(a)
    finally:
        a.close()
        b.close()


def test_run_repeats_iterations_until_stop(loop: EventLoop) -> None:
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(loop.iterations)
        if len(ticks) == 3:
            loop.stop()
        else:
            loop.call_later(0.0, tick)

    loop.call_later(0.0, tick)
    loop.run()
    assert len(ticks) == 3
    assert ticks == sorted(ticks) and len(set(ticks)) == 3  # one tick per iteration


# ---------------------------------------------------------------------------------------------- signals
def test_a_signal_runs_its_handler_in_the_loop(loop: EventLoop) -> None:
    got: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, got.append)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: got)
    assert got == [signal.SIGUSR1]
    loop.close()  # puts the default action back
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
