"""The broker interface behind groups and ``broadcast``.

A broker carries a group message to wherever that group has members. The in-memory broker delivers to this
process only; a Redis broker (scale-out) publishes once to a channel and delivers what other instances publish.
Either way the server keeps local membership itself and the broker calls ``deliver`` for local fan-out, so a
broker never sees a connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from selectws.server.history import HistoryPolicy, HistoryResult, MemoryHistory
from selectws.server.presence import ClusterView, Member
from selectws.server.stats import BrokerStats
from selectws.transport.loop import EventLoop

__all__ = ["Broker", "BrokerFactory", "BrokerHost", "Deliver", "HistoryCallback", "MemoryBroker"]

#: ``deliver(group, message, exclude_ids[, offset, epoch]) -> local recipients``, provided by the server. A message
#: of a group with history comes with its offset and the group's epoch (left out, or 0 and "", for the others).
Deliver = Callable[..., int]
#: Called once with the result of :meth:`Broker.history` (at once, or later when the broker must ask Redis).
HistoryCallback = Callable[[HistoryResult], None]


class BrokerHost(Protocol):
    """What a broker may ask of the server beyond ``deliver`` (given by :meth:`Broker.attach`): presence."""

    instance_id: str
    cluster: ClusterView

    def local_presence(self, group: str) -> list[Member]:
        """This instance's members of ``group`` (to answer another instance's snapshot request)."""
        ...

    def presence_gone(self, group: str, members: list[Member]) -> None:
        """``members`` of another instance left ``group`` without a leave message (the instance died)."""

    def local_groups(self) -> list[str]:
        """The groups this instance has members in."""
        ...

    def local_count(self, group: str, exclude: frozenset[int]) -> int:
        """How many local members a message to ``group`` excluding ``exclude`` will reach."""
        ...

    def presence_ready(self, group: str) -> None:
        """This instance started following ``group`` and the others' members are known now (or never will be)."""


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

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int],
                history: HistoryPolicy | None = None) -> int:
        """Deliver ``message`` to ``group`` everywhere; returns the number of local recipients.

        With ``history``, the message is kept in the group's history and gets its next offset, and every instance
        delivers it with that offset. The Redis broker learns the offset from Redis, so local delivery waits for its
        answer (one round trip) and the count returned is of the local members it will reach."""
        ...

    def history(self, group: str, policy: HistoryPolicy, since: int | None, limit: int,
                callback: HistoryCallback) -> None:
        """Read ``group``'s position and up to ``limit`` messages above ``since``; ``callback`` gets the result (maybe
        before this returns). Messages published after the read are delivered live to the group's members."""

    def attach(self, host: BrokerHost) -> None:
        """The server, for presence (called once, before :meth:`start`)."""

    def presence_join(self, group: str, member: Member) -> None:
        """A local session joined ``group``: tell the other instances."""

    def presence_leave(self, group: str, member: Member) -> None:
        """A local session left ``group``: tell the other instances."""

    def presence_query(self, group: str, callback: Callable[[list[Member]], None]) -> None:
        """The other instances' members of a group this instance does not follow (the server API asks)."""

    def stats(self) -> BrokerStats:
        """Its counters and state, for /metrics and /healthz."""
        ...


#: What the application hands the server to build its broker: ``factory(loop, deliver, log)``.
BrokerFactory = Callable[["EventLoop", Deliver, Any], Broker]

class MemoryBroker:
    """Delivers every group message locally and at once, in publish order; keeps history in memory (lost with the
    process: a restarted daemon has new epochs)."""

    kind = "memory"
    up = True
    dropped = 0
    reconnects = 0

    def __init__(self, deliver: Deliver, now: Callable[[], float] | None = None) -> None:
        self._deliver = deliver
        self.store = MemoryHistory(now or time.monotonic)

    def attach(self, host: BrokerHost) -> None:
        """One process: no other instance to tell about presence."""

    def presence_join(self, group: str, member: Member) -> None:
        """Nobody else to tell."""

    def presence_leave(self, group: str, member: Member) -> None:
        """Nobody else to tell."""

    def presence_query(self, group: str, callback: Callable[[list[Member]], None]) -> None:
        callback([])

    def history(self, group: str, policy: HistoryPolicy, since: int | None, limit: int,
                callback: HistoryCallback) -> None:
        callback(self.store.read(group, policy, since, limit))

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

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int],
                history: HistoryPolicy | None = None) -> int:
        if history is None:
            return self._deliver(group, message, exclude)
        offset, epoch = self.store.append(group, history, message)
        return self._deliver(group, message, exclude, offset, epoch)

    def stats(self) -> BrokerStats:
        return BrokerStats(kind=self.kind, up=True, status=None, dropped=0, reconnects=0)
