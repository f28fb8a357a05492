"""Accepting when the process is out of file descriptors: a reserve of spare descriptors, a paused listener, one
warning per episode.

The listeners sit on a level-triggered selector. When ``accept()`` fails with ``EMFILE`` the connection stays in the
kernel's queue and the listener stays readable, so a loop that only logs and returns calls ``accept()`` again at
once, for as long as the process is at its limit: a core at 100 %, a log line per try, and /healthz stuck in the
same queue (issue 12). What happens instead (nginx's "accept mutex off" back-off and libuv's spare-descriptor trick):

* The first failure starts an *episode* and logs one warning. Every failing ``accept()`` is counted
  (``selectws_accept_errors_total``); ``selectws_accept_paused`` is 1 until a descriptor is free again.
* :class:`AcceptGuard` holds a small reserve of spare descriptors (``/dev/null``, opened at start). On ``EMFILE`` or
  ``ENFILE`` the listener closes one spare and accepts one connection with it. That connection is *on the reserve*:
  it is served the operator endpoints (``/healthz``, ``/metrics``) and nothing else; a WebSocket upgrade is refused
  with ``503 out of file descriptors`` and ``Retry-After`` (:class:`ReserveRouter`), so it gives the spare back
  within one round trip. Health checks keep answering and clients get a clear answer instead of a hang. A WebSocket
  listener leaves the last spare to the operator listener (``[ops] listen``) when there is one.
* A listener with no spare left for it is unregistered from the selector: its clients wait in the kernel's backlog
  (bounded by ``[server] backlog``), and nothing runs for it until a descriptor comes back.
* Descriptors come back when a connection closes (:meth:`AcceptGuard.freed`, from ``Server.on_gone``) or, for the
  ones freed elsewhere, when a probe timer finds one (50 ms, doubling to 1 s). The spares are re-opened first, then
  the listeners registered again. Once a descriptor is free beyond the reserve, accepting is normal again; after a
  quiet second without a failure (flapping at the limit is one episode, not two lines per closed connection) an info
  line ends the episode with how many accepts failed, how many connections were answered from the reserve and how
  long it lasted.

Nothing here runs while ``accept()`` succeeds: ``Listener.handle_event`` calls in only from its ``except`` clause,
and ``Server.on_gone`` costs one comparison while the reserve is full.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from selectws.protocol.http11 import Request
from selectws.server.api import HandshakeRequest, Plugin, Reject, ServerAPI
from selectws.server.routing import HttpResult, Route, Router
from selectws.server.stats import Counters
from selectws.transport.loop import EventLoop, Timer

__all__ = ["OUT_OF_RESOURCES", "RESERVE", "AcceptGuard", "ReserveRouter"]

#: accept() errors that mean "not now, the process or the system is out of something", not "this client failed".
OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_DESCRIPTOR_ERRORS = (errno.EMFILE, errno.ENFILE)  # closing a spare makes room for one accept()
RESERVE = 4  # spare descriptors: at most this many connections are served from the reserve at once
BACKOFF_MIN = 0.05  # seconds before the first probe for a free descriptor, doubling ...
BACKOFF_MAX = 1.0  # ... up to this
QUIET = 1.0  # seconds without a failure, a descriptor free, before the episode is declared over
_RETRY = (("Retry-After", "5"),)
_REASON = "out of file descriptors"


class PausableListener(Protocol):
    """What the guard needs of a listener (``Listener`` in server.py)."""

    sock: socket.socket
    router: Router | None  # None: a WebSocket listener; else the operator listener's router

    def handle_event(self, mask: int) -> None: ...


class AcceptGuard:
    """The reserve, the paused listeners and the episode (see the module docstring). One per server."""

    def __init__(self, loop: EventLoop, counters: Counters, log: Callable[[], Any], reserve: int = RESERVE) -> None:
        self.loop = loop
        self.counters = counters
        self._log = log  # the server's current logger (rebound by a reload)
        self.reserve = reserve
        #: Spares a WebSocket listener leaves for the operator listener (1 when ``[ops] listen`` is on).
        self.keep_for_ops = 0
        self.spares: list[int] = []
        self.paused: list[PausableListener] = []
        #: True from a failing accept() until a descriptor is free beyond the reserve (selectws_accept_paused).
        self.exhausted = False
        self.reserve_used = 0  # connections accepted on a spare, since start
        self._episode = False  # from the first failure to the end of the quiet period after the last one
        self._failed = 0  # failed accept() calls in this episode
        self._served = 0  # connections answered from the reserve in this episode
        self._started = 0.0
        self._recovered = 0.0
        self._backoff = BACKOFF_MIN
        self._timer: Timer | None = None

    # ------------------------------------------------------------------ the reserve
    def refill(self) -> bool:
        """Re-open spares up to the reserve; False if the process has no descriptor left for one."""
        spares = self.spares
        while len(spares) < self.reserve:
            try:
                spares.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return False
        return True

    def close(self) -> None:
        """The server stops: let go of the spares and the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd in self.spares:
            try:
                os.close(fd)
            except OSError:
                pass
        self.spares = []
        self.paused = []

    # ------------------------------------------------------------------ events
    def failed(self, listener: PausableListener, exc: OSError) -> bool:
        """``accept()`` on ``listener`` failed with one of :data:`OUT_OF_RESOURCES`.

        Returns True when a spare was closed for it: the caller accepts one connection now and serves it from the
        reserve (and calls :meth:`refill` if that accept() fails). False: the listener is paused.
        """
        self.counters.accept_errors += 1
        if not self._episode:
            self._begin(exc)
        self._failed += 1
        if not self.exhausted:  # the first failure, or one during the quiet period: (again) probe with back-off
            self.exhausted = True
            self._arm_probe()
        if exc.errno in _DESCRIPTOR_ERRORS and len(self.spares) > self._keep(listener):
            os.close(self.spares.pop())
            return True
        if listener not in self.paused:
            self.loop.unregister(listener.sock)
            self.paused.append(listener)
        return False

    def served(self) -> None:
        """A connection was accepted on a spare."""
        self.reserve_used += 1
        self._served += 1

    def freed(self) -> None:
        """A descriptor was closed (``Server.on_gone``): the reserve first, then the listeners."""
        if self.exhausted:
            self._check()
        elif len(self.spares) < self.reserve:
            self.refill()

    # ------------------------------------------------------------------ internals
    def _begin(self, exc: OSError) -> None:
        self._episode = True
        self._started = time.monotonic()
        self._log().warning(
            "accept failed: out of resources; answering from the reserve and pausing the listeners until a "
            "descriptor is free", error=str(exc), errno=errno.errorcode.get(exc.errno or 0, exc.errno),
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0], reserve=len(self.spares),
        )

    def _keep(self, listener: PausableListener) -> int:
        """Spares ``listener`` may not take (the operator listener's)."""
        return self.keep_for_ops if listener.router is None else 0

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._tick)

    def _arm_probe(self) -> None:
        """The next probe, each one later than the last in an episode (also when it flaps: ENOMEM recovers as
        soon as probed, then fails again)."""
        self._arm(self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _tick(self) -> None:
        self._timer = None
        if self.exhausted:
            self._check()
            if self.exhausted:
                self._arm_probe()
        elif self._episode:
            self._end()

    def _check(self) -> None:
        """Descriptors may have come back: re-open the spares, then look for one more."""
        if self.refill() and _probe():
            self.exhausted = False
            self._recovered = time.monotonic()
            self._resume(everyone=True)
            self._arm(QUIET)
            return
        # Still at the limit: a listener goes back on the selector only if the reserve has a spare for it.
        self._resume(everyone=False)

    def _resume(self, everyone: bool) -> None:
        """Register the paused listeners again: all of them, or those the reserve has a spare for."""
        spares = len(self.spares)
        still = []
        for listener in self.paused:
            if listener.sock.fileno() < 0:  # closed meanwhile (shutdown)
                continue
            if not everyone and spares <= self._keep(listener):
                still.append(listener)
                continue
            self.loop.register(listener.sock, selectors.EVENT_READ, listener)
        self.paused = still

    def _end(self) -> None:
        self._log().info(
            "accepting again", failed=self._failed, answered_from_reserve=self._served,
            duration=round(self._recovered - self._started, 3),
        )
        self._episode = False
        self._failed = 0
        self._served = 0
        self._backoff = BACKOFF_MIN


def _probe() -> bool:
    """Is one descriptor free (beyond the reserve)?"""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


# ---------------------------------------------------------------------- what a connection on the reserve is served
class _OutOfDescriptors(Plugin):
    """The plugin of every WebSocket route on the reserve: the upgrade is refused, 503 with Retry-After."""

    def on_handshake(self, request: HandshakeRequest) -> None:
        raise Reject(503, _REASON, _RETRY)


def _refuse_http(request: Request) -> HttpResult:
    return 503, [("Content-Type", "text/plain; charset=utf-8"), *_RETRY], f"503 {_REASON}, retry\n".encode()


class ReserveRouter(Router):
    """The router of a connection accepted on a spare on a WebSocket listener: the operator endpoints served there
    (``paths``), 503 for the rest. An upgrade to a WebSocket route goes through the route table as usual (so a
    request that is not an upgrade still gets its 426, and the refusal is logged with its reason) to a route whose
    plugin refuses it."""

    def __init__(self, main: Router, paths: Iterable[str], server: ServerAPI) -> None:
        super().__init__([], {path: main.http[path] for path in paths if path in main.http}, _refuse_http)
        self.main = main
        self._route = Route("/", _OutOfDescriptors(server, {}), "out-of-descriptors", compression=False)

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        matched = self.main.match(path)
        return None if matched is None else (self._route, matched[1])

