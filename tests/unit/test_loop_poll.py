"""EventLoop.run_once on Linux polls the EpollSelector's epoll object itself (a fast path); it must report to the
handlers exactly what ``selector.select()`` would: the same masks for readable, writable, both, and a peer that hung
up, only what a key asked for, and nothing for a descriptor an earlier handler of the same iteration unregistered.
Each case runs on the fast path and on the plain ``select()`` path (the loop with its epoll shortcut switched off).
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from selectws.transport.loop import BATCH, EventLoop


class Recorder:
    def __init__(self, log: list[tuple[str, int]], name: str) -> None:
        self.log, self.name = log, name

    def handle_event(self, mask: int) -> None:
        self.log.append((self.name, mask))


@pytest.fixture(params=["epoll", "select"])
def loop(request: pytest.FixtureRequest) -> Iterator[EventLoop]:
    lp = EventLoop()
    if request.param == "select":
        lp._epoll = lp._fd_to_key = None
    elif lp._epoll is None:
        pytest.skip("no epoll here: the loop always uses select()")
    yield lp
    lp.close()


def test_the_fast_path_is_taken_on_linux() -> None:
    lp = EventLoop()
    try:
        assert (lp._epoll is not None) == isinstance(lp.selector, getattr(selectors, "EpollSelector", ()))
    finally:
        lp.close()


def test_readable_writable_both_and_hangup_masks(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        log: list[tuple[str, int]] = []
        loop.register(a, selectors.EVENT_READ, Recorder(log, "read-only"))
        loop.register(c, selectors.EVENT_READ | selectors.EVENT_WRITE, Recorder(log, "both"))
        loop.run_once(0)
        assert log == [("both", selectors.EVENT_WRITE)]  # c is writable; nothing to read anywhere
        log.clear()
        b.send(b"x")
        d.send(b"y")
        loop.run_once(0.5)
        assert sorted(log) == [("both", selectors.EVENT_READ | selectors.EVENT_WRITE),
                               ("read-only", selectors.EVENT_READ)]
        log.clear()
        a.recv(10)
        b.close()  # a hang-up reads as readable (recv then sees the end), as select() reports it
        loop.run_once(0.5)
        assert log == [("both", selectors.EVENT_READ | selectors.EVENT_WRITE), ("read-only", selectors.EVENT_READ)] \
            or sorted(log) == [("both", selectors.EVENT_READ | selectors.EVENT_WRITE),
                               ("read-only", selectors.EVENT_READ)]
    finally:
        for s in (a, c, d):
            s.close()


def test_a_descriptor_unregistered_earlier_in_the_iteration_is_not_reported(loop: EventLoop) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        log: list[str] = []

        class Unregisters:
            def __init__(self, name: str, other: socket.socket) -> None:
                self.name, self.other = name, other

            def handle_event(self, mask: int) -> None:
                log.append(self.name)
                loop.unregister(self.other)

        (a0, b0), (a1, b1) = pairs
        loop.register(a0, selectors.EVENT_READ, Unregisters("first", a1))
        loop.register(a1, selectors.EVENT_READ, Unregisters("second", a0))
        b0.send(b"x")
        b1.send(b"x")
        loop.run_once(0.5)
        assert log in (["first"], ["second"])  # whichever ran first unregistered the other
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def test_timeouts_wait_at_least_that_long_and_zero_does_not_block(loop: EventLoop) -> None:
    import time

    start = time.monotonic()
    loop.run_once(0)
    assert time.monotonic() - start < 0.05
    start = time.monotonic()
    loop.run_once(0.0301)
    assert time.monotonic() - start >= 0.030
    start = time.monotonic()
    loop.run_once(-1.0)  # a negative timeout is "now", never "forever"
    assert time.monotonic() - start < 0.05


def test_after_batch_hooks_run_after_every_batch_of_handlers_and_not_at_the_end(loop: EventLoop) -> None:
    """An iteration with 2 * BATCH + 5 ready descriptors runs the after_batch hooks twice: after the first BATCH
    handlers and after the next BATCH, then the last 5 handlers, then the end_of_iteration hooks (not after_batch
    again). One with BATCH ready descriptors or fewer never runs them."""
    pairs = [socket.socketpair() for _ in range(2 * BATCH + 5)]
    try:
        order: list[str] = []

        class Reader:
            def __init__(self, sock: socket.socket) -> None:
                self.sock = sock

            def handle_event(self, mask: int) -> None:
                self.sock.recv(16)
                order.append("io")

        for a, b in pairs:
            loop.register(a, selectors.EVENT_READ, Reader(a))
            b.send(b"x")
        loop.after_batch.append(lambda: order.append("batch"))
        loop.end_of_iteration.append(lambda: order.append("end"))
        loop.run_once(1.0)
        assert order == ["io"] * BATCH + ["batch"] + ["io"] * BATCH + ["batch"] + ["io"] * 5 + ["end"]
        order.clear()
        for _, b in pairs[:BATCH]:
            b.send(b"y")
        loop.run_once(1.0)
        assert order == ["io"] * BATCH + ["end"]
    finally:
        for a, b in pairs:
            loop.unregister(a)
            a.close()
            b.close()
