"""History, recovery on reconnect and presence across instances, against the real daemon (docs/history.md,
docs/presence.md).

The memory broker's tests run one daemon; the Redis tests run two daemons (A and B) on one real redis-server, as
tests/integration/test_redis_broker.py does (skipped locally without the binary, failing under ``CI=true``).
Clients are the ``websockets`` sync client; the server API is called with curl.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from wstools import connect, http_exchange

pytest.importorskip("hiredis", reason="the Redis broker needs hiredis: pip install 'selectws[redis]'")

from test_redis_broker import Redis, _need

TIMEOUT = 10.0
KEY = "history-test-key"


def chat_toml(broker: str = "", *, size: int = 100, ttl: float = 300, extra: str = "") -> str:
    return f"""
    [api]
    key_env = "SELECTWS_TEST_API_KEY"

    [[routes]]
    path = "/chat"
    plugin = "chat"
    history_size = {size}
    history_ttl = {ttl}

    [[routes]]
    path = "/news/{{channel}}"
    plugin = "broadcast"
    history_size = {size}
    options = {{ envelope = true }}

    [[routes]]
    path = "/raw/{{channel}}"
    plugin = "broadcast"

    {broker}
    {extra}
    """


def broker_section(redis: Redis, extra: str = "") -> str:
    return f"""
    [broker]
    url = "{redis.url}"
    reconnect_min = 0.05
    reconnect_max = 0.5
    {extra}
    """


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELECTWS_TEST_API_KEY", KEY)


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis(_need("redis-server", "apt-get install -y redis-server"))
    server.start()
    yield server
    server.kill()


def recv_json(ws: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    message = json.loads(ws.recv(timeout=timeout))
    assert isinstance(message, dict)
    return message


def until(ws: Any, kind: str, timeout: float = TIMEOUT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages before the first of ``type == kind``, and that one."""
    before = []
    deadline = time.monotonic() + timeout
    while True:
        message = recv_json(ws, max(0.01, deadline - time.monotonic()))
        if message.get("type") == kind:
            return before, message
        before.append(message)


