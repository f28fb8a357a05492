"""The embedded default broker: one process, nothing to install, delivery is a function call."""

from __future__ import annotations

from selectws.brokers.base import Deliver

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Delivers every group message locally and at once, in publish order."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def subscribe(self, group: str) -> None:
        """Nothing to do: local membership is the whole story in one process."""

    def unsubscribe(self, group: str) -> None:
        """Nothing to do."""

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        return self._deliver(group, message, exclude)
