"""Per-connection rate limits (issue 14): the token bucket against a fake clock, the configuration keys and their
errors, and the server layer stepped in process (a batch of messages read at once is judged at one instant, so
the counts are exact here; tests/integration/test_rate_limits.py runs the real daemon)."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from harness import in_process_server

from selectws.config import ConfigError, LimitsConfig, parse_config
from selectws.server.ratelimit import TokenBucket

MASK = b"\x11\x22\x33\x44"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now


def takes(bucket: TokenBucket, n: int) -> int:
    """How many of ``n`` messages at the same instant the bucket lets through."""
    return sum(bucket.take() for _ in range(n))


# ============================================================================================== the token bucket
def test_bucket_starts_full_and_lets_burst_through_at_once() -> None:
    bucket = TokenBucket(FakeClock(), rate=10, burst=20)
    assert takes(bucket, 1000) == 20


def test_bucket_refills_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=10, burst=20)
    assert takes(bucket, 20) == 20
    assert not bucket.take()
    clock.now += 0.05  # half a token
    assert not bucket.take()
    clock.now += 0.05  # the refused attempt lost no time: one token now
    assert bucket.take()
    assert not bucket.take()
    clock.now += 1.0
    assert takes(bucket, 100) == 10


def test_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=10, burst=5)
    clock.now += 3600
    assert takes(bucket, 100) == 5
    # spending slowly keeps it full, and it still caps at burst
    clock.now += 10
    for _ in range(50):
        assert bucket.take()
        clock.now += 0.1
    assert takes(bucket, 100) == 5


def test_bucket_fractional_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=0.5, burst=1)  # one message every two seconds
    assert bucket.take()
    clock.now += 1.9
    assert not bucket.take()
    clock.now += 0.1
    assert bucket.take()


def test_bucket_average_rate_over_a_long_flood() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=100, burst=10)
    allowed = 0
    for _ in range(10_000):  # 10 s of a client sending every millisecond
        allowed += bucket.take()
        clock.now += 0.001
    assert 10 + 100 * 10 - 2 <= allowed <= 10 + 100 * 10


def test_bucket_allowance_for_a_batch_then_spend() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=10, burst=20)
    assert bucket.allowance() == 20
    bucket.spend(5)
    assert bucket.allowance() == 15  # same instant: nothing refilled
    clock.now += 0.1
    assert bucket.allowance() == 16
    bucket.spend(16)
    assert bucket.allowance() == 0
    clock.now += 0.25
    assert bucket.allowance() == 2  # 2.5 tokens: two whole messages
    bucket.spend(2)
    clock.now += 0.05
    assert bucket.allowance() == 1  # the half token left was kept


def test_bucket_stop_refuses_everything_after() -> None:
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=1000, burst=1000)
    assert bucket.allowance() == 1000
    bucket.stop()
    bucket.spend(3)  # what the batch let through before the limit closed the connection
    clock.now += 60
    assert bucket.allowance() == 0
    assert takes(bucket, 10) == 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0)])
def test_bucket_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(FakeClock(), rate, burst)


# ============================================================================================== configuration
def route(**keys: Any) -> dict[str, Any]:
    return {"path": "/echo", "plugin": "echo", **keys}


def test_config_defaults_are_off() -> None:
    config = parse_config({})
    assert config.limits.max_messages_per_second == 0
    assert config.limits.burst == 0
    assert config.limits.rate_limit_action == "close"
    for rc in config.routes:
        assert rc.rate_limit(config.limits) == {"max_messages_per_second": 0, "burst": 0, "rate_limit_action": "close"}


def test_config_route_keys_override_limits() -> None:
    config = parse_config({
        "limits": {"max_messages_per_second": 10, "burst": 20, "rate_limit_action": "drop"},
        "routes": [route(), route(path="/fast", max_messages_per_second=1000.5, burst=50),
                   route(path="/free", max_messages_per_second=0), route(path="/strict", rate_limit_action="CLOSE")],
    })
    effective = [rc.rate_limit(config.limits) for rc in config.routes]
    assert effective == [
        {"max_messages_per_second": 10.0, "burst": 20, "rate_limit_action": "drop"},
        {"max_messages_per_second": 1000.5, "burst": 50, "rate_limit_action": "drop"},
        {"max_messages_per_second": 0.0, "burst": 20, "rate_limit_action": "drop"},
        {"max_messages_per_second": 10.0, "burst": 20, "rate_limit_action": "close"},
    ]


@pytest.mark.parametrize(("data", "key", "reason"), [
    ({"routes": [route(max_messages_per_second=-1, burst=5)]}, "routes[0].max_messages_per_second",
     "must be >= 0, got -1"),
    ({"routes": [route(max_messages_per_second="10/s")]}, "routes[0].max_messages_per_second",
     "expected a number of messages per second, got string"),
    ({"routes": [route(max_messages_per_second=10, burst=20, rate_limit_action="kick")]},
     "routes[0].rate_limit_action", "must be one of 'close', 'drop', got 'kick'"),
    ({"routes": [route(burst=2.5)]}, "routes[0].burst", "expected an integer, got float"),
    ({"routes": [route(burst=-1)]}, "routes[0].burst", "must be >= 0, got -1"),
    ({"routes": [route(max_messages_per_second=10)]}, "routes[0].burst", "must be >= 1 when max_messages_per_second"),
    ({"routes": [route(), route(path="/b", max_messages_per_second=5, burst=0)]}, "routes[1].burst",
     "must be >= 1 when max_messages_per_second"),
    ({"limits": {"max_messages_per_second": 10}}, "limits.burst", "must be >= 1 when limits.max_messages_per_second"),
    ({"limits": {"max_messages_per_second": -0.5}}, "limits.max_messages_per_second", "must be >= 0, got -0.5"),
    ({"limits": {"rate_limit_action": "reset"}}, "limits.rate_limit_action", "must be one of 'close', 'drop'"),
    ({"routes": [route(max_message_per_second=10)]}, "routes[0].max_message_per_second",
     "unknown key; did you mean 'routes[0].max_messages_per_second'?"),
])
def test_config_errors_name_the_key(data: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == key
    assert reason in info.value.reason, info.value.reason


def test_config_burst_without_a_rate_is_ignored_not_an_error() -> None:
    config = parse_config({"limits": {"burst": 20}, "routes": [route(burst=5, rate_limit_action="drop")]})
    assert config.routes[0].rate_limit(config.limits)["max_messages_per_second"] == 0


def test_limits_fields_exist() -> None:
    assert LimitsConfig(max_messages_per_second=3, burst=4, rate_limit_action="drop").burst == 4


# ============================================================================================== the server, in process
def masked(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames (short payloads) -> [(opcode, payload)]."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        n = data[pos + 1] & 0x7F
        assert n < 126
        frames.append((data[pos] & 0x0F, data[pos + 2 : pos + 2 + n]))
        pos += 2 + n
    assert pos == len(data), "a partial frame"
    return frames


def read_available(h: Any, sock: socket.socket, steps: int = 10) -> bytes:
    out = bytearray()
    for _ in range(steps):
        h.step(1)
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                return bytes(out)
            out += chunk
    return bytes(out)


SETTINGS = {"routes": [
    {"path": "/close", "plugin": "echo", "max_messages_per_second": 10, "burst": 20},
    {"path": "/drop", "plugin": "echo", "max_messages_per_second": 10, "burst": 20, "rate_limit_action": "drop"},
    {"path": "/free", "plugin": "echo"},
]}


def test_server_close_action_echoes_exactly_burst_then_1008() -> None:
    with in_process_server(SETTINGS) as h:
        sock = h.connect("/close")
        sock.sendall(b"".join(masked(str(i).encode()) for i in range(200)))  # one read, one instant
        frames = read_frames(read_available(h, sock))
        echoes = [payload for opcode, payload in frames if opcode == 1]
        assert echoes == [str(i).encode() for i in range(20)]
        assert frames[-1] == (8, (1008).to_bytes(2, "big") + b"rate limit exceeded")
        stats = h.stats()
        assert stats.rate_limited == {"/close": 1, "/drop": 0}
        assert stats.rate_limit_closes == {"/close": 1}
        assert stats.close_codes == {1008: 1}
        assert stats.messages_in == 200  # received, even though 180 never reached the plugin


def test_server_drop_action_drops_counts_and_serves_again_after_refill() -> None:
    with in_process_server(SETTINGS) as h:
        sock = h.connect("/drop")
        sock.sendall(b"".join(masked(str(i).encode()) for i in range(200)))
        frames = read_frames(read_available(h, sock))
        assert frames == [(1, str(i).encode()) for i in range(20)]  # no close frame
        assert h.stats().rate_limited == {"/close": 0, "/drop": 180}
        time.sleep(0.25)  # 2.5 tokens, plus what the steps above took (at most 0.1 s: one more)
        sock.sendall(b"".join(masked(f"again {i}".encode()) for i in range(30)))
        frames = read_frames(read_available(h, sock))
        assert 2 <= len(frames) <= 4, frames
        assert frames == [(1, f"again {i}".encode()) for i in range(len(frames))]
        assert h.stats().rate_limited["/drop"] == 180 + 30 - len(frames)
        assert h.stats().close_codes == {}


def test_server_route_without_limit_has_no_bucket_and_echoes_everything() -> None:
    with in_process_server(SETTINGS) as h:
        sock = h.connect("/free")
        sock.sendall(b"".join(masked(str(i).encode()) for i in range(200)))
        frames = read_frames(read_available(h, sock))
        assert frames == [(1, str(i).encode()) for i in range(200)]
        assert h.stats().rate_limited == {"/close": 0, "/drop": 0}
        assert h.stats().close_codes == {}
