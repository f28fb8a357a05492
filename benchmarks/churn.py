"""Churn WebSocket connections against a running daemon: connect, one message, close, many times over.

    python benchmarks/churn.py --port PORT [--path /echo] [--conns 10000] [--deflate-fraction 0.5]
                               [--concurrency 200] [--timeout 120] [--pid DAEMON_PID] [--json]

Each connection: TCP connect, the upgrade request (a ``--deflate-fraction`` share of them, spread evenly, offer
``permessage-deflate; client_max_window_bits``), the 101 (its ``Sec-WebSocket-Accept`` checked), one masked text
message, its echo (one whole frame; a compressed echo is inflated and compared too), a masked close frame (1000),
the server's close frame, then the socket is closed. At most ``--concurrency`` connections are in flight; the
whole run stops at ``--timeout`` seconds and any connection not done by then is a failure, as is one that takes more
than ``--conn-timeout`` seconds or sees anything unexpected. With ``--pid`` the daemon's VmRSS (/proc/PID/status)
is read before the churn, right after it, and one second later.

Standard library only: non-blocking sockets driven by one ``selectors`` loop, nothing of selectws imported. Prints
a summary (or, with ``--json``, one JSON line) and exits 1 if any connection failed.
"""

from __future__ import annotations

import argparse
import base64
import collections
import errno
import hashlib
import json
import os
import selectors
import socket
import struct
import sys
import time
import zlib
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16384


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    if n:
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return head + mask + payload


