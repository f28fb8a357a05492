"""AcceptGuard (selectws/server/accept.py): the reserve of spare descriptors, pausing and resuming listeners, one
warning and one info line per episode. The process's descriptor limit is simulated: the module's ``os`` is a
stand-in whose ``open`` fails with EMFILE once a budget of free descriptors is spent (and whose ``close`` gives one
back); the listeners are real listening sockets on a real :class:`EventLoop`.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from selectws.protocol.handshake import ServerProtocol
from selectws.protocol.http11 import Headers, Request
from selectws.server import accept
from selectws.server.accept import AcceptGuard, ReserveRouter
from selectws.server.api import HandshakeRequest, Plugin, Reject
from selectws.server.handshake import Admission, Outcome, answer_request
from selectws.server.routing import Route, Router
from selectws.server.stats import Counters
from selectws.transport.loop import EventLoop

EMFILE = OSError(errno.EMFILE, "Too many open files")


class Descriptors:
    """``free`` descriptors left in the process; ``open`` and ``close`` of the guard spend and return them."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.opened: set[int] = set()

    def open(self, path: str, flags: int) -> int:
        if self.free <= 0:
            raise OSError(errno.EMFILE, "Too many open files")
        self.free -= 1
        fd = os.open(path, flags)
        self.opened.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.opened.discard(fd)
        os.close(fd)
        self.free += 1


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))


