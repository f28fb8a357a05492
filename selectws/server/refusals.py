"""Refused handshakes: why (the ``reason`` label of ``selectws_handshake_failures_total``), at which log level, and
a summary per minute.

A port open to the internet is probed all day: plain ``GET``s to a WebSocket route (426), ``POST``s to
``/healthz`` (405), half-sent heads that time out (408), garbage (400), plain HTTP on the TLS port. One warning
per probe would bury what an operator must see, so the level of a refusal's log line follows one rule:

* **warning** -- the server is failing clients it should serve, or is out of capacity: ``error`` (a 5xx we
  produced: a handler or ``on_handshake`` raised, JWT not configured) and ``limit`` (the server-wide
  ``max_connections``). A client that rejects our TLS certificate (a TLS alert about the certificate) too.
* **info** -- a WebSocket client was turned away for a reason someone will come looking for: ``no_route`` (an
  upgrade to a path no route serves: a mistyped URL), ``origin``, ``auth`` (a JWT, or the server API's key: a
  401 from an HTTP endpoint is ``auth`` too), ``client_limit`` (per-address or
  per-user limits doing their job), ``draining``, ``plugin`` (its ``on_handshake`` refused), ``subprotocol``; a
  client certificate we refused (``[tls] ca``).
* **debug** -- what any public port receives from scanners and stray clients: ``bad_request`` (not a WebSocket
  upgrade, a malformed or oversized head, an unusable extension offer), ``timeout`` (no complete request in
  time), ``http`` (a plain HTTP request answered with an error: a static file that is not there, a 405 on
  ``/healthz``, a server API call with bad parameters), and the other ``tls`` failures (no shared version, plain HTTP
  on the TLS port, a timeout).

Every refusal, whatever its level, is also counted in :class:`RefusalSummary`: one ``info`` line
``handshake refusals in the last 60 s`` with the counts by status (``"tls"`` for a failed TLS handshake) at most
once per minute, and only after a minute with refusals: its timer is armed by the first refusal of a window, so an
idle server has no timer for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selectws.transport.loop import EventLoop, Timer

__all__ = ["FAILURE_REASONS", "RefusalSummary", "level_of", "tls_failure_level"]

#: The ``reason`` label values of ``selectws_handshake_failures_total``, in the order they are exported.
FAILURE_REASONS: tuple[str, ...] = (
    "no_route",
    "bad_request",
    "timeout",
    "http",
    "origin",
    "auth",
    "subprotocol",
    "plugin",
    "client_limit",
    "limit",
    "draining",
    "error",
    "tls",
)

_WARNING = frozenset({"error", "limit"})
_INFO = frozenset({"no_route", "origin", "auth", "client_limit", "draining", "plugin", "subprotocol"})


def level_of(reason: str) -> str:
    """The log level of a refusal whose failure reason (a :data:`FAILURE_REASONS` value) is ``reason``."""
    if reason in _WARNING:
        return "warning"
    if reason in _INFO:
        return "info"
    return "debug"


def tls_failure_level(description: str) -> str:
    """The level of a failed TLS handshake: ``warning`` when the client refused our certificate (an alert such as
    ``SSLV3_ALERT_CERTIFICATE_UNKNOWN`` or ``TLSV1_ALERT_UNKNOWN_CA``: the chain or the name may be wrong),
    ``info`` when we refused the client's (``[tls] ca``: none sent, or one that does not verify: like ``auth``),
    else ``debug`` (plain HTTP on the TLS port, no shared version, a peer gone mid-handshake, a timeout)."""
    upper = description.upper()
    if "ALERT" in upper and ("CERTIFICATE" in upper or "UNKNOWN_CA" in upper):
        return "warning"
    if "CERTIFICATE" in upper:
        return "info"
    return "debug"


class RefusalSummary:
    """Refusals counted by status (``"tls"`` for a TLS handshake) and logged once per ``interval`` at ``info``."""

    __slots__ = ("_counts", "_log", "_loop", "_timer", "interval")

    def __init__(self, loop: EventLoop, log: Callable[[], Any], interval: float = 60.0) -> None:
        self._loop = loop
        self._log = log  # a getter: the server's logger is bound again on reload
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._timer: Timer | None = None

    def add(self, key: str) -> None:
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        if self._timer is None:  # the first refusal of a window
            self._timer = self._loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log the window's counts (if any) and start over; the next refusal arms the timer again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        if counts:
            self._log().info(f"handshake refusals in the last {self.interval:g} s", total=sum(counts.values()),
                             by_status=dict(sorted(counts.items())))