def parse_frame(buf: bytearray) -> tuple[int, int, bytes, int] | None:
    """(first byte, opcode, payload, bytes used) of one whole server frame at the start of ``buf``, or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    if b1 & 0x80:
        raise ValueError("masked frame from the server")
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack_from("!H", buf, 2)[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack_from("!Q", buf, 2)[0]
        pos = 10
    if len(buf) < pos + n:
        return None
    return b0, b0 & 0x0F, bytes(buf[pos:pos + n]), pos + n


# Steps of one connection, in order.
CONNECT, HANDSHAKE, ECHO, CLOSING, DONE = range(5)
STEP_NAMES = {CONNECT: "connect", HANDSHAKE: "handshake", ECHO: "echo", CLOSING: "close"}


class Churn:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.started = 0
        self.completed = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.deflate_offered = 0
        self.deflate_accepted = 0
        self.compressed_echoes = 0
        self.host_header = f"127.0.0.1:{args.port}".encode()

    # ------------------------------------------------------------------ one connection
    def wants_deflate(self, i: int) -> bool:
        """Spread the deflate offers evenly: connection i offers when the running share falls behind."""
        frac = self.args.deflate_fraction
        return int((i + 1) * frac) > int(i * frac)

    def start(self) -> None:
        i = self.started
        self.started += 1
        deflate = self.wants_deflate(i)
        if deflate:
            self.deflate_offered += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        conn: dict[str, Any] = {
            "i": i, "sock": sock, "step": CONNECT, "deflate": deflate, "negotiated": False, "key": key,
            "rbuf": bytearray(), "wbuf": b"", "deadline": time.monotonic() + self.args.conn_timeout,
            "message": f"churn message {i} ".encode() * 4,
        }
        err = sock.connect_ex(("127.0.0.1", self.args.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failures[f"connect: {errno.errorcode.get(err, err)}"] += 1
            return
        self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def fail(self, conn: dict[str, Any], why: str) -> None:
        self.failures[f"{STEP_NAMES.get(conn['step'], '?')}: {why}"] += 1
        self.finish(conn)

    def finish(self, conn: dict[str, Any]) -> None:
        sock = conn["sock"]
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        conn["step"] = DONE

    def queue(self, conn: dict[str, Any], data: bytes) -> None:
        """Send ``data`` now as far as the socket takes it; wait for writability for the rest."""
        data = conn["wbuf"] + data
        try:
            sent = conn["sock"].send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        conn["wbuf"] = data[sent:]
        self.sel.modify(conn["sock"], selectors.EVENT_READ | (selectors.EVENT_WRITE if conn["wbuf"] else 0), conn)

    def on_event(self, conn: dict[str, Any], mask: int) -> None:
        sock = conn["sock"]
        if conn["step"] == CONNECT:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, errno.errorcode.get(err, str(err)))
                return
            conn["step"] = HANDSHAKE
            lines = [
                b"GET " + self.args.path.encode() + b" HTTP/1.1",
                b"Host: " + self.host_header,
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                b"Sec-WebSocket-Key: " + conn["key"],
                b"Sec-WebSocket-Version: 13",
            ]
            if conn["deflate"]:
                lines.append(b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
            self.queue(conn, b"\r\n".join(lines) + b"\r\n\r\n")
            return
        if mask & selectors.EVENT_WRITE and conn["wbuf"]:
            self.queue(conn, b"")
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(conn, errno.errorcode.get(exc.errno or 0, str(exc)))
            return
        if not data:
            self.fail(conn, "connection closed by the server")
            return
        conn["rbuf"] += data
        try:
            self.advance(conn)
        except ValueError as exc:
            self.fail(conn, str(exc))

    def advance(self, conn: dict[str, Any]) -> None:
        rbuf: bytearray = conn["rbuf"]
        if conn["step"] == HANDSHAKE:
            end = rbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(rbuf) > MAX_HEAD:
                    raise ValueError("response head too long")
                return
            head = bytes(rbuf[:end]).decode("latin-1").split("\r\n")
            del rbuf[:end + 4]
            status = head[0].split(" ", 2)
            if len(status) < 2 or status[1] != "101":
                raise ValueError(f"status {head[0]!r}")
            headers: dict[str, list[str]] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            expected = base64.b64encode(hashlib.sha1(conn["key"] + GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != [expected]:
                raise ValueError("bad Sec-WebSocket-Accept")
            extensions = ",".join(headers.get("sec-websocket-extensions", []))
            if "permessage-deflate" in extensions:
                if not conn["deflate"]:
                    raise ValueError("permessage-deflate accepted but not offered")
                conn["negotiated"] = True
                self.deflate_accepted += 1
            conn["step"] = ECHO
            self.queue(conn, masked_frame(0x1, conn["message"]))
        while conn["step"] in (ECHO, CLOSING):
            frame = parse_frame(rbuf)
            if frame is None:
                return
            b0, opcode, payload, used = frame
            del rbuf[:used]
            if opcode in (0x9, 0xA):  # a ping or pong: not part of the exchange
                continue
            if conn["step"] == ECHO:
                if opcode != 0x1 or not b0 & 0x80:
                    raise ValueError(f"expected a whole text frame, got opcode {opcode} first byte {b0:#x}")
                if b0 & 0x40:
                    if not conn["negotiated"]:
                        raise ValueError("compressed frame without permessage-deflate")
                    payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
                    self.compressed_echoes += 1
                if payload != conn["message"]:
                    raise ValueError("echo differs from the message")
                conn["step"] = CLOSING
                self.queue(conn, masked_frame(0x8, struct.pack("!H", 1000)))
            else:
                if opcode != 0x8:
                    raise ValueError(f"expected a close frame, got opcode {opcode}")
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                if code != 1000:
                    raise ValueError(f"close code {code}")
                self.completed += 1
                self.finish(conn)

    # ------------------------------------------------------------------ the run
    def run(self) -> float:
        args = self.args
        start = time.monotonic()
        deadline = start + args.timeout
        next_sweep = start + 0.5
        while self.started < args.conns or self.sel.get_map():
            while self.started < args.conns and len(self.sel.get_map()) < args.concurrency:
                self.start()
            now = time.monotonic()
            if now >= deadline:
                break
            for key, mask in self.sel.select(min(0.5, deadline - now)):
                conn = key.data
                if conn["step"] != DONE:
                    try:
                        self.on_event(conn, mask)
                    except OSError as exc:
                        self.fail(conn, errno.errorcode.get(exc.errno or 0, str(exc)))
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.5
                for key in list(self.sel.get_map().values()):
                    if key.data["deadline"] < now:
                        self.fail(key.data, f"no progress in {args.conn_timeout}s")
        for key in list(self.sel.get_map().values()):
            self.fail(key.data, f"still in flight at --timeout {args.timeout}s")
        not_started = args.conns - self.started
        if not_started:
            self.failures[f"not started before --timeout {args.timeout}s"] += not_started
        self.sel.close()
        return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/echo")
    parser.add_argument("--conns", type=int, default=10000)
    parser.add_argument("--deflate-fraction", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0, help="the whole run, seconds")
    parser.add_argument("--conn-timeout", type=float, default=10.0, help="one connection, seconds")
    parser.add_argument("--pid", type=int, help="the daemon's pid: report its VmRSS before, after and 1 s after")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if not 0.0 <= args.deflate_fraction <= 1.0:
        parser.error("--deflate-fraction must be within 0..1")
    if args.concurrency < 1 or args.conns < 0:
        parser.error("--concurrency must be >= 1 and --conns >= 0")

    rss_before = rss_kib(args.pid) if args.pid else None
    churn = Churn(args)
    seconds = churn.run()
    rss_after = rss_kib(args.pid) if args.pid else None
    rss_after_1s = None
    if args.pid:
        time.sleep(1.0)
        rss_after_1s = rss_kib(args.pid)
    failed = sum(churn.failures.values())
    result = {
        "conns": args.conns, "completed": churn.completed, "failed": failed, "failures": dict(churn.failures),
        "deflate_offered": churn.deflate_offered, "deflate_accepted": churn.deflate_accepted,
        "compressed_echoes": churn.compressed_echoes, "seconds": round(seconds, 3),
        "conns_per_second": round(churn.completed / seconds, 1) if seconds > 0 else None,
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_after_1s_kib": rss_after_1s,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{churn.completed}/{args.conns} connections completed, {failed} failed in {seconds:.2f}s "
              f"({result['conns_per_second']}/s); permessage-deflate offered {churn.deflate_offered}, "
              f"accepted {churn.deflate_accepted}, compressed echoes {churn.compressed_echoes}")
        for why, n in churn.failures.most_common():
            print(f"  {n} x {why}")
        if args.pid:
            print(f"daemon VmRSS: before {rss_before} KiB, right after {rss_after} KiB, 1 s after {rss_after_1s} KiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
