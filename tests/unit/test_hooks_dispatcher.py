"""The webhook dispatcher without sockets: a fake clock and loop, a fake HTTP client answering on command.

Batching (one POST per batch_interval, at most max_batch events), the signature, the bounded queue and its drop
counter, at-most-once (a batch that left and failed is not resent; one that never left goes back), backoff, and
one log line per failure episode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from selectws.config import HookConfig
from selectws.server.hooks import SIGNATURE_HEADER, HookDispatcher, Hooks, HookTarget
from selectws.transport.http_client import HttpResult

SECRET = b"k3y"


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class FakeLoop:
    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer due on the way, in order."""
        end = self.now + seconds
        while True:
            due = [t for t in self.timers if t.callback is not None and t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.now = max(self.now, timer.when)
            callback, timer.callback = timer.callback, None
            assert callback is not None
            callback()
        self.now = end


class FakeClient:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.closed = False

    def request(self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, timeout: float,
                done: Callable[[HttpResult], None]) -> None:
        self.requests.append({"method": method, "target": target, "headers": dict(headers), "body": body,
                              "done": done, "timeout": timeout})

    def answer(self, status: int | None = 200, *, error: str | None = None, sent: bool = True) -> None:
        request = self.requests[-1]
        request["done"](HttpResult(status, error, sent, 0.01))

    def close(self) -> None:
        self.closed = True


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))


def make(**overrides: Any) -> tuple[HookDispatcher, FakeLoop, FakeClient, Log]:
    settings: dict[str, Any] = {"url": "http://127.0.0.1:9/hook?t=1", "events": ("open", "close"),
                                "secret_file": "s", "batch_interval": 0.1, "max_batch": 3, "max_queue": 10,
                                "timeout": 2.0, "backoff_min": 0.5, "backoff_max": 4.0}
    settings.update(overrides)
    target = HookTarget(HookConfig(**settings), SECRET, ((2, ("127.0.0.1", 9)),))
    loop, client, log = FakeLoop(), FakeClient(), Log()
    dispatcher = HookDispatcher(target, loop, lambda: log, lambda t, lp: client)  # type: ignore[arg-type]
    return dispatcher, loop, client, log


def event(n: int) -> dict[str, Any]:
    return {"event": "open", "session": str(n)}


def test_events_wait_batch_interval_then_go_as_one_signed_batch() -> None:
    dispatcher, loop, client, _ = make()
    dispatcher.push(event(1))
    dispatcher.push(event(2))
    loop.advance(0.05)
    assert client.requests == []
    loop.advance(0.06)
    [request] = client.requests
    assert request["method"] == "POST" and request["target"] == "/hook?t=1" and request["timeout"] == 2.0
    body = request["body"]
    assert json.loads(body) == {"events": [event(1), event(2)]}
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert request["headers"][SIGNATURE_HEADER] == expected
    assert request["headers"]["Content-Type"] == "application/json"
    client.answer(204)
    assert dispatcher.sent == 2 and dispatcher.stats().queued == 0


def test_max_batch_and_at_most_one_batch_per_interval() -> None:
    dispatcher, loop, client, _ = make()
    for n in range(7):
        dispatcher.push(event(n))
    loop.advance(0.1)
    assert len(client.requests) == 1 and len(json.loads(client.requests[0]["body"])["events"]) == 3
    loop.advance(0.5)  # no second request while the first is unanswered
    assert len(client.requests) == 1
    client.answer(200)  # answered 0.5 s after it left: the next batch may go at once
    loop.advance(0.0)
    assert len(client.requests) == 2
    client.answer(200)  # answered at once: the third waits for batch_interval after the second left
    loop.advance(0.05)
    assert len(client.requests) == 2
    loop.advance(0.06)
    assert len(client.requests) == 3
    assert [e["session"] for r in client.requests for e in json.loads(r["body"])["events"]] == [str(n) for n in
                                                                                               range(7)]


def test_full_queue_drops_new_events_and_counts_them() -> None:
    dispatcher, _, _, _ = make(max_queue=4)
    for n in range(10):
        dispatcher.push(event(n))
    assert dispatcher.dropped == 6
    assert dispatcher.stats().queued == 4


