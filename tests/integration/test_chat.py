"""``/chat``: the JSON chat flow (login, welcome, joined, say, said, left) and every error answer."""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Any

import pytest
from wstools import connect

TIMEOUT = 10.0


class Chatter:
    def __init__(self, stack: ExitStack, daemon, **kwargs: Any) -> None:
        self.ws = stack.enter_context(connect(daemon.url("/chat"), **kwargs))

    def send(self, obj: Any) -> None:
        self.ws.send(obj if isinstance(obj, str | bytes) else json.dumps(obj))

    def recv(self) -> dict[str, Any]:
        raw = self.ws.recv(timeout=TIMEOUT)
        assert isinstance(raw, str), "the chat answers in text frames"
        obj = json.loads(raw)
        assert isinstance(obj, dict)
        return obj

    def login(self, name: str, room: str | None = None) -> dict[str, Any]:
        msg = {"type": "login", "name": name}
        if room is not None:
            msg["room"] = room
        self.send(msg)
        welcome = self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    def error(self, obj: Any) -> str:
        """Send ``obj``, expect an error answer; return its reason."""
        self.send(obj)
        answer = self.recv()
        assert answer["type"] == "error", answer
        assert isinstance(answer["reason"], str) and answer["reason"]
        return answer["reason"]


@pytest.fixture
def stack():
    with ExitStack() as s:
        yield s


def test_full_flow(daemon, stack):
    alice = Chatter(stack, daemon)
    assert alice.login("alice") == {"type": "welcome", "name": "alice", "room": "lobby", "members": ["alice"]}

    bob = Chatter(stack, daemon, compression=None)
    assert bob.login("bob") == {"type": "welcome", "name": "bob", "room": "lobby", "members": ["alice", "bob"]}
    assert alice.recv() == {"type": "joined", "name": "bob"}

    bob.send({"type": "say", "text": "hi alice ✓"})
    said = {"type": "said", "from": "bob", "text": "hi alice ✓"}
    assert bob.recv() == said, "the sender gets its own 'said' too"
    assert alice.recv() == said

    alice.send({"type": "say", "text": ""})  # an empty text is an error, not a message
    assert alice.recv()["type"] == "error"
    alice.send({"type": "say", "text": "bye bob"})
    assert alice.recv() == bob.recv() == {"type": "said", "from": "alice", "text": "bye bob"}

    bob.ws.close()
    assert alice.recv() == {"type": "left", "name": "bob"}

    # Bob's name is free again once he has gone.
    bob2 = Chatter(stack, daemon)
    assert bob2.login("bob")["members"] == ["alice", "bob"]
    assert alice.recv() == {"type": "joined", "name": "bob"}


def test_rooms_are_separate(daemon, stack):
    a = Chatter(stack, daemon)
    b = Chatter(stack, daemon)
    c = Chatter(stack, daemon)
    assert a.login("ann", room="r1")["members"] == ["ann"]
    assert b.login("ann", room="r2")["members"] == ["ann"], "a name is only unique within its room"
    assert c.login("cid", room="r1")["members"] == ["ann", "cid"]
    assert a.recv() == {"type": "joined", "name": "cid"}
    b.send({"type": "say", "text": "in r2"})
    assert b.recv() == {"type": "said", "from": "ann", "text": "in r2"}
    c.send({"type": "say", "text": "in r1"})
    assert a.recv() == {"type": "said", "from": "cid", "text": "in r1"}
    assert c.recv() == {"type": "said", "from": "cid", "text": "in r1"}
    # b saw nothing of r1: its next message is its own.
    b.send({"type": "say", "text": "still r2"})
    assert b.recv() == {"type": "said", "from": "ann", "text": "still r2"}


def test_a_connection_that_never_logged_in_leaves_silently(daemon, stack):
    alice = Chatter(stack, daemon)
    alice.login("alice-silent", room="silent")
    lurker = connect(daemon.url("/chat"))
    lurker.close()
    alice.send({"type": "say", "text": "anyone?"})
    assert alice.recv() == {"type": "said", "from": "alice-silent", "text": "anyone?"}, "no 'left' for a lurker"


ERRORS = [
    ("not json at all", "invalid JSON"),
    ("[1, 2, 3]", "JSON object"),
    ('"a string"', "JSON object"),
    ({"no": "type"}, "type"),
    ({"type": 42}, "type"),
    ({"type": "dance"}, "unknown message type"),
    ({"type": "say", "text": "too early"}, "log in"),
    ({"type": "login"}, "name"),
    ({"type": "login", "name": 7}, "name"),
    ({"type": "login", "name": "   "}, "name"),
    ({"type": "login", "name": "n" * 33}, "32"),
    ({"type": "login", "name": "ok", "room": 5}, "room"),
    ({"type": "login", "name": "ok", "room": "r" * 65}, "64"),
    (b'{"type": "login", "name": "bin"}', "binary"),
]


@pytest.mark.parametrize("message,reason_part", ERRORS, ids=[f"e{i}" for i in range(len(ERRORS))])
def test_errors_before_login_keep_the_connection_open(daemon, stack, message, reason_part):
    c = Chatter(stack, daemon)
    reason = c.error(message)
    assert reason_part.lower() in reason.lower()
    # Still open, still not logged in: a valid login works now.
    assert c.login("after-error-" + str(id(c)))["type"] == "welcome"


def test_errors_after_login_keep_the_connection_open(daemon, stack):
    alice = Chatter(stack, daemon)
    alice.login("alice", room="errors")
    other = Chatter(stack, daemon)

    assert "taken" in other.error({"type": "login", "name": "alice", "room": "errors"})
    assert "taken" in other.error({"type": "login", "name": " alice ", "room": "errors"}), "names are stripped"
    assert "already" in alice.error({"type": "login", "name": "again"})
    assert "text" in alice.error({"type": "say"})
    assert "text" in alice.error({"type": "say", "text": ["not", "a", "string"]})
    assert "4096" in alice.error({"type": "say", "text": "t" * 4097})
    assert "binary" in alice.error(b"\x00\x01")

    # Limits are inclusive: 32-character names and 4096-character texts are fine.
    welcome = other.login("n" * 32, room="errors")
    assert welcome["members"] == ["alice", "n" * 32]
    assert alice.recv() == {"type": "joined", "name": "n" * 32}
    long_text = "é" * 4096
    alice.send({"type": "say", "text": long_text})
    assert alice.recv() == other.recv() == {"type": "said", "from": "alice", "text": long_text}


def test_many_members_see_each_other_in_join_order(daemon, stack):
    names = [f"user{i}" for i in range(8)]
    chatters = []
    for i, name in enumerate(names):
        c = Chatter(stack, daemon)
        assert c.login(name, room="crowd")["members"] == names[: i + 1]
        for earlier in chatters:
            assert earlier.recv() == {"type": "joined", "name": name}
        chatters.append(c)
    chatters[3].ws.close()
    for i, c in enumerate(chatters):
        if i != 3:
            assert c.recv() == {"type": "left", "name": "user3"}
