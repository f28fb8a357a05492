"""RSS per idle connection, plain or with permessage-deflate, measured on a real daemon.

    python benchmarks/rss_per_connection.py --conns 2000 [--deflate] [--config FILE]

Starts ``selectws serve`` on an ephemeral loopback port, reads its RSS from /proc, opens ``--conns``
connections to /echo (with ``--deflate`` each offers permessage-deflate and exchanges one compressed message
each way, so both zlib contexts exist if the settings keep them), reads the RSS again and prints the difference
per connection. Uses selectws's own sans-I/O core in the client role.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

from selectws.protocol.connection import CLIENT, Connection
from selectws.protocol.deflate import DeflateSettings, PerMessageDeflate, accept_response, client_offer
from selectws.protocol.handshake import build_client_request, check_accept_response, make_key
from selectws.protocol.http11 import parse_response


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(config: str | None) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "selectws", "serve", "--port", "0", "--log-format", "json", "--log-level", "info"]
    if config:
        cmd += ["--config", config]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec = json.loads(proc.stderr.readline())
        if rec.get("event") == "listening":
            # Keep draining the log (one line per connection) so the daemon never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(rec["addresses"][0].rsplit(":", 1)[1])
    raise RuntimeError("daemon did not start")


def open_conn(port: int, deflate: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = make_key()
    settings = DeflateSettings()
    sock.sendall(build_client_request(f"127.0.0.1:{port}", "/echo", key,
                                      extensions=client_offer(settings) if deflate else None))
    buf = b""
    while True:
        buf += sock.recv(4096)
        parsed = parse_response(buf)
        if parsed:
            break
    response, used = parsed
    check_accept_response(response, key)
    ext = None
    if deflate:
        params = accept_response(response.headers.get_all("Sec-WebSocket-Extensions"), settings)
        assert params is not None, "server declined permessage-deflate"
        ext = PerMessageDeflate(params, is_server=False)
        conn = Connection(CLIENT, extension=ext)
        conn.send_text("hello compressed world " * 20)
        sock.sendall(conn.data_to_send())
        events: list[object] = conn.receive_data(buf[used:])
        while not events:
            events = conn.receive_data(sock.recv(65536))
    return sock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--deflate", action="store_true")
    ap.add_argument("--config")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc, port = start(args.config)
    try:
        for _ in range(20):  # warm up: first connections import and allocate shared state
            open_conn(port, args.deflate).close()
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        t0 = time.monotonic()
        socks = [open_conn(port, args.deflate) for _ in range(args.conns)]
        opened = time.monotonic() - t0
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        per = (after - before) / args.conns
        print(json.dumps({"conns": args.conns, "deflate": args.deflate, "config": args.config,
                          "rss_before_kib": before, "rss_after_kib": after, "kib_per_conn": round(per, 2),
                          "open_s": round(opened, 2)}))
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