def login(url: str, name: str, room: str = "lobby", since: dict[str, Any] | None = None
          ) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Connect and log in: the connection, what came before ``welcome`` (the replay), and ``welcome``."""
    ws = connect(url)
    msg: dict[str, Any] = {"type": "login", "name": name, "room": room}
    if since is not None:
        msg["since"] = since
    ws.send(json.dumps(msg))
    before, welcome = until(ws, "welcome")
    return ws, before, welcome


def say(ws: Any, text: str) -> dict[str, Any]:
    """Say ``text`` and return the ``said`` echo (the sender gets its own)."""
    ws.send(json.dumps({"type": "say", "text": text}))
    while True:
        message = recv_json(ws)
        if message.get("type") == "said" and message.get("text") == text:
            return message


def api(port: int, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    curl = shutil.which("curl")
    assert curl, "curl is needed (apt-get install curl)"
    out = subprocess.run(
        [curl, "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", f"X-API-Key: {KEY}", "--data-binary",
         json.dumps(params), f"http://127.0.0.1:{port}/api/{method}"],
        capture_output=True, text=True, timeout=20, check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


def metric(port: int, name: str) -> float:
    reply = http_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for line in reply.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    return 0.0


# ---------------------------------------------------------------------------------------------- memory broker
def test_chat_messages_carry_offsets_and_a_returning_client_gets_what_it_missed(start_daemon):
    daemon = start_daemon(chat_toml())
    url = daemon.url("/chat")
    alice, before, welcome = login(url, "alice")
    assert before == [] and welcome["offset"] == 0 and isinstance(welcome["epoch"], str) and welcome["epoch"]
    assert "recovered" not in welcome  # she asked for nothing
    epoch = welcome["epoch"]
    bob, _, bob_welcome = login(url, "bob")
    assert bob_welcome["epoch"] == epoch
    joined = recv_json(alice)  # offset 1 was alice's own "joined", sent to nobody (she was alone)
    assert joined == {"type": "joined", "name": "bob", "offset": 2}
    said = say(bob, "first")
    assert said == {"type": "said", "from": "bob", "text": "first", "offset": 3}
    assert recv_json(alice) == said
    alice.close()
    assert recv_json(bob) == {"type": "left", "name": "alice", "offset": 4}
    missed = [say(bob, "while away 1"), say(bob, "while away 2")]

    back, replay, welcome = login(url, "alice", since={"epoch": epoch, "offset": 3})
    assert replay == [{"type": "left", "name": "alice", "offset": 4}, *missed]  # in order, in their shape
    assert welcome["recovered"] is True and welcome["epoch"] == epoch and welcome["offset"] == 6
    assert recv_json(bob) == {"type": "joined", "name": "alice", "offset": 7}
    assert say(bob, "live") == recv_json(back)  # then live traffic, once
    assert metric(daemon.port, 'selectws_recoveries_total{result="ok"}') == 1

    # A position from another epoch, or one older than what is kept: nothing replayed, recovered false.
    other, replay, welcome = login(url, "carol", since={"epoch": "x" + epoch, "offset": 1})
    assert replay == [] and welcome["recovered"] is False and welcome["offset"] == 8
    assert metric(daemon.port, 'selectws_recoveries_total{result="lost"}') == 1
    for ws in (back, bob, other):
        ws.close()


def test_trimmed_history_is_lost_not_partly_replayed(start_daemon):
    daemon = start_daemon(chat_toml(size=3))
    url = daemon.url("/chat")
    bob, _, welcome = login(url, "bob")
    for i in range(5):
        say(bob, f"m{i}")
    alice, replay, welcome2 = login(url, "alice", since={"epoch": welcome["epoch"], "offset": 1})
    assert replay == [] and welcome2["recovered"] is False  # offsets 2 and 3 were trimmed (3 kept: 4..6)
    # Kept now: 5, 6 and 7 (alice's "joined"). From 4 on, everything is there: replayed.
    carol, replay, _ = login(url, "carol", since={"epoch": welcome["epoch"], "offset": 4})
    assert [m["offset"] for m in replay] == [5, 6, 7]
    for ws in (alice, bob, carol):
        ws.close()


def test_a_restarted_memory_broker_says_recovered_false(start_daemon):
    toml = chat_toml()
    first = start_daemon(toml)
    bob, _, welcome = login(first.url("/chat"), "bob")
    say(bob, "before the restart")
    bob.close()
    first.terminate()
    second = start_daemon(toml)
    bob, replay, again = login(second.url("/chat"), "bob", since={"epoch": welcome["epoch"], "offset": 0})
    assert replay == [] and again["recovered"] is False and again["epoch"] != welcome["epoch"]
    bob.close()


def test_broadcast_envelope_and_since_for_plain_clients(start_daemon):
    daemon = start_daemon(chat_toml())
    port = daemon.port
    with connect(daemon.url("/news/n")) as reader, connect(daemon.url("/news/n")) as writer:
        position = json.loads(reader.recv(timeout=TIMEOUT))
        assert position["offset"] == 0 and "recovered" not in position
        epoch = position["epoch"]
        writer.recv(timeout=TIMEOUT)  # its own position line
        writer.send("hello")
        writer.send(b"\x00\x01")
        assert json.loads(reader.recv(timeout=TIMEOUT)) == {"offset": 1, "epoch": epoch, "data": "hello"}
        assert json.loads(reader.recv(timeout=TIMEOUT)) == {"offset": 2, "epoch": epoch, "data_b64": "AAE="}
    assert api(port, "publish", {"group": "broadcast:n", "data": "from the backend"})[0] == 200
    with connect(daemon.url(f"/news/n?since={epoch}:1")) as late:
        replay = [json.loads(late.recv(timeout=TIMEOUT)) for _ in range(3)]
        assert replay == [{"offset": 2, "epoch": epoch, "data_b64": "AAE="},
                          {"offset": 3, "epoch": epoch, "data": "from the backend"},
                          {"epoch": epoch, "offset": 3, "recovered": True}]
    with connect(daemon.url("/news/n?since=nonsense")) as bad:
        with pytest.raises(ConnectionClosed):  # closed with 1008, saying why
            bad.recv(timeout=TIMEOUT)
        assert bad.close_code == 1008 and "since" in (bad.close_reason or "")


def test_api_history_reads_the_group_with_since_and_limit(start_daemon):
    daemon = start_daemon(chat_toml(size=10))
    port = daemon.port
    for i in range(4):
        assert api(port, "publish", {"group": "broadcast:h", "data": f"m{i}"})[0] == 200
    status, answer = api(port, "history", {"group": "broadcast:h", "since": 1, "limit": 2})
    result = answer["result"]
    assert status == 200 and result["offset"] == 4 and result["complete"] is False
    assert result["messages"] == [{"offset": 2, "data": "m1"}, {"offset": 3, "data": "m2"}]
    status, answer = api(port, "history", {"group": "broadcast:h", "since": {"epoch": result["epoch"], "offset": 3}})
    assert answer["result"]["messages"] == [{"offset": 4, "data": "m3"}] and answer["result"]["complete"] is True
    status, answer = api(port, "history", {"group": "broadcast:nohistory-route"})
    assert status == 200  # /news owns every broadcast:* group (the first route with history that owns it)
    status, answer = api(port, "history", {"group": "chatroom"})
    assert status == 404 and answer["error"]["code"] == "no_history"


def test_a_route_with_history_needs_a_plugin_that_owns_its_groups(start_daemon, cli):
    bad = start_daemon.write_config("""
    [[routes]]
    path = "/echo"
    plugin = "echo"
    history_size = 10
    """)
    out = cli("check-config", str(bad))
    combined = out.stdout + out.stderr
    assert out.returncode != 0 and "routes[0].history_size" in combined and "owns_group" in combined, combined


# ---------------------------------------------------------------------------------------------- Redis
def test_recovery_across_instances_and_across_a_crash(start_daemon, redis):
    toml = chat_toml(broker_section(redis))
    a = start_daemon(toml)
    b = start_daemon(toml)
    alice, _, welcome = login(a.url("/chat"), "alice")
    bob, _, bob_welcome = login(b.url("/chat"), "bob")
    assert bob_welcome["epoch"] == welcome["epoch"]
    assert sorted(bob_welcome["members"]) == ["alice", "bob"]  # alice is on A
    joined = recv_json(alice)
    assert joined["type"] == "joined" and joined["name"] == "bob"
    seen = joined["offset"]
    alice.close()
    left = recv_json(bob)
    assert left["type"] == "left" and left["name"] == "alice"
    missed = [left, say(bob, "one"), say(bob, "two")]
    alice, replay, again = login(a.url("/chat"), "alice", since={"epoch": welcome["epoch"], "offset": seen})
    assert replay == missed and again["recovered"] is True and again["offset"] == missed[-1]["offset"]
    mark = again["offset"]
    alice.close()
    recv_json(bob)  # left

    # kill -9 A while alice is away; bob says two more on B; A comes back: the history is in Redis.
    a.kill()
    said = [say(bob, "during the crash 1"), say(bob, "during the crash 2")]
    a2 = start_daemon(toml)
    alice, replay, again = login(a2.url("/chat"), "alice", since={"epoch": welcome["epoch"], "offset": mark})
    assert [m for m in replay if m["type"] == "said"] == said and again["recovered"] is True
    assert metric(a2.port, 'selectws_recoveries_total{result="ok"}') == 1
    alice.close()
    bob.close()


def test_messages_published_during_a_replay_arrive_after_it_once_each(start_daemon, redis):
    """A flood on B while alice recovers on A: what she receives is every offset from hers on, consecutive,
    none twice, none missing."""
    toml = chat_toml(broker_section(redis), size=5000)
    a = start_daemon(toml)
    b = start_daemon(toml)
    bob, _, welcome = login(b.url("/chat"), "bob")
    for i in range(300):
        bob.send(json.dumps({"type": "say", "text": f"before {i}"}))
    start = 0
    alice = None
    for i in range(600):
        bob.send(json.dumps({"type": "say", "text": f"flood {i}"}))
        if i == 100:  # alice comes back in the middle of the flood
            alice = connect(a.url("/chat"))
            alice.send(json.dumps({"type": "login", "name": "alice", "since": {"epoch": welcome["epoch"],
                                                                               "offset": start}}))
    assert alice is not None
    bob.send(json.dumps({"type": "say", "text": "the end"}))
    offsets = []
    recovered = None
    done = False
    while recovered is None or not done:  # "the end" may come in the replay (before welcome) or live (after)
        message = recv_json(alice)
        if message.get("type") == "welcome":
            recovered = message["recovered"]
            continue
        offsets.append(message["offset"])
        done = done or message.get("text") == "the end"
    assert recovered is True
    # Bob sees the offset of alice's own "joined", the one room message that is not hers (exclude=session); it
    # may come after "the end".
    hers = end = None
    while hers is None or end is None:
        message = recv_json(bob)
        if message.get("type") == "joined" and message.get("name") == "alice":
            hers = message["offset"]
        if message.get("text") == "the end":
            end = message["offset"]
    assert offsets[-1] == end
    assert offsets == [o for o in range(start + 1, end + 1) if o != hers], "a gap, a duplicate or a reordering"
    # bob's own joined (offset 1, to nobody), 300 before, 600 during, the end, and alice's joined if it came first.
    assert end == 1 + 300 + 600 + 1 + (1 if hers < end else 0)
    alice.close()
    bob.close()


def test_presence_spans_instances_and_a_dead_instance_leaves_within_20_s(start_daemon, redis):
    """The default heartbeat (5 s): an instance killed with -9 is gone after three missed heartbeats."""
    toml = chat_toml(broker_section(redis))
    a = start_daemon(toml)
    b = start_daemon(toml)
    alice, _, _ = login(a.url("/chat"), "alice")
    bob, _, welcome = login(b.url("/chat"), "bob")
    assert sorted(welcome["members"]) == ["alice", "bob"]
    recv_json(alice)  # bob joined
    # A second "alice" on B is refused: the name is taken on A.
    with connect(b.url("/chat")) as imposter:
        imposter.send(json.dumps({"type": "login", "name": "alice"}))
        assert recv_json(imposter) == {"type": "error", "reason": "name 'alice' is already taken in room 'lobby'"}
    # The API on either instance lists both, with their instance ids.
    status, answer = api(b.port, "presence", {"group": "chat:lobby"})
    assert status == 200 and answer["result"]["scope"] == "cluster"
    names = sorted((m["info"]["name"], m["instance"]) for m in answer["result"]["members"])
    a_id = a.logs(event="listening")[0]["instance"]
    b_id = b.logs(event="listening")[0]["instance"]
    assert names == [("alice", a_id), ("bob", b_id)]
    killed_at = time.monotonic()
    a.kill()
    left = recv_json(bob, timeout=25)
    elapsed = time.monotonic() - killed_at
    assert left["type"] == "left" and left["name"] == "alice" and isinstance(left["offset"], int)
    assert elapsed < 20, f"left after {elapsed:.1f} s"
    status, answer = api(b.port, "presence", {"group": "chat:lobby"})
    assert [m["info"]["name"] for m in answer["result"]["members"]] == ["bob"]
    bob.close()


def test_api_presence_asks_the_instances_of_a_group_it_does_not_follow(start_daemon, redis):
    toml = chat_toml(broker_section(redis, "presence_heartbeat = 0.5"))
    a = start_daemon(toml)
    b = start_daemon(toml)
    c = start_daemon(toml)
    alice, _, _ = login(a.url("/chat"), "alice", room="r")
    bob, _, _ = login(b.url("/chat"), "bob", room="r")
    recv_json(alice)
    status, answer = api(c.port, "presence", {"group": "chat:r"})  # C has nobody in the room
    assert status == 200 and sorted(m["info"]["name"] for m in answer["result"]["members"]) == ["alice", "bob"]
    # A graceful stop says goodbye: B drops A's members at once (no heartbeat timeout), and bob hears "left".
    a.signal(signal.SIGTERM)
    left = recv_json(bob, timeout=5)
    assert left["type"] == "left" and left["name"] == "alice"
    assert a.wait() == 0
    bob.close()


def test_occupied_and_vacated_webhooks_follow_the_whole_cluster(start_daemon, redis, tmp_path):
    """alice on A, then bob on B: one "occupied" (from A); bob leaves: no "vacated" (alice is still there, on A);
    alice leaves: "vacated", from A."""
    pytest.importorskip("h11")
    from test_webhooks import Receiver, hook_config

    receiver = Receiver()
    try:
        hooks = hook_config(tmp_path, receiver.port, ["occupied", "vacated"], batch_interval=0.05)
        toml = chat_toml(broker_section(redis), extra=hooks)
        a = start_daemon(toml)
        b = start_daemon(toml)
        a_id = a.logs(event="listening")[0]["instance"]
        alice, _, _ = login(a.url("/chat"), "alice", room="w")
        receiver.wait_for(lambda events: len(events) >= 1)
        bob, _, welcome = login(b.url("/chat"), "bob", room="w")
        assert sorted(welcome["members"]) == ["alice", "bob"]
        bob.close()
        recv_json(alice)  # bob joined
        left = recv_json(alice)
        assert left["type"] == "left" and left["name"] == "bob"
        alice.close()
        receiver.wait_for(lambda events: any(e["event"] == "vacated" for e in events))
        time.sleep(0.3)  # a stray event from B would be batched within 0.05 s
        events = [(e["event"], e["group"], e["session"].partition(".")[0]) for e in receiver.events()]
        assert events == [("occupied", "chat:w", a_id), ("vacated", "chat:w", a_id)]
    finally:
        receiver.close()
