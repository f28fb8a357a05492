"""The Redis broker without a Redis: payload encoding, RESP encoding/parsing with hiredis.Reader, what a publish
buffers. Replies, pushes, AUTH/SELECT and refusals are driven through a real redis-server in
tests/integration/test_redis_broker.py."""

from __future__ import annotations

from typing import Any

import pytest

hiredis = pytest.importorskip("hiredis", reason="the Redis broker needs hiredis: pip install 'selectws[redis]'")

from selectws.brokers.redis import (  # noqa: E402
    ConnectionState,
    RedisBroker,
    decode_payload,
    encode_command,
    encode_payload,
)
from selectws.config import BrokerConfig, ConfigError, parse_config, parse_redis_url  # noqa: E402
from selectws.transport.loop import EventLoop  # noqa: E402

INSTANCE = b"\x01\x02\x03\x04\x05\x06\x07\x08"


@pytest.mark.parametrize("message", ["", "héllo ✓", "x" * 70000, b"", b"\x00\xff" * 10, bytes(range(256))])
@pytest.mark.parametrize("exclude", [frozenset(), frozenset({1}), frozenset({3, 2**40, 7})])
def test_payload_round_trip(message: str | bytes, exclude: frozenset[int]) -> None:
    payload = encode_payload(INSTANCE, message, exclude)
    instance, got, got_exclude = decode_payload(payload)
    assert instance == INSTANCE
    assert type(got) is type(message) and got == message  # opcode (text/binary) survives
    assert got_exclude == exclude


def test_payload_layout() -> None:
    # version 1, 8-byte instance id, opcode, u32 count of excluded ids, u64 ids, then the message bytes
    assert encode_payload(INSTANCE, "hi", frozenset({5})) == (
        b"\x01" + INSTANCE + b"\x01" + b"\x00\x00\x00\x01" + (5).to_bytes(8, "big") + b"hi"
    )
    assert encode_payload(INSTANCE, b"hi")[9] == 2


@pytest.mark.parametrize("bad", [b"", b"\x01" * 5, b"\x02" + INSTANCE + b"\x01\x00\x00\x00\x00",
                                 b"\x01" + INSTANCE + b"\x03\x00\x00\x00\x00",
                                 b"\x01" + INSTANCE + b"\x01\x00\x00\x00\x02" + b"\x00" * 8,
                                 b"\x01" + INSTANCE + b"\x01\x00\x00\x00\x00\xff"])
