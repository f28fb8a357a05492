"""The embedded default broker: one process, nothing to install, delivery is a function call."""

from __future__ import annotations

from selectws.brokers.base import Deliver

__all__ = ["MemoryBroker"]


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