class FakeListener:
    def __init__(self, loop: EventLoop, router: Router | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.router = router
        self.loop = loop
        loop.register(self.sock, 1, self)

    def handle_event(self, mask: int) -> None:  # pragma: no cover - never selected here
        pass

    @property
    def registered(self) -> bool:
        try:
            self.loop.selector.get_key(self.sock)
        except KeyError:
            return False
        return True


@pytest.fixture
def fds(monkeypatch: pytest.MonkeyPatch) -> Descriptors:
    d = Descriptors(free=100)
    monkeypatch.setattr(accept, "os", SimpleNamespace(
        open=d.open, close=d.close, devnull=os.devnull, O_RDONLY=os.O_RDONLY, O_CLOEXEC=os.O_CLOEXEC))
    monkeypatch.setattr(accept, "QUIET", 0.05)
    return d


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    yield loop
    loop.close()


def make_guard(loop: EventLoop, reserve: int) -> tuple[AcceptGuard, Log, Counters]:
    log, counters = Log(), Counters()
    guard = AcceptGuard(loop, counters, lambda: log, reserve=reserve)
    assert guard.refill()
    return guard, log, counters


def run_for(loop: EventLoop, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        loop.run_once(0.01)


def test_spares_serve_then_the_listener_pauses_and_comes_back(fds: Descriptors, loop: EventLoop) -> None:
    guard, log, counters = make_guard(loop, reserve=2)
    listener = FakeListener(loop)
    fds.free = 0  # at the limit
    assert guard.failed(listener, EMFILE)  # a spare closed: accept one now
    assert fds.free == 1 and len(guard.spares) == 1
    fds.free -= 1  # ... the accepted connection took it
    guard.served()
    assert guard.failed(listener, EMFILE)
    fds.free -= 1
    guard.served()
    assert not guard.failed(listener, EMFILE)  # no spare left: paused, nothing polls it
    assert not listener.registered and guard.exhausted
    assert counters.accept_errors == 3 and guard.reserve_used == 2
    assert [(level, event) for level, event, _ in log.lines] == [("warning", log.lines[0][1])]
    assert log.lines[0][2]["errno"] == "EMFILE"

    # One of the reserve's connections closes: its descriptor becomes a spare again, and the listener can be
    # served from the reserve, so it is polled again; still exhausted (no descriptor beyond the reserve).
    fds.free += 1
    guard.freed()
    assert len(guard.spares) == 1 and listener.registered and guard.exhausted
    run_for(loop, 0.2)  # the probe finds nothing either
    assert guard.exhausted and not any(level == "info" for level, _, _ in log.lines)

    # Two more descriptors free: the reserve is whole again and one is left over: accepting is normal, and after
    # a quiet period one info line ends the episode.
    fds.free += 2
    guard.freed()
    assert not guard.exhausted and len(guard.spares) == 2 and listener.registered
    run_for(loop, 0.2)
    assert [level for level, _, _ in log.lines] == ["warning", "info"]
    info = log.lines[1][2]
    assert info["failed"] == 3 and info["answered_from_reserve"] == 2 and info["duration"] >= 0


def test_a_failure_in_the_quiet_period_is_the_same_episode(fds: Descriptors, loop: EventLoop) -> None:
    guard, log, _ = make_guard(loop, reserve=0)
    listener = FakeListener(loop)
    for _ in range(3):  # flapping at the limit: fail, a descriptor frees, fail again at once
        assert not guard.failed(listener, EMFILE)
        assert not listener.registered
        guard.freed()
        assert listener.registered and not guard.exhausted
    run_for(loop, 0.2)
    assert [level for level, _, _ in log.lines] == ["warning", "info"]
    assert log.lines[1][2]["failed"] == 3


def test_the_probe_timer_backs_off(fds: Descriptors, loop: EventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    guard, _, _ = make_guard(loop, reserve=0)
    listener = FakeListener(loop)
    fds.free = 0
    probes: list[float] = []
    real = accept._probe

    def probe() -> bool:
        probes.append(time.monotonic())
        return real()

    monkeypatch.setattr(accept, "_probe", probe)
    guard.failed(listener, EMFILE)
    run_for(loop, 1.0)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert 3 <= len(probes) <= 6, probes  # 50, 100, 200, 400 ms ...: not a busy loop
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert not listener.registered


def test_out_of_memory_does_not_spend_a_spare(fds: Descriptors, loop: EventLoop) -> None:
    guard, _, _ = make_guard(loop, reserve=2)
    listener = FakeListener(loop)
    assert not guard.failed(listener, OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert len(guard.spares) == 2 and not listener.registered


def test_the_websocket_port_leaves_the_last_spare_to_the_ops_listener(fds: Descriptors, loop: EventLoop) -> None:
    guard, _, _ = make_guard(loop, reserve=2)
    guard.keep_for_ops = 1
    main, ops = FakeListener(loop), FakeListener(loop, Router([]))
    fds.free = 0
    assert guard.failed(main, EMFILE)
    assert not guard.failed(main, EMFILE)  # one spare left: the ops listener's
    assert not main.registered and len(guard.spares) == 1
    assert guard.failed(ops, EMFILE)
    assert ops.registered


def test_a_listener_closed_while_paused_is_not_registered_again(fds: Descriptors, loop: EventLoop) -> None:
    guard, _, _ = make_guard(loop, reserve=0)
    listener = FakeListener(loop)
    guard.failed(listener, EMFILE)
    listener.sock.close()  # shutdown closed the WebSocket listeners
    guard.freed()
    assert not guard.paused
    guard.close()
    assert not guard.spares and guard._timer is None


def test_close_lets_go_of_the_spares(fds: Descriptors, loop: EventLoop) -> None:
    guard, _, _ = make_guard(loop, reserve=3)
    assert len(fds.opened) == 3
    guard.close()
    assert not fds.opened and not guard.spares


# ---------------------------------------------------------------------- what the reserve serves
class Echo(Plugin):
    pass


def _answer(router: Router, path: str, upgrade: bool = True) -> Outcome:
    head = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
    if upgrade:
        head += ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n")
    ws = ServerProtocol()
    (request,) = ws.receive_data((head + "\r\n").encode())
    assert isinstance(request, Request)
    return answer_request(ws, request, ("127.0.0.1", 1), router, Admission())


def test_reserve_router_serves_the_ops_endpoints_and_refuses_websockets_503() -> None:
    main = Router([Route("/chat/{room}", Echo(None, {}), "echo")],  # type: ignore[arg-type]
                  {"/healthz": lambda r: (200, [], b"ok\n"), "/other": lambda r: (200, [], b"other\n")},
                  lambda r: (200, [], b"static\n"))
    router = ReserveRouter(main, ["/healthz"], None)  # type: ignore[arg-type]

    health = _answer(router, "/healthz", upgrade=False)
    assert health.response.status == 200 and health.response.body == b"ok\n"

    upgrade = _answer(router, "/chat/lobby")
    assert upgrade.response.status == 503 and upgrade.reason == "out of file descriptors"
    assert upgrade.response.headers.get("Retry-After") == "5"
    assert upgrade.route is None

    for path in ("/other", "/index.html"):  # plain HTTP that is not an operator endpoint of this port
        other = _answer(router, path, upgrade=False)
        assert other.response.status == 503 and b"out of file descriptors" in other.response.body

    refuse = router.match("/chat/lobby")
    assert refuse is not None
    with pytest.raises(Reject):
        refuse[0].plugin.on_handshake(HandshakeRequest("/chat/lobby", {}, {}, Headers(), ("127.0.0.1", 1), []))
