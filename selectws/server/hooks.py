"""Webhooks: connection and group events POSTed as signed JSON batches to the ``[[hooks]]`` receivers.

The server taps its own events (:meth:`Hooks.open`, :meth:`Hooks.close`, :meth:`Hooks.join`,
:meth:`Hooks.leave`; ``occupied`` and ``vacated`` are the join of a group's first member and the leave of its
last, on this instance) and each :class:`HookDispatcher` wanting that event queues a small dict. Delivery runs in
the server's loop, through :class:`~selectws.transport.http_client.HttpClient` (h11 underneath):

* **batches**: the first event after a quiet spell waits ``batch_interval`` for company, then a batch of at most
  ``max_batch`` events goes as one ``POST`` of ``{"events": [...]}``; one request at a time per receiver, and
  batches at most every ``batch_interval``;
* **signature**: ``X-Selectws-Signature: sha256=<hex HMAC-SHA256 of the body, keyed by the secret>``;
* **bounded**: at most ``max_queue`` events wait; an event past it is dropped and counted (tail drop: what was
  queued first goes first);
* **at-most-once**: a request that failed after its first byte left (a timeout, a reset, a non-2xx answer) is
  not sent again, since the receiver may have acted on it; its events are counted as failed. A batch that never
  left (connection refused, no route, TLS failure) goes back to the head of the queue;
* **backoff**: after a failure the next attempt waits ``backoff_min`` doubling to ``backoff_max`` (plus up to 25 %
  jitter); one warning when a failure episode begins and one info line when delivery recovers, never one per
  event;
* nothing of it runs on the WebSocket path beyond one ``dict`` per event and a ``deque.append``: a receiver that
  is down, slow or hanging costs the WebSocket traffic nothing.

Addresses are resolved and secrets read by the application (``selectws/app/hooks.py``) and handed over as
:class:`HookTarget` values: this module never blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from selectws import __version__
from selectws.config import HookConfig
from selectws.server.stats import HookStats
from selectws.transport.loop import EventLoop, Timer

if TYPE_CHECKING:
    from selectws.server.connection import ServerConnection
    from selectws.transport.http_client import HttpResult

__all__ = ["SIGNATURE_HEADER", "HookDispatcher", "HookLoader", "HookStats", "HookTarget", "Hooks", "sign"]

SIGNATURE_HEADER = "X-Selectws-Signature"


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class HookTarget:
    """One ``[[hooks]]`` receiver, ready to use: its configuration plus what the application read and resolved."""

    config: HookConfig
    secret: bytes
    #: ``(family, sockaddr)`` pairs to connect to, tried in turn (resolved before the loop started).
    addresses: tuple[tuple[int, Any], ...]
    tls: ssl.SSLContext | None = None

    @property
    def label(self) -> str:
        """The URL without its query (which may carry a token): for logs and metric labels."""
        parts = urlsplit(self.config.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"


#: ``loader(config, may_block)`` -> the targets of ``config.hooks``: the application's part (secrets, DNS).
#: ``may_block`` is True before the loop runs (start) and False on a reload (in the loop).
HookLoader = Callable[[Any, bool], Sequence[HookTarget]]


class Client(Protocol):
    """What a dispatcher needs of an HTTP client (:class:`HttpClient`; a fake one in unit tests)."""

    def request(self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float,
                done: Callable[[HttpResult], None]) -> None: ...

    def close(self) -> None: ...


ClientFactory = Callable[[HookTarget, EventLoop], Client]


def http_client(target: HookTarget, loop: EventLoop) -> Client:
    # Imported here: h11 is the optional "hooks" extra, needed only once a [[hooks]] receiver is configured (the
    # application checks that it is installed before the server starts).
    from selectws.transport.http_client import HttpClient

    parts = urlsplit(target.config.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return HttpClient(loop, target.addresses, parts.hostname or "", port, target.tls,
                      user_agent=f"selectws/{__version__}")


class HookDispatcher:
    """The queue, the batches and the backoff of one receiver."""

    def __init__(self, target: HookTarget, loop: EventLoop, log: Callable[[], Any],
                 client_factory: ClientFactory = http_client) -> None:
        self.loop = loop
        self.log = log
        self.client_factory = client_factory
        self.queue: deque[dict[str, Any]] = deque()
        self.sent = 0  # events in batches the receiver answered 2xx
        self.failed = 0  # events in batches that left but failed (timeout, reset, non-2xx): never resent
        self.dropped = 0  # events refused because the queue was full
        self.requests = 0
        self.request_failures = 0
        self.failures_in_row = 0
        self._episode: tuple[float, int, int] | None = None  # a failure episode: (start, failed, dropped) then
        self._timer: Timer | None = None
        self._in_flight: list[dict[str, Any]] | None = None
        self._next_allowed = 0.0  # earliest loop time the next batch may leave
        self._client: Client | None = None
        self._closed = False
        self._stale = False
        self.retarget(target)

    def retarget(self, target: HookTarget) -> None:
        """(Re)configure: a reload may change the secret, the events, the limits or the addresses."""
        old = getattr(self, "target", None)
        self.target = target
        c = target.config
        self.events = frozenset(c.events)
        parts = urlsplit(c.url)
        self.request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if old is not None and (old.addresses != target.addresses or old.tls is not target.tls):
            self._stale = True  # a new client for the next request
        excess = len(self.queue) - c.max_queue
        for _ in range(max(0, excess)):
            self.queue.pop()
            self.dropped += 1

    # ------------------------------------------------------------------ events in
    def push(self, record: dict[str, Any]) -> None:
        queue = self.queue
        if len(queue) >= self.target.config.max_queue:
            self.dropped += 1
            return
        queue.append(record)
        if self._timer is None and self._in_flight is None:
            now = self.loop.now
            self._arm(max(now + self.target.config.batch_interval, self._next_allowed) - now)

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(max(0.0, delay), self._send)

    # ------------------------------------------------------------------ batches out
    def _send(self) -> None:
        self._timer = None
        if self._closed or not self.queue or self._in_flight is not None:
            return
        c = self.target.config
        queue = self.queue
        batch = [queue.popleft() for _ in range(min(c.max_batch, len(queue)))]
        body = json.dumps({"events": batch}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = [("Content-Type", "application/json"), (SIGNATURE_HEADER, sign(self.target.secret, body))]
        self._in_flight = batch
        self._next_allowed = self.loop.now + c.batch_interval
        self.requests += 1
        if self._stale and self._client is not None:
            self._client.close()
            self._client = None
        self._stale = False
        if self._client is None:
            self._client = self.client_factory(self.target, self.loop)
        client = self._client
        client.request("POST", self.request_target, headers, body, c.timeout,
                       lambda result: self._done(client, result))

    def _done(self, client: Client, result: HttpResult) -> None:
        batch = self._in_flight
        if self._closed or batch is None or client is not self._client:
            return
        self._in_flight = None
        if result.ok:
            self.sent += len(batch)
            self.failures_in_row = 0
            if self._episode is not None:
                started, failed, dropped = self._episode
                self._episode = None
                self.log().info("webhook delivery recovered", url=self.target.label,
                                failing_for=round(self.loop.now - started, 3), failed=self.failed - failed,
                                dropped=self.dropped - dropped, queued=len(self.queue))
        else:
            self._failed(batch, result)
        if self.queue and self._timer is None:
            self._arm(self._next_allowed - self.loop.now)

    def _failed(self, batch: list[dict[str, Any]], result: HttpResult) -> None:
        c = self.target.config
        self.request_failures += 1
        if result.sent:
            self.failed += len(batch)  # at-most-once: the receiver may have seen it
        else:  # it never left: back to the head of the queue, the newest dropped past max_queue
            self.queue.extendleft(reversed(batch))
            while len(self.queue) > c.max_queue:
                self.queue.pop()
                self.dropped += 1
        self.failures_in_row += 1
        delay = min(c.backoff_max, c.backoff_min * 2 ** min(self.failures_in_row - 1, 30))
        delay *= random.uniform(1.0, 1.25)
        self._next_allowed = max(self._next_allowed, self.loop.now + delay)
        if self._episode is None:
            self._episode = (self.loop.now, self.failed - (len(batch) if result.sent else 0), self.dropped)
            why = result.error if result.error is not None else f"HTTP {result.status}"
            self.log().warning("webhook delivery failing; retrying with backoff", url=self.target.label,
                               error=why, retry_in=round(delay, 3), queued=len(self.queue),
                               lost=len(batch) if result.sent else 0)

    # ------------------------------------------------------------------ state
    @property
    def failing(self) -> bool:
        return self._episode is not None

    def stats(self) -> HookStats:
        return HookStats(self.target.label, len(self.queue) + len(self._in_flight or ()), self.sent, self.failed,
                         self.dropped, self.requests, self.request_failures, self.failing)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._client is not None:
            self._client.close()
            self._client = None


class Hooks:
    """Every receiver of the configuration, and the event taps the server calls (only when hooks exist)."""

    def __init__(self, loop: EventLoop, log: Callable[[], Any], client_factory: ClientFactory = http_client) -> None:
        self.loop = loop
        self.log = log
        self.client_factory = client_factory
        self.dispatchers: list[HookDispatcher] = []
        self.by_event: dict[str, list[HookDispatcher]] = {}

    def configure(self, targets: Sequence[HookTarget]) -> None:
        """Apply the receivers of a (re)loaded configuration: one with the URL of a running one keeps its queue
        and counters; one no longer configured is closed (its queue is dropped)."""
        old = {d.target.config.url: d for d in self.dispatchers}
        dispatchers = []
        for target in targets:
            dispatcher = old.pop(target.config.url, None)
            if dispatcher is None:
                dispatcher = HookDispatcher(target, self.loop, self.log, self.client_factory)
            else:
                dispatcher.retarget(target)
            dispatchers.append(dispatcher)
        for gone in old.values():
            gone.close()
        self.dispatchers = dispatchers
        by_event: dict[str, list[HookDispatcher]] = {}
        for dispatcher in dispatchers:
            for name in dispatcher.events:
                by_event.setdefault(name, []).append(dispatcher)
        self.by_event = by_event

    def __bool__(self) -> bool:
        return bool(self.dispatchers)

    # ------------------------------------------------------------------ the taps
    def emit(self, name: str, conn: ServerConnection, **fields: Any) -> None:
        dispatchers = self.by_event.get(name)
        if not dispatchers:
            return
        session = conn.session
        record = {"event": name, "time": round(time.time(), 6),
                  "session": str(session.id if session is not None else conn.id), "path": conn.path,
                  "remote": conn.remote[0], **fields}
        for dispatcher in dispatchers:
            dispatcher.push(record)

    def open(self, conn: ServerConnection) -> None:
        self.emit("open", conn)

    def close(self, conn: ServerConnection, code: int, reason: str) -> None:
        self.emit("close", conn, code=code, reason=reason)

    def join(self, conn: ServerConnection, group: str, first: bool) -> None:
        self.emit("join", conn, group=group)
        if first:
            self.emit("occupied", conn, group=group)

    def leave(self, conn: ServerConnection, group: str, last: bool) -> None:
        self.emit("leave", conn, group=group)
        if last:
            self.emit("vacated", conn, group=group)

    def stats(self) -> tuple[HookStats, ...]:
        return tuple(d.stats() for d in self.dispatchers)

    def shutdown(self) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.close()
        self.dispatchers = []
        self.by_event = {}