def test_payload_rejects_garbage(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_payload(bad)


def test_command_encoding_parses_back_with_hiredis() -> None:
    reader = hiredis.Reader()
    cmd = encode_command("PUBLISH", b"selectws:g", b"\r\n\x00binary")
    assert cmd == b"*3\r\n$7\r\nPUBLISH\r\n$10\r\nselectws:g\r\n$9\r\n\r\n\x00binary\r\n"
    reader.feed(cmd)
    assert reader.gets() == [b"PUBLISH", b"selectws:g", b"\r\n\x00binary"]
    assert reader.gets() is False


def test_hiredis_reader_byte_by_byte_and_errors() -> None:
    """What the broker relies on: partial input gives False, replies come out whole and in order, errors are
    returned (not raised) as ReplyError."""
    payload = encode_payload(INSTANCE, "m")
    stream = (b"*3\r\n$9\r\nsubscribe\r\n$3\r\nch1\r\n:1\r\n"
              + b"*3\r\n$7\r\nmessage\r\n$3\r\nch1\r\n$%d\r\n%s\r\n" % (len(payload), payload)
              + b"-NOAUTH Authentication required.\r\n:2\r\n")
    reader = hiredis.Reader()
    replies: list[Any] = []
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    assert replies[0] == [b"subscribe", b"ch1", 1]
    assert replies[1] == [b"message", b"ch1", payload]
    assert isinstance(replies[2], hiredis.ReplyError) and "NOAUTH" in str(replies[2])
    assert replies[3] == 2


class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.records.append((event, kw))


def _broker(url: str = "redis://127.0.0.1:1/0", password: str = "",
            ) -> tuple[RedisBroker, list[tuple[str, str | bytes, frozenset[int]]]]:
    delivered: list[tuple[str, str | bytes, frozenset[int]]] = []

    def deliver(group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        delivered.append((group, message, exclude))
        return 1

    loop = EventLoop()
    broker = RedisBroker(loop, deliver, BrokerConfig(url=url, password=password, channel_prefix="p:"), _Log())
    return broker, delivered


def test_publish_while_down_delivers_locally_and_counts_drop() -> None:
    broker, delivered = _broker()
    assert broker.publish("g", "hi", frozenset({1})) == 1
    assert delivered == [("g", "hi", frozenset({1}))]
    assert broker.dropped == 1 and broker.published == 0
    assert not broker.up and "down" in broker.status()


def test_publish_when_up_buffers_one_publish_and_bounds_the_buffer() -> None:
    broker, delivered = _broker()
    broker.pub.state = ConnectionState.UP
    broker.publish("g", "hi", frozenset())
    reader = hiredis.Reader()
    reader.feed(bytes(broker.pub.wbuf))
    cmd = reader.gets()
    assert cmd[:2] == [b"PUBLISH", b"p:g"] and decode_payload(cmd[2])[1] == "hi"
    assert broker.published == 1 and list(broker.pub.pending) == ["publish"]
    big = b"x" * (broker.config.max_buffer - len(broker.pub.wbuf))  # one more byte of framing is too much
    broker.publish("g", big, frozenset())
    assert broker.dropped == 1 and len(delivered) == 2  # local delivery still happened


def test_publish_is_one_encoded_command() -> None:
    broker, _ = _broker()
    broker.pub.state = ConnectionState.UP
    broker.publish("g", b"\r\n\x00", frozenset({3}))
    payload = encode_payload(broker.instance, b"\r\n\x00", frozenset({3}))
    assert bytes(broker.pub.wbuf) == encode_command("PUBLISH", "p:g", payload)


def test_stats() -> None:
    broker, _ = _broker()
    broker.publish("g", "hi", frozenset())  # down: dropped
    stats = broker.stats()
    assert (stats.kind, stats.up, stats.dropped, stats.reconnects) == ("redis", False, 1, 0)
    assert (stats.published, stats.received, stats.errors) == (0, 0, 0)
    assert stats.status is not None and "down" in stats.status
    broker.pub.state = broker.sub.state = ConnectionState.UP
    broker.publish("g", "hi", frozenset())
    stats = broker.stats()
    assert stats.up and stats.published == 1 and stats.status is not None and stats.status.endswith(": up")


def test_subscribe_and_unsubscribe_follow_membership() -> None:
    broker, _ = _broker()
    broker.subscribe("a")  # down: remembered, sent on connect
    assert broker.groups == {"a"} and not broker.sub.wbuf
    broker.sub.state = ConnectionState.UP
    broker.subscribe("b")
    broker.unsubscribe("a")
    reader = hiredis.Reader()
    reader.feed(bytes(broker.sub.wbuf))
    assert reader.gets() == [b"SUBSCRIBE", b"p:b"]
    assert reader.gets() == [b"UNSUBSCRIBE", b"p:a"]
    assert broker.groups == {"b"}


def test_redis_url_parsing() -> None:
    assert parse_redis_url("k", "redis://127.0.0.1:6380/2") == ("127.0.0.1", 6380, 2, False, "")
    assert parse_redis_url("k", "rediss://:s%40cret@redis.example") == ("redis.example", 6379, 0, True, "s@cret")
    for bad in ("http://x", "redis://", "redis://h/x", "redis://h:99999", "redis://h/0?timeout=1"):
        with pytest.raises(ConfigError) as info:
            parse_redis_url("broker.url", bad)
        assert info.value.key == "broker.url"


def test_workers_need_a_broker() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"workers": 2}})
    assert info.value.key == "server.workers" and "broker" in info.value.reason
    cfg = parse_config({"server": {"workers": 2}, "broker": {"url": "redis://127.0.0.1:6379"}})
    assert cfg.server.workers == 2
    with pytest.raises(ConfigError) as info:
        parse_config({"broker": {"reconnect_min": 5, "reconnect_max": 1}})
    assert info.value.key == "broker.reconnect_max"
