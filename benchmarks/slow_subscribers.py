"""Memory under slow consumers: one fast publisher, subscribers that never read, and subscribers that must not lose
anything (issue 12).

    python benchmarks/slow_subscribers.py --python /tmp/venv/bin/python --pythonpath /tmp/old-main \\
        --out benchmarks/results/2026-11-28-issue12/before-slow.jsonl [--label before] [--slow 100] [--fast 5]
        [--size 16384] [--seconds 20] [--max-messages 200000] [--rate 0] [--rss-limit-mib 4096]

What runs
---------
A daemon (``PYTHON -m selectws serve --host 127.0.0.1 --port 0 --log-format json``, built-in defaults unless
``--config``, which must then route ``--path``'s pattern to the "broadcast" plugin; ``PYTHONPATH=--pythonpath``;
cwd a temporary directory, so the package comes from ``--pythonpath`` and not from the current directory), pinned
to CPU 0 with ``taskset -c 0`` when taskset exists; this script and its load processes are pinned to CPU 1
(``--no-pin`` turns both off). Port and pid come from its JSON ``listening`` log line. The built-in broadcast
plugin relays a message sent on ``/broadcast/{channel}`` to every OTHER member of the channel, in order. Then, all on
``--path`` (``/broadcast/bench``):

* ``--slow`` (100) slow subscribers: raw sockets with SO_RCVBUF = ``--slow-rcvbuf`` (4096) set before connect (so
  the kernel absorbs little), that complete the handshake and then never read again. Whether each is still
  connected is read at every RSS sample from TCP_INFO (not ESTABLISHED any more = the server dropped it: a reset
  or a FIN; a server that sends a FIN behind data the peer's zero window holds back is not seen this way) and the
  daemon's "dropping a slow consumer" log lines are counted too.
* ``--fast`` (5) fast subscribers, in a separate process (one selectors loop), that read everything and check every
  message: its length, and the sequence number written at both ends of its payload (8 bytes big-endian). Per
  subscriber: received, lost (gaps and missing tail), reordered (a number lower than the next expected), corrupt,
  and whether the server closed it (code).
* one publisher (a thread here) that sends ``--size`` (16 KiB) masked binary messages numbered 0, 1, 2, ... as fast
  as the server accepts them (non-blocking sends of 16-message batches) until ``--seconds`` (20 s) or
  ``--max-messages`` (200,000) have been sent, whichever comes first (``--rate N``: paced at N messages/s instead).
  ``published`` = whole frames sent.

The daemon's VmRSS (/proc/PID/status) is sampled every ``--sample-interval`` (100 ms) from the first publish until
the fast subscribers have drained (at most ``--drain-timeout`` s after the publisher stopped), and 2 s after that
(``rss_settled``). If it exceeds ``--rss-limit-mib`` (4096) the daemon is SIGKILLed at once, the publisher stopped,
and the run reports ``killed_over_rss_limit``. At the end ``/metrics`` is scraped (its slow consumer, write buffer
and connection lines) when served.

Output: a table on stdout and ONE JSON line appended to ``--out`` (the bench, label, interpreter, PYTHONPATH, the
selectws module actually imported, its git revision and dirty-file count, the figures, and the timeline as
[seconds since the first publish, RSS MiB, messages published so far]). Times are seconds since the first publish.
``fast_all_ok`` is true when every fast subscriber got every published message, in order, intact, and was not
closed. The issue's target: peak RSS below 300 MiB on defaults with every fast subscriber receiving every message
in order.

Reading the fast-subscriber figures: the server does not slow the publisher down for its subscribers, so a
subscriber is "fast" only while it reads at least as fast as the publisher publishes. The five of them share one
Python process and CPU 1 with the publisher (and with anything else running on the machine); a daemon that relays
hundreds of MiB/s to each leaves them a few milliseconds of slack before its per-connection write buffer limit
(``write_buffer_limit``, plus what the kernel buffers) is reached. When they are dropped, look at
``daemon_warning_samples`` (which limit, how many bytes were buffered, when), ``fast_process`` (its CPU seconds,
wall seconds, involuntary context switches, and ``max_busy_ms``, the longest time from select() returning to the
next select() while the publisher ran: processing plus being descheduled), each fast subscriber's
``max_read_gap_ms`` / ``max_read_gap_ended_s`` and ``read_gaps_over_10ms`` ([ended at s, ms], the first 40) (the
time between two reads that got data: a long read gap while the process was not busy means the server sent nothing
while the reader was waiting) and ``timeline``
(``[seconds, RSS MiB, messages published so far]``), and repeat with ``--rate`` (e.g. half the flat-out rate) to
tell a harness that cannot keep up from a server that drops readers that do.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import multiprocessing as mp
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SLOW_DROP_EVENT = "dropping a slow consumer"
TCP_ESTABLISHED = 1
METRIC_WORDS = ("slow_consumer", "write_buffer", "budget", "connections")


# ====================================================================== the daemon

def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def daemon_env(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_code(python: str, pythonpath: str | None) -> dict[str, Any]:
    """Which selectws the daemon will import, and the git state of the tree it comes from."""
    info: dict[str, Any] = {"python": python, "pythonpath": pythonpath}
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run([python, "-c", "import selectws; print(selectws.__file__)"], capture_output=True,
                             text=True, env=daemon_env(pythonpath), cwd=cwd, timeout=60)
    info["selectws_file"] = out.stdout.strip() or out.stderr.strip()[-300:]
    tree = Path(info["selectws_file"]).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        if rev.returncode == 0:
            info["git_rev"] = rev.stdout.strip()
            info["git_dirty_files"] = len([x for x in dirty.stdout.splitlines() if x.strip()])
    except (OSError, subprocess.SubprocessError):
        pass
    return info


class Daemon:
    """One ``selectws serve`` subprocess; its JSON log records (stamped with time.monotonic()) are kept."""

    def __init__(self, python: str, pythonpath: str | None, config: str | None, cpu: int | None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="selectws-bench-")
        cmd = [python, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json"]
        if config:
            cmd += ["--config", str(Path(config).resolve())]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.cmd = cmd
        self.records: list[dict[str, Any]] = []
        self.killed = False
        self._listening = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=daemon_env(pythonpath), cwd=self.tmp.name)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(30):
            self.kill()
            raise RuntimeError("daemon did not log 'listening' within 30 s:\n" + self.tail())
        listening = next(r for r in self.records if r.get("event") == "listening")
        self.port = int(listening["addresses"][0].rpartition(":")[2])
        self.pid = int(listening.get("pid") or self.proc.pid)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                record = {"event": None, "raw": line}
            record["_t"] = time.monotonic()
            self.records.append(record)
            if record.get("event") == "listening":
                self._listening.set()
        self._listening.set()

    def tail(self, n: int = 30) -> str:
        return "\n".join(json.dumps(r) for r in self.records[-n:])

    def rss_kib(self) -> int | None:
        return rss_kib(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def warnings_since(self, t: float) -> dict[str, int]:
        return dict(Counter(str(r.get("event")) for r in list(self.records)
                            if r["_t"] >= t and r.get("level") in ("warning", "error", "critical")))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        self.tmp.cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


# ====================================================================== raw WebSocket client pieces

def ws_connect(port: int, path: str, rcvbuf: int | None = None, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A blocking socket past a checked 101 handshake (reading no further than needed), and any bytes after it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window scale follows
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode()
                 + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
                 + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"handshake on {path}: connection closed; got {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake on {path}: {head[:200]!r}")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    if b"sec-websocket-accept: " + accept.lower() not in head.lower():
        raise ConnectionError(f"handshake on {path}: bad Sec-WebSocket-Accept in {head[:300]!r}")
    sock.settimeout(None)
    return sock, rest


def mask_bytes(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def masked_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    assert n < 126
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | n)) + mask + mask_bytes(payload, mask)


def send_until(sock: socket.socket, data: memoryview, deadline: float, stop: threading.Event | None = None) -> int:
    """Non-blocking send of ``data`` until all of it is out, ``deadline`` or ``stop``; the number of bytes sent."""
    done = 0
    while done < len(data):
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            break
        _, writable, _ = select.select([], [sock], [], min(left, 0.05))
        if not writable:
            continue
        try:
            done += sock.send(data[done:])
        except (BlockingIOError, InterruptedError):
            continue
    return done


def pin_to(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def tcp_state(sock: socket.socket) -> int:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


# ====================================================================== fast subscribers (their own process)

def fast_subscribers(port: int, path: str, n: int, size: int, cpu: int | None, ready: Any, ctl: Any,
                     out: Any) -> None:
    """Read everything on ``n`` connections and check each message; report when told how many were published
    and all of them arrived (or the drain timeout passed)."""
    pin_to(cpu)
    subs: list[dict[str, Any]] = []
    try:
        for i in range(n):
            sock, rest = ws_connect(port, path)
            sock.setblocking(False)
            subs.append({"i": i, "sock": sock, "buf": bytearray(rest), "next": 0, "received": 0, "lost": 0,
                         "gaps": 0, "reordered": 0, "corrupt": 0, "closed": None, "last_at": None,
                         "last_read": 0.0, "max_read_gap": 0.0, "max_read_gap_at": None, "long_gaps": []})
    except Exception as exc:  # reported: the run goes on without them
        ready.set()
        out.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    ready.set()
    started = time.monotonic()
    sel = selectors.DefaultSelector()
    for sub in subs:
        sel.register(sub["sock"], selectors.EVENT_READ, sub)
    # Each subscriber receives straight into its own big buffer and frames are checked in place (one copy, by
    # the kernel); the unparsed tail moves to the front when less than 1 MiB is left at the end.
    bufsize = max(8 << 20, 4 * (size + 16) + (2 << 20))
    for sub in subs:
        rest = bytes(sub["buf"])
        sub["buf"] = bytearray(bufsize)
        sub["buf"][:len(rest)] = rest
        sub["view"] = memoryview(sub["buf"])
        sub["r"], sub["w"] = 0, len(rest)
    published = None
    deadline = time.monotonic() + 3600
    # Was this process the bottleneck? The longest time from select() returning to the next select() call
    # (processing what came, plus being descheduled meanwhile) and, per subscriber, the longest time between two
    # reads that returned data (and when it ended). A long read gap while the process was not busy = the server
    # sent nothing while the reader was waiting.
    max_busy = 0.0
    selected_at = None
    while True:
        if selected_at is not None and published is None:
            max_busy = max(max_busy, time.monotonic() - selected_at)
        if ctl.poll(0):
            msg = ctl.recv()
            published = msg["published"]
            deadline = time.monotonic() + msg["drain_timeout"]
        if published is not None and all(s["closed"] is not None or s["next"] >= published for s in subs):
            break
        if time.monotonic() > deadline:
            break
        events = sel.select(0.05)
        selected_at = time.monotonic()
        for key, _ in events:
            sub = key.data
            sock = sub["sock"]
            buf = sub["buf"]
            r, w = sub["r"], sub["w"]
            if bufsize - w < (1 << 20):
                buf[:w - r] = buf[r:w]
                r, w = 0, w - r
            try:
                got = sock.recv_into(sub["view"][w:w + (1 << 20)])  # 1 MiB at most: visit all sockets often
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                got = 0
                sub["closed"] = f"{type(exc).__name__}: {exc}"
            if not got:
                sub["closed"] = sub["closed"] or "EOF"
                sel.unregister(sock)
                continue
            now = time.monotonic()
            if sub["last_at"] is not None and published is None:
                gap = now - sub["last_read"]
                if gap > sub["max_read_gap"]:
                    sub["max_read_gap"] = gap
                    sub["max_read_gap_at"] = now
                if gap > 0.01 and len(sub["long_gaps"]) < 40:
                    sub["long_gaps"].append((now, gap))
            sub["last_read"] = now
            end = w + got
            pos = r
            while end - pos >= 2:
                b0 = buf[pos]
                length = buf[pos + 1] & 0x7F
                p = pos + 2
                if length == 126:
                    if end - p < 2:
                        break
                    length = (buf[p] << 8) | buf[p + 1]
                    p += 2
                elif length == 127:
                    if end - p < 8:
                        break
                    length = int.from_bytes(buf[p:p + 8], "big")
                    p += 8
                if end - p < length:
                    break
                op = b0 & 0x0F
                if op in (0x1, 0x2):
                    sub["received"] += 1
                    if length != size or not b0 & 0x80:
                        sub["corrupt"] += 1
                    else:
                        seq = int.from_bytes(buf[p:p + 8], "big")
                        if int.from_bytes(buf[p + length - 8:p + length], "big") != seq:
                            sub["corrupt"] += 1
                        elif seq == sub["next"]:
                            sub["next"] = seq + 1
                        elif seq > sub["next"]:
                            sub["lost"] += seq - sub["next"]
                            sub["gaps"] += 1
                            sub["next"] = seq + 1
                        else:
                            sub["reordered"] += 1
                    sub["last_at"] = time.monotonic()
                elif op == 0x8:
                    code = int.from_bytes(buf[p:p + 2], "big") if length >= 2 else None
                    sub["closed"] = f"close frame {code} {bytes(buf[p + 2:p + length]).decode('utf-8', 'replace')}"
                elif op == 0x9:
                    try:
                        sock.send(masked_frame(0xA, bytes(buf[p:p + length])))
                    except OSError:
                        pass
                pos = p + length
            sub["r"], sub["w"] = (0, 0) if pos == end else (pos, end)
    results = []
    for sub in subs:
        lost = sub["lost"] + max(0, (published or 0) - sub["next"])
        results.append({"received": sub["received"], "lost": lost, "gaps": sub["gaps"],
                        "reordered": sub["reordered"], "corrupt": sub["corrupt"], "closed": sub["closed"],
                        "last_at": sub["last_at"],
                        "max_read_gap_ms": round(sub["max_read_gap"] * 1e3, 1),
                        "max_read_gap_at": sub["max_read_gap_at"], "long_gaps": sub["long_gaps"]})
        sub["sock"].close()
        sub["view"].release()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.send({"subscribers": results, "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
              "max_busy_ms": round(max_busy * 1e3, 1),
              "involuntary_switches": usage.ru_nivcsw, "wall_s": round(time.monotonic() - started, 2),
              "drained": published is not None and all(
        s["next"] >= published for s in subs)})


# ====================================================================== the publisher (a thread)

def publish(port: int, path: str, size: int, seconds: float, max_messages: int, rate: float,
            stop: threading.Event, state: dict[str, Any]) -> None:
    try:
        sock, _ = ws_connect(port, path)
    except Exception as exc:
        state["error"] = f"connect: {type(exc).__name__}: {exc}"
        state["done"] = time.monotonic()
        return
    sock.setblocking(False)
    mask = os.urandom(4)
    if size < 126:
        head = bytes((0x82, 0x80 | size))
    elif size < 65536:
        head = bytes((0x82, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x82, 0x80 | 127)) + size.to_bytes(8, "big")
    head += mask
    # payload = seq (8 bytes) + filler + seq (8 bytes); size % 4 == 0, so both seq fields start at mask phase 0
    # and the filler can be masked once.
    filler = mask_bytes(bytes((i * 7 + 3) & 0xFF for i in range(size - 16)), mask)
    mask8 = int.from_bytes(mask * 2, "big")
    frame_len = len(head) + size
    batch = 16
    state.update(frame_len=frame_len, sent_bytes=0)
    seq = 0
    total = 0
    t0 = state["t0"] = time.monotonic()
    due = t0
    stop_at = t0 + seconds
    error = None
    try:
        while seq < max_messages and not stop.is_set() and time.monotonic() < stop_at:
            k = min(batch, max_messages - seq)
            if rate > 0:  # paced; after a stall no catching up in a burst: the schedule restarts from now
                due = max(due, time.monotonic() - 0.01) + k / rate
                while not stop.is_set() and time.monotonic() < min(due, stop_at):
                    time.sleep(min(0.01, max(0.0, min(due, stop_at) - time.monotonic())))
                if time.monotonic() >= stop_at:
                    break
            frames = []
            for s in range(seq, seq + k):
                tag = (s ^ mask8).to_bytes(8, "big")
                frames += (head, tag, filler, tag)
            data = memoryview(b"".join(frames))
            sent = send_until(sock, data, stop_at, stop)
            total += sent
            state["sent_bytes"] = total
            seq += k
            if sent < len(data):
                partial = total % frame_len
                if partial and not stop.is_set():  # cut at the deadline: finish that frame, keep the stream valid
                    rest = frame_len - partial
                    off = sent
                    total += send_until(sock, data[off:off + rest], time.monotonic() + 5.0, stop)
                break
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    state.update(published=total // frame_len, sent_bytes=total, done=time.monotonic(), error=error,
                 publisher_state=tcp_state(sock))
    state["sock"] = sock  # kept open until the end: closing it is not part of the measurement


# ====================================================================== the run

def scrape_metrics(port: int) -> dict[str, str] | str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return head[:100].decode("latin-1")
    lines = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#") and any(w in line for w in METRIC_WORDS):
            name, _, value = line.rpartition(" ")
            lines[name] = value
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    daemon = Daemon(args.python, args.pythonpath, args.config, args.daemon_cpu)
    result: dict[str, Any] = {"rss_idle_mib": mib(daemon.rss_kib())}
    slow: list[socket.socket] = []
    fast_proc = None
    pub_state: dict[str, Any] = {}
    stop_pub = threading.Event()
    try:
        for _ in range(args.slow):
            sock, _rest = ws_connect(daemon.port, args.path, rcvbuf=args.slow_rcvbuf)
            slow.append(sock)
        result["slow_rcvbuf_effective"] = slow[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) if slow else None
        ready = ctx.Event()
        fast_rx, fast_tx = ctx.Pipe(duplex=False)
        ctl_rx, ctl_tx = ctx.Pipe(duplex=False)
        fast_proc = ctx.Process(target=fast_subscribers, daemon=True, args=(
            daemon.port, args.path, args.fast, args.size, args.load_cpu, ready, ctl_rx, fast_tx))
        fast_proc.start()
        if not ready.wait(60):
            raise RuntimeError("the fast subscribers did not connect within 60 s")
        time.sleep(0.5)  # every join done
        result["rss_connected_mib"] = mib(daemon.rss_kib())

        publisher = threading.Thread(target=publish, daemon=True, args=(
            daemon.port, args.path, args.size, args.seconds, args.max_messages, args.rate, stop_pub, pub_state))
        t_log = time.monotonic()
        publisher.start()
        while "t0" not in pub_state and "done" not in pub_state:
            time.sleep(0.005)
        t0 = pub_state.get("t0", time.monotonic())
        timeline: list[tuple[float, int, int]] = []

        def published_so_far() -> int:
            return pub_state.get("sent_bytes", 0) // pub_state.get("frame_len", 1)

        gone_at: dict[int, float] = {}  # slow subscriber index -> first sample that saw it not ESTABLISHED
        fast_report = None
        told = False
        hard_end = t0 + args.seconds + args.drain_timeout + 60
        next_sample = time.monotonic()
        while time.monotonic() < hard_end:
            now = time.monotonic()
            if now < next_sample:
                time.sleep(next_sample - now)
            next_sample += args.sample_interval
            now = time.monotonic()
            value = daemon.rss_kib()
            if value is not None:
                timeline.append((now - t0, value, published_so_far()))
                if value > args.rss_limit_mib * 1024 and not daemon.killed:
                    daemon.kill()
                    stop_pub.set()
                    result["killed_over_rss_limit"] = round(now - t0, 2)
            for i, sock in enumerate(slow):
                if i not in gone_at and tcp_state(sock) != TCP_ESTABLISHED:
                    gone_at[i] = now - t0
            if not told and "done" in pub_state:
                ctl_tx.send({"published": pub_state.get("published", 0),
                             "drain_timeout": args.drain_timeout if daemon.alive() else 1.0})
                told = True
            if told and fast_rx.poll(0):
                fast_report = fast_rx.recv()
                break
            if not daemon.alive() and not told:
                stop_pub.set()
        publisher.join(10)
        t_drained = time.monotonic() - t0
        settle_end = time.monotonic() + 2.0
        while time.monotonic() < settle_end:
            value = daemon.rss_kib()
            if value is not None:
                timeline.append((time.monotonic() - t0, value, published_so_far()))
            time.sleep(0.1)
        for i, sock in enumerate(slow):
            if i not in gone_at and tcp_state(sock) != TCP_ESTABLISHED:
                gone_at[i] = time.monotonic() - t0
        result["rss_settled_mib"] = mib(daemon.rss_kib())
        result["metrics"] = scrape_metrics(daemon.port) if daemon.alive() else "daemon not running"

        # ------------------------------------------------------------ figures
        published = pub_state.get("published", 0)
        pub_s = pub_state.get("done", t0) - t0
        result.update(
            published=published, publish_s=round(pub_s, 2),
            publish_rate_msg_s=round(published / pub_s) if pub_s > 0 else None,
            publish_mib_s=round(published * args.size / pub_s / 2**20, 1) if pub_s > 0 else None,
            publisher_error=pub_state.get("error"), drained_at_s=round(t_drained, 2),
        )
        if timeline:
            peak_t, peak, _ = max(timeline, key=lambda x: x[1])
            result["rss_peak_mib"] = mib(peak)
            result["rss_peak_at_s"] = round(peak_t, 2)
        result["timeline"] = [[round(t, 2), mib(v), n] for t, v, n in timeline]
        drops = [r["_t"] - t0 for r in list(daemon.records)
                 if r.get("event") == SLOW_DROP_EVENT and str(r.get("path", "")).startswith(args.path)]
        result["slow_drop_log_lines"] = len(drops)
        result["slow_drop_log_first_s"] = round(min(drops), 2) if drops else None
        result["slow_drop_log_last_s"] = round(max(drops), 2) if drops else None
        gone = sorted(gone_at.values())
        result["slow_gone"] = len(gone)
        result["slow_gone_first_s"] = round(gone[0], 2) if gone else None
        result["slow_gone_last_s"] = round(gone[-1], 2) if gone else None
        result["daemon_warnings"] = daemon.warnings_since(t_log)
        # The first and last few warning lines, whole (buffered sizes, limits), seconds since the first publish:
        # drops after every slow subscriber is gone hit the fast ones.
        skip = ("_t", "timestamp", "logger")
        warned = [{"t_s": round(r["_t"] - t0, 3), **{k: v for k, v in r.items() if k not in skip}}
                  for r in list(daemon.records)
                  if r["_t"] >= t_log and r.get("level") in ("warning", "error", "critical")]
        result["daemon_warning_samples"] = warned if len(warned) <= 8 else warned[:3] + warned[-5:]
        result["daemon_alive"] = daemon.alive()
        if fast_report is None:
            fast_report = {"error": "no report from the fast subscribers"}
        if "error" in fast_report:
            result["fast_error"] = fast_report["error"]
            result["fast_all_ok"] = False
        else:
            subs = fast_report["subscribers"]
            for s in subs:
                s["last_at_s"] = round(s.pop("last_at") - t0, 2) if s.get("last_at") else None
                at = s.pop("max_read_gap_at", None)
                s["max_read_gap_ended_s"] = round(at - t0, 2) if at else None
                s["read_gaps_over_10ms"] = [[round(t - t0, 3), round(g * 1e3, 1)] for t, g in s.pop("long_gaps", [])]
            result["fast"] = subs
            result["fast_process"] = {k: fast_report.get(k) for k in (
                "cpu_s", "wall_s", "involuntary_switches", "max_busy_ms")}
            result["fast_lost_total"] = sum(s["lost"] for s in subs)
            result["fast_reordered_total"] = sum(s["reordered"] for s in subs)
            result["fast_corrupt_total"] = sum(s["corrupt"] for s in subs)
            result["fast_closed"] = sum(1 for s in subs if s["closed"])
            result["fast_all_ok"] = bool(published) and all(
                s["lost"] == 0 and s["reordered"] == 0 and s["corrupt"] == 0 and not s["closed"]
                and s["received"] == published for s in subs)
    finally:
        stop_pub.set()
        for sock in slow:
            sock.close()
        if pub_state.get("sock") is not None:
            pub_state["sock"].close()
        if fast_proc is not None:
            fast_proc.join(5)
            if fast_proc.is_alive():
                fast_proc.kill()
        daemon.stop()
    return result


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def print_table(out: dict[str, Any]) -> None:
    r = out["result"]
    code = out["code"]
    print(f"\nslow_subscribers  label={out['label']}  selectws={code.get('selectws_file')}  "
          f"rev={code.get('git_rev', '?')} (+{code.get('git_dirty_files', '?')} dirty)  pinned={out['pinned']}")
    if "error" in r:
        print(f"  ERROR: {r['error']}")
        return
    p = out["params"]
    rows = [
        ("load", f"{p['slow']} slow (rcvbuf {p['slow_rcvbuf']}, effective {r.get('slow_rcvbuf_effective')}), "
                 f"{p['fast']} fast, 1 publisher of {p['size']} B messages on {p['path']}"),
        ("published", f"{r.get('published')} messages in {r.get('publish_s')} s "
                      f"({r.get('publish_rate_msg_s')} msg/s, {r.get('publish_mib_s')} MiB/s in)"),
        ("RSS MiB", f"idle {r.get('rss_idle_mib')}, connected {r.get('rss_connected_mib')}, "
                    f"peak {r.get('rss_peak_mib')} at {r.get('rss_peak_at_s')} s, "
                    f"settled {r.get('rss_settled_mib')}"),
        ("slow dropped", f"{r.get('slow_gone')}/{p['slow']} sockets closed by the server "
                         f"(first {r.get('slow_gone_first_s')} s, last {r.get('slow_gone_last_s')} s); "
                         f"{r.get('slow_drop_log_lines')} '{SLOW_DROP_EVENT}' log lines "
                         f"(first {r.get('slow_drop_log_first_s')} s, last {r.get('slow_drop_log_last_s')} s)"),
        ("fast", f"all ok: {r.get('fast_all_ok')}; lost {r.get('fast_lost_total')}, "
                 f"reordered {r.get('fast_reordered_total')}, corrupt {r.get('fast_corrupt_total')}, "
                 f"closed {r.get('fast_closed')}" + (f"; error {r['fast_error']}" if r.get("fast_error") else "")),
        ("drained at", f"{r.get('drained_at_s')} s"),
        ("fast process", json.dumps(r.get("fast_process"))),
    ]
    if r.get("killed_over_rss_limit") is not None:
        rows.append(("KILLED", f"RSS over {p['rss_limit_mib']} MiB at {r['killed_over_rss_limit']} s"))
    if r.get("publisher_error"):
        rows.append(("publisher", r["publisher_error"]))
    if r.get("daemon_warnings"):
        rows.append(("daemon warnings", json.dumps(r["daemon_warnings"])))
    for name, text in rows:
        print(f"  {name:>15}: {text}")
    for i, s in enumerate(r.get("fast", [])):
        brief = {k: v for k, v in s.items() if k != "read_gaps_over_10ms"}
        brief["read_gaps_over_10ms"] = len(s.get("read_gaps_over_10ms", []))
        print(f"  {'fast #' + str(i):>15}: {json.dumps(brief)}")
    print("  (times in seconds since the first publish)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the daemon")
    parser.add_argument("--pythonpath", default=None,
                        help="PYTHONPATH of the daemon: the source tree to measure (default: inherited)")
    parser.add_argument("--config", default=None, help="TOML config for the daemon (default: built-in defaults)")
    parser.add_argument("--out", required=True, help="file to append the JSON result line to")
    parser.add_argument("--label", default="", help="free text stored with the result (e.g. before / after)")
    parser.add_argument("--path", default="/broadcast/bench", help="broadcast route (plugin 'broadcast')")
    parser.add_argument("--slow", type=int, default=100, help="subscribers that never read")
    parser.add_argument("--slow-rcvbuf", type=int, default=4096, help="their SO_RCVBUF, set before connect")
    parser.add_argument("--fast", type=int, default=5, help="subscribers that read and check everything")
    parser.add_argument("--size", type=int, default=16384, help="message size in bytes (multiple of 4, >= 16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="the publisher stops after this long ...")
    parser.add_argument("--max-messages", type=int, default=200_000, help="... or after this many messages")
    parser.add_argument("--rate", type=float, default=0,
                        help="messages per second for the publisher; 0 (the default) = as fast as the server takes")
    parser.add_argument("--drain-timeout", type=float, default=15.0,
                        help="how long the fast subscribers may take to receive the rest after the publisher stops")
    parser.add_argument("--rss-limit-mib", type=int, default=4096, help="SIGKILL the daemon past this RSS")
    parser.add_argument("--sample-interval", type=float, default=0.1, help="seconds between RSS samples")
    parser.add_argument("--no-pin", action="store_true", help="do not pin daemon to CPU 0 and the load to CPU 1")
    args = parser.parse_args()
    if args.size < 16 or args.size % 4:
        parser.error("--size must be a multiple of 4 and at least 16")
    pinned = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.daemon_cpu = 0 if pinned else None
    args.load_cpu = 1 if pinned else None
    pin_to(args.load_cpu)
    out: dict[str, Any] = {
        "bench": "slow_subscribers", "label": args.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pinned": pinned, "code": describe_code(args.python, args.pythonpath),
        "params": {"path": args.path, "slow": args.slow, "slow_rcvbuf": args.slow_rcvbuf, "fast": args.fast,
                   "size": args.size, "seconds": args.seconds, "max_messages": args.max_messages, "rate": args.rate,
                   "drain_timeout": args.drain_timeout, "rss_limit_mib": args.rss_limit_mib,
                   "sample_interval": args.sample_interval, "config": args.config},
    }
    try:
        out["result"] = run(args)
    except Exception as exc:  # still write a line saying what went wrong
        out["result"] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:  # first: the table is printed after, to a pipe that may be gone
        fh.write(json.dumps(out) + "\n")
    print_table(out)
    print(f"result appended to {args.out}")
    return 0 if "error" not in out["result"] else 1


if __name__ == "__main__":
    sys.exit(main())
