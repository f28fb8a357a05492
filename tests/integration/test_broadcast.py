"""``/broadcast/{channel}``: fan-out to every other member, verbatim, same opcode, in order, per channel."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from wstools import connect

TIMEOUT = 10.0


def _nothing_arrived(marker_from, *clients) -> None:
    """Nothing is waiting for ``clients``: a marker broadcast now (by ``marker_from``, another member of their
    channel) must be the next thing each receives. The server handles everything on one thread in arrival order,
    so anything wrongly delivered before would be queued ahead of the marker; no sleeping involved."""
    marker = f"marker {id(marker_from)}"
    marker_from.send(marker)
    for ws in clients:
        got = ws.recv(timeout=TIMEOUT)
        assert got == marker, f"unexpected message {got!r:.200}"


def _message(i: int) -> str | bytes:
    """Numbered messages, alternating text (non-ASCII) and binary, of varied sizes (some over 125 / 64 KiB)."""
    if i % 2:
        return f"#{i} héllo ✓ " + "t" * (i * 37 % 300)
    return i.to_bytes(4, "big") + bytes([i % 256]) * (i * 997 % 70000)


@pytest.mark.parametrize("compression", [None, "deflate", "mixed"])
def test_fan_out_verbatim_in_order_never_to_sender(daemon, compression):
    with ExitStack() as stack:
        clients = []
        for i in range(4):
            comp = ("deflate" if i % 2 else None) if compression == "mixed" else compression
            clients.append(stack.enter_context(connect(daemon.url("/broadcast/room1"), compression=comp,
                                                       max_size=None)))
        other_room = stack.enter_context(connect(daemon.url("/broadcast/room2"), compression=compression and "deflate"))
        other_room_peer = stack.enter_context(connect(daemon.url("/broadcast/room2")))
        sender, receivers = clients[0], clients[1:]

        sent = [_message(i) for i in range(100)]
        for m in sent:
            sender.send(m)
        for r in receivers:
            for i, expected in enumerate(sent):
                got = r.recv(timeout=TIMEOUT)
                assert type(got) is type(expected), f"message {i}: opcode changed"
                assert got == expected, f"message {i} altered or out of order"
        _nothing_arrived(receivers[0], sender, *receivers[1:])
        _nothing_arrived(sender, *receivers)
        _nothing_arrived(other_room_peer, other_room)


def test_every_member_can_send_and_channels_are_isolated(daemon):
    with ExitStack() as stack:
        room1 = [stack.enter_context(connect(daemon.url("/broadcast/room1"))) for _ in range(3)]
        room2 = [stack.enter_context(connect(daemon.url("/broadcast/room2"))) for _ in range(2)]
        for i, ws in enumerate(room1):
            ws.send(f"room1 from {i}")
        for i, ws in enumerate(room2):
            ws.send(f"room2 from {i}".encode())
        for i, ws in enumerate(room1):
            got = sorted(ws.recv(timeout=TIMEOUT) for _ in range(2))
            assert got == sorted(f"room1 from {j}" for j in range(3) if j != i)
        for i, ws in enumerate(room2):
            assert ws.recv(timeout=TIMEOUT) == f"room2 from {1 - i}".encode()
        _nothing_arrived(room1[0], *room1[1:])
        _nothing_arrived(room1[1], room1[0])
        _nothing_arrived(room2[0], room2[1])
        _nothing_arrived(room2[1], room2[0])


def test_a_member_that_left_gets_nothing_and_the_rest_carry_on(daemon):
    with connect(daemon.url("/broadcast/leave")) as a, connect(daemon.url("/broadcast/leave")) as b:
        c = connect(daemon.url("/broadcast/leave"))
        c.send("from c")
        assert a.recv(timeout=TIMEOUT) == "from c"
        assert b.recv(timeout=TIMEOUT) == "from c"
        c.close()
        daemon.wait_for(lambda r: r.get("path") == "/broadcast/leave" and r.get("code") == 1000, event="close")
        a.send("after c left")
        assert b.recv(timeout=TIMEOUT) == "after c left"
        _nothing_arrived(b, a)


def test_channel_names_are_path_parameters(daemon):
    """Percent-decoded path segments name the channel; a different segment is a different channel."""
    with connect(daemon.url("/broadcast/caf%C3%A9")) as a, connect(daemon.url("/broadcast/café")) as b, \
            connect(daemon.url("/broadcast/cafe")) as c, connect(daemon.url("/broadcast/cafe")) as d:
        a.send("same room")
        assert b.recv(timeout=TIMEOUT) == "same room"
        _nothing_arrived(d, c)
