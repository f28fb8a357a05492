"""Issue 12, defect 2: a hung Redis (SIGSTOP) was never noticed. The deadline logic of the Redis broker's health
check, driven without Redis and without a running loop (the loop's clock is set by hand), ``/readyz``, and the
``[broker] health_timeout`` and ``[ops] readyz`` keys. The same with a real, stopped redis-server:
tests/integration/test_redis_broker.py (``test_hung_redis_is_marked_down_then_comes_back``)."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

import pytest

hiredis = pytest.importorskip("hiredis", reason="the Redis broker needs hiredis: pip install 'selectws[redis]'")

from selectws.brokers.redis import NO_ANSWER, ConnectionState, RedisBroker, encode_command, liveness  # noqa: E402
from selectws.config import BrokerConfig, Config, ConfigError, OpsConfig, parse_config  # noqa: E402
from selectws.protocol.http11 import Headers, Request  # noqa: E402
from selectws.server.health import healthz_handler, ops_handlers, readyz_handler  # noqa: E402
from selectws.server.stats import BrokerStats, ServerStats  # noqa: E402
from selectws.transport.loop import EventLoop  # noqa: E402

UP = ConnectionState.UP
PING = encode_command("PING")
T0 = 1000.0


# ---------------------------------------------------------------------------------------------- liveness()
@pytest.mark.parametrize(
    ("now", "last_heard", "last_ping", "expected"),
    [
        (T0, T0, 0.0, ("ok", T0 + 1.0)),  # just heard: next look when a PING would be due
        (T0 + 0.9, T0, 0.0, ("ok", T0 + 1.0)),
        (T0 + 1.0, T0, 0.0, ("ping", T0 + 2.0)),  # silent a third of the timeout: PING
        (T0 + 1.5, T0, T0 + 1.0, ("ok", T0 + 2.0)),  # pinged half a second ago: not again yet
        (T0 + 2.0, T0, T0 + 1.0, ("ping", T0 + 3.0)),  # still silent: one more, look again at the deadline
        (T0 + 2.999, T0, T0 + 2.0, ("ok", T0 + 3.0)),
        (T0 + 3.0, T0, T0 + 2.0, ("hung", T0 + 3.0)),  # silent for the whole timeout
        (T0 + 60.0, T0, T0 + 2.0, ("hung", T0 + 60.0)),
        (T0 + 3.0, T0 + 2.5, T0 + 2.0, ("ok", T0 + 3.5)),  # a reply (to anything) moves the deadline
    ],
)
def test_liveness(now: float, last_heard: float, last_ping: float, expected: tuple[str, float]) -> None:
    verdict, when = liveness(now, last_heard, last_ping, 3.0)
    assert (verdict, round(when, 6)) == expected


def test_liveness_never_asks_to_look_again_in_the_past() -> None:
    for step in range(0, 400):
        now = T0 + step * 0.01
        for last_ping in (0.0, T0, T0 + 1.0, T0 + 2.0):
            if last_ping > now:
                continue
            verdict, when = liveness(now, T0, last_ping, 3.0)
            assert now <= when <= max(now, T0 + 3.0)
            assert (verdict == "hung") == (now >= T0 + 3.0)


# ---------------------------------------------------------------------------------------------- the broker
class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.records.append((level, event, kw))


def _up_broker(health_timeout: float = 3.0) -> tuple[RedisBroker, _Log]:
    """A broker whose two connections are up (no sockets: what it writes stays in their buffers)."""
    log = _Log()
    config = BrokerConfig(url="redis://127.0.0.1:1/0", channel_prefix="p:", health_timeout=health_timeout)
    broker = RedisBroker(EventLoop(), lambda group, message, exclude: 1, config, log)
    broker.pub.state = broker.sub.state = UP
    broker.pub.last_heard = broker.sub.last_heard = T0
    return broker, log


def _at(broker: RedisBroker, now: float) -> None:
    """The health timer fires at ``now``."""
    broker.loop.now = now
    broker._check_health()


def test_idle_connections_are_pinged_then_a_silent_one_is_dropped_once() -> None:
    broker, log = _up_broker()
    pub, sub = broker.pub, broker.sub
    _at(broker, T0 + 0.5)
    assert not pub.wbuf and not sub.wbuf  # heard from recently: nothing to ask
    _at(broker, T0 + 1.0)
    assert bytes(pub.wbuf) == PING and bytes(sub.wbuf) == PING and list(sub.pending) == ["ping"]
    _at(broker, T0 + 1.5)
    assert bytes(sub.wbuf) == PING  # at most one PING per third of the timeout
    pub.last_heard = T0 + 1.2  # Redis answered on the publish connection only
    broker.publish("g", "x", frozenset())  # in flight when the subscribe connection is found hung
    _at(broker, T0 + 2.0)
    assert bytes(sub.wbuf) == PING * 2 and broker.up
    _at(broker, T0 + 2.999)
    assert broker.up
    _at(broker, T0 + 3.0)
    assert not broker.up and pub.state is sub.state is ConnectionState.DOWN
    [(level, event, fields)] = log.records
    assert (level, event) == ("warning", "broker unresponsive")
    assert fields["connection"] == "subscribe" and fields["error"] == NO_ANSWER
    assert (fields["silent"], fields["timeout"], fields["unconfirmed"]) == (3.0, 3.0, 1)
    stats = broker.stats()
    assert stats.dropped == 1 and not stats.up
    assert stats.status is not None and f"down ({NO_ANSWER})" in stats.status
    assert broker._health_timer is None and broker._timer is not None  # no more checks; a reconnect is planned
    assert broker.publish("g", "y", frozenset()) == 1 and broker.dropped == 2  # local delivery, drop counted


def test_retries_of_a_hung_redis_are_info_lines() -> None:
    """Reconnecting to a stopped Redis connects (TCP) and gets no answer: the same failure, logged at info."""
    broker, log = _up_broker()
    _at(broker, T0 + 3.0)
    for _ in range(3):
        broker._timer = None  # (the reconnect timer fired; the attempt connected and sent its PING)
        broker.pub.state = broker.sub.state = ConnectionState.SETUP
        broker._connect_timeout()
        assert not broker.up
    assert [(level, event) for level, event, _ in log.records] == [
        ("warning", "broker unresponsive"), ("info", "broker unavailable"), ("info", "broker unavailable"),
        ("info", "broker unavailable")]
    assert all(fields["error"] == NO_ANSWER for _, _, fields in log.records)


def test_a_reply_already_waiting_is_read_before_blaming_redis() -> None:
    """The loop itself was late (a long callback): what Redis sent meanwhile counts."""
    broker, log = _up_broker()
    ours, redis_end = socket.socketpair()
    try:
        ours.setblocking(False)
        broker.pub.sock = ours
        broker.pub.reader = hiredis.Reader()
        broker.pub.pending.append("ping")
        redis_end.sendall(b"+PONG\r\n")
        broker.sub.last_heard = T0 + 3.4
        _at(broker, T0 + 3.5)
        assert broker.up and not log.records
        assert broker.pub.last_heard == T0 + 3.5 and not broker.pub.pending
        _at(broker, T0 + 6.5)  # nothing more from it: now it is hung
        assert not broker.up and log.records[0][1] == "broker unresponsive"
    finally:
        redis_end.close()
        broker.close()


def test_health_timeout_scales_the_ping_interval() -> None:
    broker, _ = _up_broker(health_timeout=0.3)
    _at(broker, T0 + 0.09)
    assert not broker.pub.wbuf
    _at(broker, T0 + 0.1)
    assert bytes(broker.pub.wbuf) == PING
    _at(broker, T0 + 0.3)
    assert not broker.up


# ---------------------------------------------------------------------------------------------- /readyz
REQUEST = Request("GET", "/", (1, 1), Headers(), path="/")
MEMORY = BrokerStats(kind="memory", up=True, status=None, dropped=0, reconnects=0)
REDIS_UP = BrokerStats(kind="redis", up=True, status="broker redis h:1: up", dropped=0, reconnects=0)
REDIS_HUNG = replace(REDIS_UP, up=False, status=f"broker redis h:1: down ({NO_ANSWER}); local delivery only")


def _stats(**changes: Any) -> ServerStats:
    idle = ServerStats(
        started_at=1_700_000_000.0, draining=False, accepted=0, accept_errors=0, rejected={}, handshake_failures=0,
        messages_in=0, messages_out=0, plugin_errors=0, slow_consumers_dropped=0, close_codes={}, bytes_in=0,
        bytes_out=0, sockets_open=0, handshaking=0, open_by_route={}, groups=0, write_buffer_bytes=0,
        loop_iterations=0, loop_lag_max=0.0, timers=0, broker=MEMORY,
    )
    return replace(idle, **changes)


def test_readyz_is_503_while_the_broker_is_down() -> None:
    assert readyz_handler(lambda: _stats())(REQUEST)[::2] == (200, b"ready\n")
    status, headers, body = readyz_handler(lambda: _stats(broker=REDIS_UP))(REQUEST)
    assert (status, body) == (200, b"ready\nbroker redis h:1: up\n") and ("X-Broker", "up") in headers
    status, headers, body = readyz_handler(lambda: _stats(broker=REDIS_HUNG))(REQUEST)
    assert status == 503 and body == b"broker down\n" + REDIS_HUNG.status.encode() + b"\n"  # type: ignore[union-attr]
    assert ("X-Broker", "down") in headers and ("Retry-After", "5") in headers
    status, _, body = readyz_handler(lambda: _stats(broker=REDIS_UP, draining=True))(REQUEST)
    assert status == 503 and body.startswith(b"draining\n")


def test_healthz_keeps_200_and_says_the_broker_is_down() -> None:
    status, headers, body = healthz_handler(lambda: _stats(broker=REDIS_HUNG))(REQUEST)
    assert status == 200 and body == b"ok\n" + REDIS_HUNG.status.encode() + b"\n"  # type: ignore[union-attr]
    assert ("X-Broker", "down") in headers


def test_readyz_is_an_ops_endpoint() -> None:
    assert "/readyz" in ops_handlers(_stats, OpsConfig())
    assert set(ops_handlers(_stats, OpsConfig(readyz_path="/ready", healthz=False, metrics=False))) == {"/ready"}
    assert "/readyz" not in ops_handlers(_stats, OpsConfig(readyz=False))


# ---------------------------------------------------------------------------------------------- configuration
def test_health_timeout_key() -> None:
    assert Config().broker.health_timeout == 3.0
    assert parse_config({"broker": {"health_timeout": 0.5}}).broker.health_timeout == 0.5
    for bad, reason in ((0, "must be > 0, got 0"), (-1.0, "must be > 0, got -1.0"),
                        ("3s", "expected a number of seconds, got string")):
        with pytest.raises(ConfigError) as info:
            parse_config({"broker": {"health_timeout": bad}})
        assert (info.value.key, info.value.reason) == ("broker.health_timeout", reason)


def test_readyz_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"ops": {"readyz_path": "readyz"}})
    assert info.value.key == "ops.readyz_path"
