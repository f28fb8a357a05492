"""Brokers carry group messages between processes: the Redis broker (the in-memory one lives in the server layer).

:func:`broker_factory` is what the application hands the server: the broker ``[broker]`` asks for.
"""

from __future__ import annotations

from typing import Any

from selectws.brokers.redis import RedisBroker
from selectws.config import BrokerConfig
from selectws.server.broker import Broker, BrokerFactory, Deliver
from selectws.transport.loop import EventLoop

__all__ = ["broker_factory"]


def broker_factory(config: BrokerConfig) -> BrokerFactory | None:
    """``factory(loop, deliver, log)`` building a :class:`~selectws.brokers.redis.RedisBroker` when ``config.url``
    is set; None (the server's in-memory broker) when it is empty."""
    if not config.url:
        return None

    def redis(loop: EventLoop, deliver: Deliver, log: Any) -> Broker:
        return RedisBroker(loop, deliver, config, log)

    return redis
