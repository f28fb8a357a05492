"""Autobahn|Testsuite client-side testee: selectws's sans-I/O core in the CLIENT role.

It runs against ``wstest -m fuzzingserver`` (see autobahn_client.sh).

The fuzzing server drives the test; the testee only has to follow the suite's client protocol:

1. ``GET /getCaseCount``: a WebSocket connection whose one text message is the number of cases (JSON);
2. for each case N in 1..count: ``/runCase?case=N&agent=AGENT`` and echo every message back with the same type
   until the server closes (pings are answered by the core, the close handshake is completed by the core);
3. ``/updateReports?agent=AGENT``: the server writes ``<outdir>/index.json`` (and the HTML report).

Everything protocol-related is selectws.protocol: a ``handshake.ClientProtocol`` makes the upgrade request
(``connect``, permessage-deflate offered), judges the answer (OPEN with the negotiated extension, or CLOSED with
``handshake_error``) and then turns frames into events, in the same object. Only sockets and timing are here, by
the core's one driver rule: after every call, write ``data_to_send()`` if ``has_output``; after events are handled,
``receive_data(b"")`` while ``events_held``; stop once ``close_transport`` is set. One case failing (refused
handshake, exception, timeout) is reported on stderr and the run goes on.

    python tests/conformance/autobahn_client.py ws://127.0.0.1:9001 [--agent selectws-client] [--case-timeout 60]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from selectws.protocol.connection import Connection, State
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.events import Closed, Event, Message
from selectws.protocol.handshake import ClientProtocol

_RECV = 256 * 1024
#: 9.1.6 / 9.2.6 send 16 MiB messages; leave room.
MAX_MESSAGE = 64 << 20
#: After the close handshake the client waits this long for the server to close TCP first (RFC 6455 7.1.1).
_LINGER = 2.0


@dataclass
class Outcome:
    """How one WebSocket session ended."""

    ok: bool  # the opening handshake succeeded and the session ended without a local exception / timeout
    detail: str
    messages: int = 0
    compressed: bool = False


class CaseTimeout(Exception):
    pass


def session(
    host: str,
    port: int,
    resource: str,
    timeout: float,
    on_message: Callable[[Connection, Message], None] | None = None,
    settings: DeflateSettings | None = None,
) -> Outcome:
    """One WebSocket connection: handshake, then feed the core until the close handshake (or EOF) is over."""
    settings = settings or DeflateSettings()
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CaseTimeout
        return left

    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host_header = host if port == 80 else f"{host}:{port}"
        conn = ClientProtocol(max_message_size=MAX_MESSAGE)
        conn.send_request(conn.connect(host_header, resource, deflate=settings))
        outcome = Outcome(True, "")
        closed: Closed | None = None

        def flush() -> None:
            if conn.has_output:  # the request, answers, echoes, a close reply or failure frame, in order
                sock.settimeout(remaining())
                sock.sendall(conn.data_to_send())

        def handle(events: list[Event]) -> None:
            nonlocal closed
            while True:
                for event in events:
                    if type(event) is Message:
                        outcome.messages += 1
                        if on_message is not None:
                            on_message(conn, event)
                    elif type(event) is Closed:
                        closed = event
                flush()
                if not conn.events_held:
                    return
                events = conn.receive_data(b"")  # a close or a violation held back behind those messages

        flush()
        events: list[Event] = []
        while conn.state is State.CONNECTING:
            sock.settimeout(remaining())
            chunk = sock.recv(65536)
            if not chunk:
                conn.receive_eof()
                return Outcome(False, "server closed the connection during the handshake")
            events = conn.receive_data(chunk)
        if conn.handshake_error is not None:
            return Outcome(False, f"handshake failed: {conn.handshake_error.reason}")
        outcome.compressed = conn.extension is not None
        handle(events[1:])  # events[0] is the 101; frames that came with it follow
        eof = False
        while not conn.close_transport:
            sock.settimeout(remaining())
            try:
                data = sock.recv(_RECV)
            except ConnectionResetError:
                data = b""
            eof = not data
            handle(conn.receive_eof() if eof else conn.receive_data(data))
        # The handshake is over (or the connection failed): let the server close TCP first, briefly.
        linger_end = min(deadline, time.monotonic() + _LINGER)
        while not eof and time.monotonic() < linger_end:
            sock.settimeout(max(0.01, linger_end - time.monotonic()))
            try:
                eof = not sock.recv(_RECV)
            except (TimeoutError, OSError):
                break
        assert closed is not None
        who = "server" if closed.by_peer else "client"
        outcome.detail = f"closed by {who} with {closed.code}" + (f" ({closed.error})" if closed.error else "")
        if conn.state is not State.CLOSED:  # pragma: no cover - close_transport implies CLOSED
            outcome.ok = False
        return outcome
    except CaseTimeout:
        return Outcome(False, f"timed out after {timeout:g} s")
    except TimeoutError:
        return Outcome(False, f"socket timed out (limit {timeout:g} s)")
    except OSError as exc:
        return Outcome(False, f"socket error: {exc}")
    finally:
        sock.close()


def echo(conn: Connection, message: Message) -> None:
    conn.send_message(message.data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the fuzzing server, e.g. ws://127.0.0.1:9001")
    ap.add_argument("--agent", default="selectws-client")
    ap.add_argument("--case-timeout", type=float, default=60.0, help="seconds per case (default 60)")
    ap.add_argument("--first", type=int, default=1, help="first case number (1-based)")
    ap.add_argument("--last", type=int, default=0, help="last case number (default: all)")
    args = ap.parse_args(argv)
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    agent = quote(args.agent, safe="")

    got: list[str | bytes] = []
    res = session(host, port, "/getCaseCount", 10.0, lambda _c, m: got.append(m.data))
    if not res.ok or not got:
        print(f"autobahn-client: /getCaseCount failed: {res.detail or 'no message'}", file=sys.stderr)
        return 2
    count = int(json.loads(got[0]))
    last = min(count, args.last) if args.last else count
    print(f"autobahn-client: {count} cases on the server, running {args.first}..{last}", file=sys.stderr)

    t0 = time.monotonic()
    problems = 0
    for n in range(args.first, last + 1):
        started = time.monotonic()
        try:
            res = session(host, port, f"/runCase?case={n}&agent={agent}", args.case_timeout, echo)
        except Exception as exc:  # one case must never stop the run
            res = Outcome(False, f"driver exception {type(exc).__name__}: {exc}")
        took = time.monotonic() - started
        if not res.ok:
            problems += 1
        if not res.ok or took > 5:
            print(
                f"autobahn-client: case {n}: {'ok' if res.ok else 'PROBLEM'} {res.detail}, {res.messages} messages, "
                f"{took:.1f} s{' (deflate)' if res.compressed else ''}",
                file=sys.stderr,
            )
    print(f"autobahn-client: ran {last - args.first + 1} cases in {time.monotonic() - t0:.1f} s, "
          f"{problems} with driver-level problems", file=sys.stderr)

    res = session(host, port, f"/updateReports?agent={agent}", 120.0)
    if not res.ok:
        print(f"autobahn-client: /updateReports failed: {res.detail}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