def test_a_batch_that_left_and_failed_is_not_resent_and_backoff_grows() -> None:
    dispatcher, loop, client, log = make(max_batch=1)
    for n in range(4):
        dispatcher.push(event(n))
    loop.advance(0.1)
    client.answer(None, error="timed out waiting for the response", sent=True)
    assert dispatcher.failed == 1 and dispatcher.stats().queued == 3
    # backoff_min 0.5 (x up to 1.25 jitter): nothing before 0.5 s, something by 0.625 s
    loop.advance(0.49)
    assert len(client.requests) == 1
    loop.advance(0.14)
    assert len(client.requests) == 2
    assert json.loads(client.requests[1]["body"])["events"] == [event(1)]  # event 0 is gone: at-most-once
    client.answer(500)  # a non-2xx answer is a failure too; the wait doubles
    loop.advance(0.99)
    assert len(client.requests) == 2
    loop.advance(0.26)
    assert len(client.requests) == 3
    warnings = [line for line in log.lines if line[0] == "warning"]
    assert len(warnings) == 1  # one line per episode, not per failure
    assert warnings[0][2]["url"] == "http://127.0.0.1:9/hook"  # never the query (it may hold a token)
    client.answer(200)
    assert dispatcher.failures_in_row == 0 and not dispatcher.failing
    recovered = [line for line in log.lines if line[1] == "webhook delivery recovered"]
    assert len(recovered) == 1 and recovered[0][2]["failed"] == 2


def test_a_batch_that_never_left_goes_back_to_the_head_of_the_queue() -> None:
    dispatcher, loop, client, _ = make(max_batch=2, max_queue=3)
    for n in range(3):
        dispatcher.push(event(n))
    loop.advance(0.1)  # events 0, 1 in flight; 2 queued
    dispatcher.push(event(3))
    dispatcher.push(event(4))  # queue: 2, 3, 4 (full)
    client.answer(None, error="connect: Connection refused", sent=False)
    assert dispatcher.failed == 0
    # back in front; the newest beyond max_queue are dropped
    assert [e["session"] for e in dispatcher.queue] == ["0", "1", "2"]
    assert dispatcher.dropped == 2


def test_backoff_caps_at_backoff_max_and_attempts_stay_bounded() -> None:
    dispatcher, loop, client, _ = make(backoff_min=0.5, backoff_max=2.0)
    dispatcher.push(event(0))
    for _ in range(30):  # 30 s of a receiver that refuses every connection
        loop.advance(1.0)
        if client.requests and dispatcher._in_flight is not None:
            client.answer(None, error="connect: Connection refused", sent=False)
    # 0.5 + 1 + 2 + 2 + ... (x <= 1.25): at most ~17 attempts in 30 s, never a busy loop
    assert 8 <= len(client.requests) <= 17


def test_hooks_route_events_by_name_and_occupied_vacated() -> None:
    loop, log = FakeLoop(), Log()
    clients: list[FakeClient] = []

    def factory(target: HookTarget, lp: Any) -> FakeClient:
        clients.append(FakeClient())
        return clients[-1]

    hooks = Hooks(loop, lambda: log, factory)  # type: ignore[arg-type]
    config = HookConfig(url="http://127.0.0.1:9/", events=("join", "occupied", "vacated"), secret_file="s")
    hooks.configure([HookTarget(config, SECRET, ((2, ("127.0.0.1", 9)),))])
    assert hooks

    class Conn:
        id = 7
        session = None
        path = "/chat"
        remote = ("10.0.0.1", 5555)

    conn: Any = Conn()
    hooks.open(conn)  # not asked for
    hooks.join(conn, "chat:a", first=True)
    hooks.leave(conn, "chat:a", last=True)
    [dispatcher] = hooks.dispatchers
    assert [(e["event"], e.get("group")) for e in dispatcher.queue] == [
        ("join", "chat:a"), ("occupied", "chat:a"), ("vacated", "chat:a")]
    first = dispatcher.queue[0]
    assert first["session"] == "7" and first["path"] == "/chat" and first["remote"] == "10.0.0.1"
    assert isinstance(first["time"], float)
    hooks.configure([])  # a reload without hooks closes the dispatcher
    assert not hooks and dispatcher._closed


@pytest.mark.parametrize("status", [200, 204, 299])
def test_2xx_is_success(status: int) -> None:
    dispatcher, loop, client, _ = make()
    dispatcher.push(event(1))
    loop.advance(0.1)
    client.answer(status)
    assert dispatcher.sent == 1 and dispatcher.failed == 0
