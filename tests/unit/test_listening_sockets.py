"""selectws.transport.listen: binding every address of a host, and how addresses are written."""

from __future__ import annotations

import socket

import pytest

from selectws.transport.listen import bind_listeners, format_address


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_one_listening_socket_per_address() -> None:
    socks = bind_listeners("127.0.0.1", 0, 7)
    try:
        assert len(socks) == 1
        sock = socks[0]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        for s in socks:
            s.close()


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 on this machine")
def test_wildcard_with_port_0_binds_every_family_to_the_same_port() -> None:
    socks = bind_listeners("", 0, 7)
    try:
        families = {s.family for s in socks}
        assert families == {socket.AF_INET, socket.AF_INET6}
        assert len({s.getsockname()[1] for s in socks}) == 1
        v6 = next(s for s in socks if s.family == socket.AF_INET6)
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in socks:
            s.close()


def test_a_busy_port_raises_and_leaks_nothing() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError):
            bind_listeners("127.0.0.1", port, 7)


@pytest.mark.parametrize(("addr", "text"), [
    (("127.0.0.1", 8000), "127.0.0.1:8000"),
    (("0.0.0.0", 1), "0.0.0.0:1"),
    (("::", 8000, 0, 0), "[::]:8000"),
    (("::1", 9100), "[::1]:9100"),
])
def test_format_address(addr: tuple[object, ...], text: str) -> None:
    assert format_address(addr) == text
