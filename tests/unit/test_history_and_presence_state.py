"""The values behind history and presence, without sockets: the memory broker's history store, what counts as a
complete read, ``?since=`` parsing, and the cluster view's deltas, snapshots and expiry."""

from __future__ import annotations

import pytest

from selectws.server.history import HistoryPolicy, HistoryResult, MemoryHistory, Position, parse_since
from selectws.server.presence import MAX_INFO_BYTES, ClusterView, Member, check_info


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_offsets_grow_by_one_and_the_deque_keeps_history_size():
    store = MemoryHistory(Clock())
    policy = HistoryPolicy(size=3, ttl=60)
    offsets = [store.append("g", policy, f"m{i}")[0] for i in range(5)]
    assert offsets == [1, 2, 3, 4, 5]
    result = store.read("g", policy, 1, 10)
    assert result.offset == 5 and result.messages == [(3, "m2"), (4, "m3"), (5, "m4")]
    assert not result.complete_since(1)  # offset 2 was trimmed
    assert store.read("g", policy, 2, 10).complete_since(2)
    assert store.read("g", policy, 5, 10).messages == [] and store.read("g", policy, 5, 10).complete_since(5)
    cut = store.read("g", policy, 2, 2)
    assert cut.messages == [(3, "m2"), (4, "m3")] and not cut.complete_since(2)  # the limit cut it


def test_each_group_has_its_own_epoch_and_a_read_gives_a_position_before_any_message():
    store = MemoryHistory(Clock())
    policy = HistoryPolicy(10, 60)
    first = store.read("a", policy, None, 10)
    assert first.offset == 0 and first.messages == [] and first.epoch
    assert store.append("a", policy, "x") == (1, first.epoch)  # the same epoch: nothing was lost
    assert store.read("b", policy, None, 10).epoch != first.epoch


def test_a_quiet_group_expires_and_starts_again_with_a_new_epoch():
    clock = Clock()
    store = MemoryHistory(clock)
    policy = HistoryPolicy(10, 5)
    _, epoch = store.append("g", policy, "old")
    clock.now += 4
    store.read("g", policy, 0, 10)  # a read does not extend the life of a history
    clock.now += 2
    offset, again = store.append("g", policy, "new")
    assert offset == 1 and again != epoch
    for i in range(40):  # expired groups are dropped as others are used
        store.append(f"other{i}", policy, "x")
    clock.now += 6
    store.append("last", policy, "x")
    assert len(store) == 41 - 16 + 1  # at most 16 dropped per call: bounded work
    store.append("last", policy, "y")
    store.append("last", policy, "z")
    assert len(store) == 1


def test_complete_since_rules():
    r = HistoryResult("e", 7, [(5, "a"), (6, "b"), (7, "c")])
    assert r.complete_since(4) and not r.complete_since(3) and r.complete_since(7)
    assert not r.complete_since(8) and not r.complete_since(-1)
    assert not HistoryResult("", 0, error="down").complete_since(0)


@pytest.mark.parametrize(("text", "expected"), [
    ("1f3a9c0d:41", Position("1f3a9c0d", 41)),
    ("a:b:0", Position("a:b", 0)),
    ("e:", None), (":3", None), ("e:-1", None), ("e:1x", None), ("nocolon", None), ("e:" + "9" * 19, None),
    ("x" * 65 + ":1", None),
])
def test_parse_since(text, expected):
    assert parse_since(text) == expected


def test_cluster_view_deltas_snapshots_and_expiry():
    view = ClusterView()
    alice = Member("A.1", "A", None, {"name": "alice"})
    bob = Member("B.1", "B", "bob", {"name": "bob"})
    view.join("room", alice, now=0.0)
    view.join("room", bob, now=0.0)
    assert view.members("room") == [alice, bob] and view.instances("room") == {"A", "B"}
    # A snapshot replaces what an instance had, and says who is no longer there.
    carol = Member("A.2", "A", None, {"name": "carol"})
    assert view.snapshot("room", "A", [carol], now=1.0) == [alice]
    assert view.members("room") == [bob, carol]
    assert view.leave("room", "B.1") == bob
    # An instance not heard from for the timeout is dropped, with its members, by group.
    view.join("other", Member("A.3", "A"), now=1.0)
    view.heard("B", 9.0)
    removed = view.expire(now=12.0, timeout=10.0)
    assert set(removed) == {"room", "other"} and removed["room"] == [carol]
    assert view.members("room") == [] and "A" not in view.last_seen and "B" in view.last_seen
    # After a stall nobody is expired: everyone gets a fresh window.
    view.heard("C", 0.0)
    view.refresh(100.0)
    assert view.expire(now=105.0, timeout=10.0) == {}


def test_presence_info_must_be_small_json():
    assert check_info({"name": "alice", "n": 1}) == {"name": "alice", "n": 1}
    assert check_info(None) == {}
    with pytest.raises(ValueError, match="JSON"):
        check_info({"x": object()})
    with pytest.raises(ValueError, match=str(MAX_INFO_BYTES)):
        check_info({"x": "y" * MAX_INFO_BYTES})
    with pytest.raises(ValueError):
        Member.from_wire("A", ["s", 3, {}])
    assert Member.from_wire("A", ["A.1", None, {"name": "a"}]) == Member("A.1", "A", None, {"name": "a"})


def test_a_hold_that_outgrows_its_limit_closes_the_member_with_1013_instead_of_growing():
    """While a member's history is read (here: never answered), live messages wait for it, but at most HOLD_MAX;
    past that the member is closed with 1013 and memory stays bounded."""
    import struct

    from harness import in_process_server

    from selectws.server.server import HOLD_MAX

    settings = {"routes": [{"path": "/news/{channel}", "plugin": "broadcast", "history_size": 10,
                            "options": {"envelope": True}}]}
    with in_process_server(settings) as harness:
        server = harness.server
        pending = []
        server.broker.history = lambda group, policy, since, limit, callback: pending.append(callback)
        sock = harness.connect("/news/x?since=abc:0")
        harness.step()
        assert len(pending) == 1  # the read is outstanding: the member is held
        for i in range(HOLD_MAX):
            server.broadcast("broadcast:x", f"m{i}")
        assert server.stats().recoveries.get("overrun", 0) == 0
        server.broadcast("broadcast:x", "one too many")
        assert server.stats().recoveries["overrun"] == 1
        data = harness.recv(sock, 4)
        assert data[0] == 0x88  # a close frame, the first thing this client receives
        assert struct.unpack("!H", data[2:4])[0] == 1013
        sock.close()
