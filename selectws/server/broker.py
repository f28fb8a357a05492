"""The broker interface behind groups and ``broadcast``.

A broker carries a group message to wherever that group has members. The in-memory broker delivers to this
process only; a Redis broker (scale-out) publishes once to a channel and delivers what other instances publish.
Either way the server keeps local membership itself and the broker calls ``deliver`` for local fan-out, so a
broker never sees a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from selectws.server.stats import BrokerStats
from selectws.transport.loop import EventLoop

__all__ = ["Broker", "BrokerFactory", "Deliver", "MemoryBroker"]

#: ``deliver(group, message, exclude_ids) -> local recipients``, provided by the server.
Deliver = Callable[[str, "str | bytes", frozenset[int]], int]


class Broker(Protocol):
    kind: str
    @property
    def up(self) -> bool:
        """Whether group messages currently reach the other instances (always true in memory). It drives
        ``selectws_broker_up`` and ``/readyz``: a broker is up only while its server answers (a TCP connection to
        a hung server is not enough), and stops being up within its health check's deadline when it stops."""
        ...

    #: Group messages that reached local members only (the broker was down or hung, or its buffer full).
    dropped: int
    #: Reconnections after a lost connection.
    reconnects: int

    def start(self) -> None:
        """The server is listening: connect (without blocking the loop)."""

    def close(self) -> None:
        """The server stopped: close connections, cancel timers."""

    def status(self) -> str | None:
        """A line for /healthz, or None when there is nothing to say."""

    def subscribe(self, group: str) -> None:
        """The first local member joined ``group``."""

    def unsubscribe(self, group: str) -> None:
        """The last local member left ``group``."""

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        """Deliver ``message`` to ``group`` everywhere; returns the number of local recipients."""
        ...

    def stats(self) -> BrokerStats:
        """Its counters and state, for /metrics and /healthz."""
        ...


#: What the application hands the server to build its broker: ``factory(loop, deliver, log)``.
BrokerFactory = Callable[["EventLoop", Deliver, Any], Broker]

class MemoryBroker:
    """Delivers every group message locally and at once, in publish order."""

    kind = "memory"
    up = True
    dropped = 0
    reconnects = 0

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def start(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to close."""

    def status(self) -> str | None:
        return None

    def subscribe(self, group: str) -> None:
        """Nothing to do: local membership is the whole story in one process."""

    def unsubscribe(self, group: str) -> None:
        """Nothing to do."""

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        return self._deliver(group, message, exclude)

    def stats(self) -> BrokerStats:
        return BrokerStats(kind=self.kind, up=True, status=None, dropped=0, reconnects=0)
