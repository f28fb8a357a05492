"""Message history per group: offsets, epochs, and what a reconnecting client missed (docs/history.md).

A route with ``history_size > 0`` keeps the last messages of its groups. Each message published to such a group
gets the group's next **offset** (1, 2, 3, ...), and each group has an **epoch**, an opaque string that changes
whenever its history was lost (a restarted memory broker, a flushed or evicted Redis key, a history that expired
after ``history_ttl`` seconds without a message). A client that remembers ``(epoch, offset)`` asks for what came
after it; it gets every message above the offset when the epoch is the same and nothing was trimmed, else nothing
and the news that it must reload its state.

This module holds the values that travel between the server and its broker, and the memory broker's store. The
Redis broker keeps the same thing in Redis (selectws/brokers/redis.py).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["HistoryPolicy", "HistoryResult", "MemoryHistory", "Position", "Recovery", "new_epoch", "parse_since"]


def new_epoch() -> str:
    """A fresh epoch: 8 random hex digits (a collision only matters for one group, and only after a loss)."""
    return secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much of a group's past is kept: ``size`` messages, for ``ttl`` seconds after its latest message."""

    size: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a group's stream: the epoch and the offset of the last message it has."""

    epoch: str
    offset: int


def parse_since(text: str) -> Position | None:
    """``"E:N"`` (as a client sends it in ``?since=``) as a :class:`Position`; None when it is not one."""
    epoch, sep, number = text.rpartition(":")
    if not sep or not epoch or len(epoch) > 64 or not (number.isascii() and number.isdigit()) or len(number) > 18:
        return None
    return Position(epoch, int(number))


@dataclass(slots=True)
class HistoryResult:
    """A read of a group's history: its epoch, the offset of its latest message, and the messages above the offset
    asked for, oldest first, each ``(offset, message)``. ``error`` is set when it could not be read (the broker is
    down): then ``epoch`` is ``""`` and nothing can be recovered."""

    epoch: str
    offset: int
    messages: list[tuple[int, str | bytes]] = field(default_factory=list)
    error: str | None = None

    def complete_since(self, since: int) -> bool:
        """Whether ``messages`` hold every message above ``since`` up to the latest (nothing trimmed or cut)."""
        if self.error is not None or since > self.offset or since < 0:
            return False
        if since == self.offset:
            return True
        msgs = self.messages
        return bool(msgs) and msgs[0][0] == since + 1 and msgs[-1][0] == self.offset


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a join with history found, as :meth:`ServerAPI.join` hands it to the ``then`` callback.

    ``epoch`` and ``offset``: the group's position after the replay (the offset of its latest message); None when
    the group keeps no history. ``recovered``: None when the join asked for nothing (no ``since``); True when every
    missed message was replayed (``missed`` of them, before the callback ran); False when the epoch differed or
    messages were trimmed, so nothing was replayed and the client must reload its state."""

    epoch: str | None
    offset: int | None
    recovered: bool | None = None
    missed: int = 0
    error: str | None = None


class _Stream:
    __slots__ = ("epoch", "expires", "messages", "offset")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.offset = 0
        self.messages: deque[tuple[int, str | bytes]] = deque()
        self.expires = 0.0


class MemoryHistory:
    """The memory broker's history: a bounded deque per group, forgotten ``ttl`` seconds after its last message.

    Groups are kept in the order of their last activity, so expired ones are dropped from the front, a few at each
    append or read (bounded work; memory is bounded by ``size`` messages per group that had a message within its
    ``ttl``)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._streams: OrderedDict[str, _Stream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def _expire(self, now: float) -> None:
        streams = self._streams
        for _ in range(16):  # bounded per call; what is left goes on the next one
            if not streams:
                return
            group, stream = next(iter(streams.items()))
            if stream.expires > now:
                return
            del streams[group]

    def _stream(self, group: str, ttl: float, now: float) -> _Stream:
        stream = self._streams.get(group)
        if stream is None or stream.expires <= now:
            if stream is not None:
                del self._streams[group]
            stream = self._streams[group] = _Stream(new_epoch())
        else:
            self._streams.move_to_end(group)
        stream.expires = now + ttl
        return stream

    def append(self, group: str, policy: HistoryPolicy, message: str | bytes) -> tuple[int, str]:
        """Keep ``message``; its offset and the group's epoch."""
        now = self._now()
        self._expire(now)
        stream = self._stream(group, policy.ttl, now)
        stream.offset += 1
        messages = stream.messages
        messages.append((stream.offset, message))
        while len(messages) > policy.size:
            messages.popleft()
        return stream.offset, stream.epoch

    def read(self, group: str, policy: HistoryPolicy, since: int | None, limit: int) -> HistoryResult:
        """The group's position and, when ``since`` is given, up to ``limit`` messages above it (oldest first).

        A group with no history yet gets one (an epoch, offset 0), so that a client learns a position to come back
        with even before the first message."""
        now = self._now()
        self._expire(now)
        existing = self._streams.get(group)
        # A read does not extend the life of a history.
        live = existing is not None and existing.expires > now
        stream = existing if live and existing is not None else self._stream(group, policy.ttl, now)
        result = HistoryResult(stream.epoch, stream.offset)
        if since is not None and since < stream.offset:
            out = result.messages
            for offset, message in stream.messages:
                if offset > since:
                    out.append((offset, message))
                    if len(out) >= limit:
                        break
        return result
