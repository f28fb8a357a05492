"""The client's address behind trusted reverse proxies (``[server] trusted_proxies``).

Forwarding headers are only believed when the TCP peer is a trusted proxy: anybody else could write anything
there. The header is then walked from the right (the hop nearest to us) past every address that is itself a
trusted proxy; the first one that is not is the client. ``Forwarded`` (RFC 7239) wins over
``X-Forwarded-For``. A hop we cannot read (``unknown``, an obfuscated ``_name``, garbage) stops the walk: the
last address we could vouch for is used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from selectws.protocol.http11 import Headers

__all__ = ["Networks", "client_address", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(entries: Iterable[str]) -> Networks:
    """``["127.0.0.1", "10.0.0.0/8", "::1"]`` -> networks (validated by the configuration already)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPAddress, networks: Networks) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def _forwarded_for(values: list[str]) -> list[tuple[str, int]]:
    """The ``for=`` node of each element of ``Forwarded`` header values, left to right; ('', 0) if unreadable."""
    nodes: list[tuple[str, int]] = []
    for value in values:
        for element in value.split(","):
            node: tuple[str, int] | None = None
            for pair in element.split(";"):
                name, eq, raw = pair.strip().partition("=")
                if not eq or name.strip().lower() != "for":
                    continue
                raw = raw.strip().strip('"')
                if raw.startswith("["):  # "[2001:db8::1]:4711"
                    host, _, rest = raw[1:].partition("]")
                    port = rest[1:] if rest.startswith(":") else ""
                elif raw.count(":") == 1:  # "192.0.2.43:47011"
                    host, _, port = raw.partition(":")
                else:
                    host, port = raw, ""
                node = (host, int(port) if port.isdigit() and int(port) <= 65535 else 0)
            if node is not None:
                nodes.append(node)
            elif element.strip():
                nodes.append(("", 0))  # an element without for=: a hop we cannot place
    return nodes


def _x_forwarded_for(values: list[str]) -> list[tuple[str, int]]:
    return [(item.strip(), 0) for value in values for item in value.split(",") if item.strip()]


def client_address(peer: tuple[str, int], headers: Headers, networks: Networks) -> tuple[str, int]:
    """The client's ``(address, port)``: ``peer`` itself unless it is a trusted proxy that says otherwise."""
    if not networks:
        return peer
    peer_ip = _ip(peer[0])
    if peer_ip is None or not _trusted(peer_ip, networks):
        return peer
    forwarded = headers.get_all("Forwarded")
    hops = _forwarded_for(forwarded) if forwarded else []
    if not hops:
        hops = _x_forwarded_for(headers.get_all("X-Forwarded-For"))
    result = peer
    for host, port in reversed(hops):
        ip = _ip(host)
        if ip is None:
            break
        result = (str(ip), port)
        if not _trusted(ip, networks):
            break
    return result
