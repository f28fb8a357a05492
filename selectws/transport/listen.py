"""Listening sockets: binding every address of a host, and writing an address the way the logs show it.

Used by the server (its WebSocket and operator listeners) and by the workers supervisor, which binds once and
hands the same sockets to every worker.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["bind_listeners", "format_address"]


def bind_listeners(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening TCP sockets on every address ``host`` resolves to (all interfaces when empty).

    ``SO_REUSEADDR`` on each; IPv6 sockets are v6-only so that the IPv4 and IPv6 wildcards can both be bound.
    With ``port`` 0 the first socket gets an ephemeral port and the others are bound to the same number. If any
    address fails, the sockets bound so far are closed and the :class:`OSError` propagates. The sockets are left
    blocking: the caller makes them non-blocking when it registers them.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    for family, type_, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        if port == 0 and socks:
            # An ephemeral port: the first socket got one; bind the other addresses to the same number.
            addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError:
            sock.close()
            for s in socks:
                s.close()
            raise
        socks.append(sock)
    return socks


def format_address(addr: tuple[Any, ...]) -> str:
    """``host:port``, or ``[v6addr]:port`` for IPv6 (a ``getsockname()`` tuple of any family)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
