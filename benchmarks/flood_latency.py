"""Fairness under a flood: how long do other clients wait while one client floods the daemon (issue 12)?

    python benchmarks/flood_latency.py --python /tmp/venv/bin/python --pythonpath /tmp/old-main \\
        --out benchmarks/results/2026-11-28-issue12/before-flood.jsonl [--label before] [--scenarios ...]

What runs
---------
For every scenario a fresh daemon (``PYTHON -m selectws serve --host 127.0.0.1 --port 0 --log-format json``, built-in
defaults unless ``--config``; ``PYTHONPATH=--pythonpath``; cwd a temporary directory, so the package comes from
``--pythonpath`` and not from the current directory) is started, pinned to CPU 0 with ``taskset -c 0`` when taskset
exists. This script and all its load processes are pinned to CPU 1 (``--no-pin`` turns both off). Its port and pid
come from its JSON ``listening`` log line. Three kinds of client processes (separate processes: no GIL shared with
the flood) then run against it:

* the echo probe: one WebSocket on ``/echo`` that sends a 16-byte masked text message every ``--probe-interval``
  (5 ms) and waits for its echo before the next one (closed loop: a stall of the server is seen by one sample, as
  its max, not by many), recording send time and round-trip latency;
* the /healthz probe: every ``--healthz-interval`` (20 ms) a new TCP connection, ``GET /healthz``, the whole
  answer read (connect + request + response = the latency);
* the flood client (raw socket, masked frames pre-built before the flood starts), one of

  - ``fragments`` (scenario A): ONE binary message of ``--fragment-bytes`` (1 MiB) sent as that many 1-byte frames
    (opcode 0x2 FIN=0, then continuations 0x0, the last FIN=1; 7 bytes each on the wire), with ``sendall`` in
    256 KiB chunks from a thread while the main thread reads the echo (``--fragment-messages N`` sends N such
    messages back to back, for more samples). The flood is "in progress" from the first byte sent until the echo
    has been read whole and checked (or the server closed the connection: ``outcome`` says which);
  - ``pings`` (scenario B): 125-byte ping frames (131 bytes on the wire) as fast as the socket takes them for
    ``--ping-seconds`` (5 s), a second thread reading and discarding the pongs. Then a last ping with a unique
    payload: the flood is "in progress" until its pong is back (the server has worked through the backlog);
  - ``pings-noread`` (scenario B2): the same, but nobody ever reads the pongs. The sender tries for
    ``--ping-seconds``, but the flood is "in progress" only until its socket last took bytes
    (``last_send_progress_s``): a server that stops reading a client whose pongs pile up stalls it there, and
    is idle afterwards. ``pings_sent`` shows how far the server let it get.

* ``baseline``: the probes alone for ``--baseline-seconds`` (3 s).

The probes start ``--warmup`` (1 s) before the flood and stop after it; only samples SENT while the flood is in
progress count (``window_s`` is that interval). The daemon's VmRSS (/proc/PID/status) is sampled every 20 ms:
``rss_before`` (just before the flood), ``rss_peak`` (during it, or until the B2 sender gave up), ``rss_after_2s``
(2 s after the flood ended, flood connection still open and idle) and ``rss_after_close_2s`` (2 s after the flood
client closed its socket).

Output: a table on stdout, and ONE JSON line appended to ``--out`` (the bench, label, interpreter, PYTHONPATH, the
selectws module actually imported, its git revision and dirty-file count, per-scenario figures; latencies in
milliseconds, RSS in MiB). The issue's target: the probes' p99 below 10 ms during either flood.

Bounded: each flood stops by itself (one message / ``--ping-seconds``), every wait has a timeout
(``--flood-timeout`` for the whole flood), and the daemon is SIGTERMed (SIGKILLed after 10 s) after each scenario.
On a 2-CPU machine the flood client and the probes share CPU 1: the probes mostly sleep, so the scheduler wakes them
promptly, but a few hundred microseconds of client-side noise remain in the figures.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import multiprocessing as mp
import os
import select
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
SCENARIOS = ("baseline", "fragments", "pings", "pings-noread")
PING_PAYLOAD = 125
PING_WIRE = 2 + 4 + PING_PAYLOAD  # masked client ping: header, mask, payload


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
        """Warning/error records after ``t``, counted by event."""
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
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


# ====================================================================== raw WebSocket client pieces

def ws_connect(port: int, path: str, timeout: float = 10.0) -> tuple[socket.socket, bytearray]:
    """A blocking socket past a checked 101 handshake, and whatever was read after the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode()
                 + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
                 + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"handshake on {path}: connection closed; got {bytes(buf[:200])!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake on {path}: {head[:200]!r}")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    if b"sec-websocket-accept: " + accept.lower() not in head.lower():
        raise ConnectionError(f"handshake on {path}: bad Sec-WebSocket-Accept in {head[:300]!r}")
    sock.settimeout(None)
    return sock, bytearray(rest)


def mask_bytes(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + mask_bytes(payload, mask)


def take_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """(first byte, payload) of one whole unmasked server frame at the start of ``buf`` (consumed), or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        pos = 10
    if b1 & 0x80:
        raise ValueError("masked frame from the server")
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos:pos + n])
    del buf[:pos + n]
    return b0, payload


def read_frame(sock: socket.socket, buf: bytearray, bufsize: int = 65536) -> tuple[int, bytes]:
    """Block until one whole frame is in; ConnectionError on EOF."""
    while True:
        frame = take_frame(buf)
        if frame is not None:
            return frame
        chunk = sock.recv(bufsize)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk


def pin_to(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


# ====================================================================== probes (each in its own process)

def probe_echo(port: int, interval: float, cpu: int | None, ready: Any, stop: Any, out: Any) -> None:
    """Closed-loop echo probe: (send time, round trip) per message until ``stop``; errors end it early."""
    pin_to(cpu)
    samples: list[tuple[float, float]] = []
    error = None
    try:
        sock, buf = ws_connect(port, "/echo")
        sock.settimeout(30)
        ready.set()
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            payload = f"probe {i:010d}".encode()
            frame = masked_frame(0x1, payload)
            t0 = time.monotonic()
            sock.sendall(frame)
            while True:
                b0, data = read_frame(sock, buf)
                if b0 & 0x0F == 0x9:  # a keepalive ping: answer it, keep waiting
                    sock.sendall(masked_frame(0xA, data))
                    continue
                if b0 & 0x0F == 0x8:
                    raise ConnectionError(f"closed by the server: {data[:2].hex()} {data[2:]!r}")
                break
            t1 = time.monotonic()
            if data != payload:
                raise ValueError(f"echo {data[:40]!r} != {payload!r}")
            samples.append((t0, t1 - t0))
            i += 1
            next_at = max(t0 + interval, t1)
        sock.close()
    except Exception as exc:  # reported, not raised: the run goes on
        error = f"{type(exc).__name__}: {exc}"
        ready.set()
    out.send({"samples": samples, "error": error})


def probe_healthz(port: int, interval: float, cpu: int | None, ready: Any, stop: Any, out: Any) -> None:
    """A fresh connection and GET /healthz every ``interval``: (start time, latency, status)."""
    pin_to(cpu)
    samples: list[tuple[float, float, int]] = []
    errors: Counter[str] = Counter()
    ready.set()
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(request)
                data = bytearray()
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    head, sep, body = bytes(data).partition(b"\r\n\r\n")
                    if sep:
                        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length:")), None)
                        if length is not None and len(body) >= length:
                            break
            t1 = time.monotonic()
            status = int(bytes(data[9:12])) if data.startswith(b"HTTP/1.") else 0
            samples.append((t0, t1 - t0, status))
        except (OSError, ValueError) as exc:
            errors[f"{type(exc).__name__}: {exc}"] += 1
            t1 = time.monotonic()
        next_at = max(t0 + interval, t1)
    out.send({"samples": samples, "errors": dict(errors)})


# ====================================================================== flood clients (each in its own process)

def build_fragments(n: int) -> tuple[bytearray, bytes]:
    """The wire bytes of one n-byte binary message in n masked 1-byte frames, and the message itself."""
    mask = os.urandom(4)
    block = b"".join(bytes((0x00, 0x81)) + mask + bytes((v ^ mask[0],)) for v in range(256))
    whole, rest = divmod(n, 256)
    wire = bytearray(block * whole + block[:7 * rest])
    wire[0] = 0x02  # first frame: binary, FIN=0
    wire[len(wire) - 7] |= 0x80  # last frame: FIN=1 (a single frame: 0x82)
    return wire, bytes(range(256)) * whole + bytes(range(rest))


def flood_fragments(port: int, nbytes: int, messages: int, timeout: float, cpu: int | None, ready: Any, go: Any,
                    finish: Any, out: Any) -> None:
    pin_to(cpu)
    result: dict[str, Any] = {"kind": "fragments", "messages": messages, "frames_per_message": nbytes,
                              "wire_bytes": 7 * nbytes * messages}
    one, expected = build_fragments(nbytes)
    wire = one * messages if messages > 1 else one
    try:
        sock, buf = ws_connect(port, "/echo")
    except Exception as exc:
        result["outcome"] = f"connect failed: {exc}"
        ready.set()
        out.send(result)
        return
    ready.set()
    go.wait()
    sent = [0]
    send_error: list[str] = []
    times: dict[str, float] = {}

    def sender() -> None:
        view = memoryview(wire)
        try:
            for off in range(0, len(wire), 256 * 1024):
                sock.sendall(view[off:off + 256 * 1024])
                sent[0] = min(off + 256 * 1024, len(wire))
        except OSError as exc:
            send_error.append(f"{type(exc).__name__}: {exc}")
        times["send_done"] = time.monotonic()

    sock.settimeout(timeout)
    t_start = time.monotonic()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    message = bytearray()
    echoed = 0
    outcome = None
    try:
        while outcome is None:
            b0, data = read_frame(sock, buf, 1 << 20)
            op = b0 & 0x0F
            if op == 0x8:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                outcome = f"closed by the server: {code} {data[2:].decode('utf-8', 'replace')}"
            elif op == 0x9:
                sock.sendall(masked_frame(0xA, data))
            elif op in (0x0, 0x1, 0x2):
                message += data
                if b0 & 0x80:
                    if message != expected:
                        outcome = f"echo {echoed + 1} differs ({len(message)} bytes)"
                    echoed += 1
                    message = bytearray()
                    if echoed == messages:
                        outcome = "echoed"
    except TimeoutError:
        outcome = f"no echo within {timeout} s"
    except OSError as exc:
        outcome = f"connection lost: {type(exc).__name__}: {exc}"
    t_end = time.monotonic()
    thread.join(max(1.0, timeout - (t_end - t_start)))
    result.update(outcome=outcome, t_start=t_start, t_end=t_end, send_s=times.get("send_done", t_end) - t_start,
                  bytes_sent=sent[0], echoes=echoed, send_error=send_error[0] if send_error else None)
    out.send(result)
    finish.wait(60)
    sock.close()
    out.send({"closed_at": time.monotonic()})


def send_until(sock: socket.socket, data: memoryview, deadline: float, progress: list[float] | None = None) -> int:
    """Non-blocking send of ``data`` until all of it is out or ``deadline``; the number of bytes sent. The time of
    the last send that took bytes goes into ``progress[0]``."""
    done = 0
    while done < len(data):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, writable, _ = select.select([], [sock], [], min(left, 0.05))
        if not writable:
            continue
        try:
            done += sock.send(data[done:])
        except (BlockingIOError, InterruptedError):
            continue
        if progress is not None:
            progress[0] = time.monotonic()
    return done


def flood_pings(port: int, seconds: float, read: bool, cpu: int | None, ready: Any, go: Any, finish: Any,
                out: Any) -> None:
    pin_to(cpu)
    kind = "pings" if read else "pings-noread"
    result: dict[str, Any] = {"kind": kind, "seconds": seconds}
    mask = os.urandom(4)
    ping = bytes((0x89, 0x80 | PING_PAYLOAD)) + mask + mask_bytes(b"p" * PING_PAYLOAD, mask)
    block = memoryview(ping * 8192)  # ~1 MiB of pings
    try:
        sock, buf = ws_connect(port, "/echo")
    except Exception as exc:
        result["outcome"] = f"connect failed: {exc}"
        ready.set()
        out.send(result)
        return
    ready.set()
    marker = b"END-" + os.urandom(6).hex().encode()
    end_pong = bytes((0x8A, len(marker))) + marker
    received = [0]
    got_end = threading.Event()  # the END pong came back, or the reader gave up (EOF, error)
    found_end: list[float] = []
    reader_error: list[str] = []

    def reader() -> None:  # the socket is non-blocking (the sender needs that): wait with select
        tail = bytes(buf)
        try:
            while not finish.is_set():
                readable, _, _ = select.select([sock], [], [], 0.2)
                if not readable:
                    continue
                try:
                    chunk = sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                if not chunk:
                    reader_error.append("connection closed by the server")
                    break
                received[0] += len(chunk)
                if end_pong in tail[-64:] + chunk:
                    found_end.append(time.monotonic())
                    break
                tail = chunk[-64:]
        except OSError as exc:
            reader_error.append(f"{type(exc).__name__}: {exc}")
        got_end.set()

    go.wait()
    sock.setblocking(False)
    if read:
        threading.Thread(target=reader, daemon=True).start()
    t_start = time.monotonic()
    stop_at = t_start + seconds
    total = 0
    error = None
    progress = [t_start]
    try:
        while time.monotonic() < stop_at:
            n = send_until(sock, block, stop_at, progress)
            total += n
            if n < len(block):
                break
        partial = total % PING_WIRE
        if partial:  # finish the frame cut at the deadline, so that the stream stays valid
            n = send_until(sock, block[partial:PING_WIRE], time.monotonic() + 2.0)
            total += n
        t_stop = time.monotonic()
        if read and total % PING_WIRE == 0:
            send_until(sock, memoryview(masked_frame(0x9, marker)), time.monotonic() + 5.0)
            got_end.wait(30)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
        t_stop = time.monotonic()
    # B: until the pong of the last ping is back; B2: until the socket last took bytes (once the server stops reading
    # this client, its flood is over as far as the server's work goes, even though the sender still tries).
    t_end = found_end[0] if found_end else (t_stop if read else progress[0])
    outcome = "ok" if error is None and not reader_error else (error or reader_error[0])
    result.update(outcome=outcome, t_start=t_start, t_end=t_end, send_s=t_stop - t_start,
                  pings_sent=total // PING_WIRE, bytes_sent=total, bytes_read=received[0],
                  pongs_read_approx=received[0] // (2 + PING_PAYLOAD),
                  last_send_progress_s=round(progress[0] - t_start, 3),
                  last_pong_seen=bool(found_end) if read else None,
                  drained_after_stop_s=round(t_end - t_stop, 3) if found_end else None)
    out.send(result)
    finish.wait(60)
    sock.close()
    out.send({"closed_at": time.monotonic()})


# ====================================================================== one scenario

def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def latency_stats(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {"count": len(v), "p50_ms": round(percentile(v, 50) * 1e3, 3), "p99_ms": round(percentile(v, 99) * 1e3, 3),
            "max_ms": round(v[-1] * 1e3, 3), "mean_ms": round(sum(v) / len(v) * 1e3, 3)}


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def run_scenario(name: str, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    daemon = Daemon(args.python, args.pythonpath, args.config, args.daemon_cpu)
    result: dict[str, Any] = {"rss_idle_mib": mib(daemon.rss_kib())}
    procs: list[Any] = []
    try:
        stop = ctx.Event()
        probes = []
        for target, interval in ((probe_echo, args.probe_interval), (probe_healthz, args.healthz_interval)):
            ready = ctx.Event()
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=target, args=(daemon.port, interval, args.load_cpu, ready, stop, tx), daemon=True)
            p.start()
            procs.append(p)
            probes.append((ready, rx))
        for ready, _ in probes:
            ready.wait(30)

        flood_rx = None
        go = ctx.Event()
        finish = ctx.Event()
        if name != "baseline":
            ready = ctx.Event()
            flood_rx, tx = ctx.Pipe(duplex=False)
            if name == "fragments":
                p = ctx.Process(target=flood_fragments, daemon=True, args=(
                    daemon.port, args.fragment_bytes, args.fragment_messages, args.flood_timeout, args.load_cpu,
                    ready, go, finish, tx))
            else:
                p = ctx.Process(target=flood_pings, daemon=True, args=(
                    daemon.port, args.ping_seconds, name == "pings", args.load_cpu, ready, go, finish, tx))
            p.start()
            procs.append(p)
            if not ready.wait(60):
                raise RuntimeError(f"{name}: the flood client did not get ready in 60 s")

        time.sleep(args.warmup)
        rss: list[tuple[float, int]] = []

        def sample() -> None:
            value = daemon.rss_kib()
            if value is not None:
                rss.append((time.monotonic(), value))

        sample()
        result["rss_before_mib"] = mib(rss[-1][1]) if rss else None
        t_go = time.monotonic()
        flood: dict[str, Any] = {}
        if flood_rx is None:
            end = t_go + args.baseline_seconds
            while time.monotonic() < end:
                sample()
                time.sleep(0.02)
            window = (t_go, time.monotonic())
            t_report = window[1]
        else:
            go.set()
            hard_end = t_go + args.flood_timeout + args.ping_seconds + 30
            while not flood_rx.poll(0.02):
                sample()
                if time.monotonic() > hard_end or not daemon.alive():
                    break
            if flood_rx.poll(0):
                flood = flood_rx.recv()
            else:
                flood = {"outcome": "no report from the flood client (daemon died or timed out)",
                         "t_start": t_go, "t_end": time.monotonic()}
            t_report = time.monotonic()  # the flood client is done (B2: its sender gave up at --ping-seconds)
            window = (flood.get("t_start", t_go), flood.get("t_end", t_report))
            result["flood"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in flood.items()
                               if not k.startswith("t_")}
        result["window_s"] = round(window[1] - window[0], 3)
        during = [v for t, v in rss if window[0] <= t <= max(window[1], t_report) + 0.02]
        result["rss_peak_mib"] = mib(max(during)) if during else None

        # After the flood: RSS 2 s later with the flood connection still open, then 2 s after it closed.
        stop_probes_at = time.monotonic() + 0.5
        while time.monotonic() < stop_probes_at:
            sample()
            time.sleep(0.02)
        stop.set()
        outputs = [rx.recv() if rx.poll(30) else {"samples": [], "error": "no report"} for _, rx in probes]
        if flood_rx is not None:
            while time.monotonic() < max(window[1], t_report) + 2.0:
                time.sleep(0.02)
            result["rss_after_2s_mib"] = mib(daemon.rss_kib())
            finish.set()
            closed = flood_rx.recv().get("closed_at", time.monotonic()) if flood_rx.poll(30) else time.monotonic()
            while time.monotonic() < closed + 2.0:
                time.sleep(0.02)
            result["rss_after_close_2s_mib"] = mib(daemon.rss_kib())
        result["daemon_alive"] = daemon.alive()
        result["daemon_warnings"] = daemon.warnings_since(t_go)

        echo, health = outputs
        result["echo"] = latency_stats([lat for t, lat in echo["samples"] if window[0] <= t <= window[1]])
        if echo.get("error"):
            result["echo"]["error"] = echo["error"]
        result["healthz"] = latency_stats([lat for t, lat, _ in health["samples"] if window[0] <= t <= window[1]])
        statuses = Counter(s for t, _, s in health["samples"] if window[0] <= t <= window[1])
        result["healthz"]["statuses"] = {str(k): v for k, v in statuses.items()}
        if health.get("errors"):
            result["healthz"]["errors"] = health["errors"]
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        daemon.stop()
    return result


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(out: dict[str, Any]) -> None:
    print(f"\nflood_latency  label={out['label']}  selectws={out['code'].get('selectws_file')}  "
          f"rev={out['code'].get('git_rev', '?')} (+{out['code'].get('git_dirty_files', '?')} dirty)  "
          f"pinned={out['pinned']}")
    cols = ("scenario", "window s", "echo n", "echo p50", "echo p99", "echo max", "hz n", "hz p50", "hz p99",
            "hz max", "RSS before", "RSS peak", "RSS +2s", "RSS close+2s")
    print("  ".join(f"{c:>11}" for c in cols))
    for name, r in out["scenarios"].items():
        e, h = r.get("echo", {}), r.get("healthz", {})
        row = (name, r.get("window_s"), e.get("count"), e.get("p50_ms"), e.get("p99_ms"), e.get("max_ms"),
               h.get("count"), h.get("p50_ms"), h.get("p99_ms"), h.get("max_ms"), r.get("rss_before_mib"),
               r.get("rss_peak_mib"), r.get("rss_after_2s_mib"), r.get("rss_after_close_2s_mib"))
        print("  ".join(f"{fmt(v):>11}" for v in row))
    print("(latencies in ms, RSS in MiB; only probe samples sent while the flood was in progress)")
    for name, r in out["scenarios"].items():
        if "flood" in r:
            print(f"  {name}: {json.dumps(r['flood'])}")
        if r.get("daemon_warnings"):
            print(f"  {name}: daemon warnings {json.dumps(r['daemon_warnings'])}")
        for probe in ("echo", "healthz"):
            if r.get(probe, {}).get("error") or r.get(probe, {}).get("errors"):
                print(f"  {name}: {probe} errors {r[probe].get('error') or r[probe].get('errors')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the daemon")
    parser.add_argument("--pythonpath", default=None,
                        help="PYTHONPATH of the daemon: the source tree to measure (default: inherited)")
    parser.add_argument("--config", default=None, help="TOML config for the daemon (default: built-in defaults)")
    parser.add_argument("--out", required=True, help="file to append the JSON result line to")
    parser.add_argument("--label", default="", help="free text stored with the result (e.g. before / after)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--probe-interval", type=float, default=0.005)
    parser.add_argument("--healthz-interval", type=float, default=0.02)
    parser.add_argument("--fragment-bytes", type=int, default=1 << 20,
                        help="size of the fragmented message = number of 1-byte frames (default 1 MiB)")
    parser.add_argument("--fragment-messages", type=int, default=1,
                        help="fragmented messages sent back to back (default 1, as in the issue; more = more samples)")
    parser.add_argument("--ping-seconds", type=float, default=5.0)
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="probes run this long before the flood starts")
    parser.add_argument("--flood-timeout", type=float, default=120.0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin daemon to CPU 0 and the load to CPU 1")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    pinned = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    args.daemon_cpu = 0 if pinned else None
    args.load_cpu = 1 if pinned else None
    pin_to(args.load_cpu)
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {"bench": "flood_latency", "label": args.label,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pinned": pinned,
                           "code": describe_code(args.python, args.pythonpath),
                           "params": {"probe_interval_ms": args.probe_interval * 1e3,
                                      "healthz_interval_ms": args.healthz_interval * 1e3,
                                      "fragment_bytes": args.fragment_bytes,
                                      "fragment_messages": args.fragment_messages, "ping_seconds": args.ping_seconds,
                                      "config": args.config},
                           "scenarios": {}}
    for name in scenarios:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            out["scenarios"][name] = run_scenario(name, args, ctx)
        except Exception as exc:  # one failed scenario must not lose the others
            out["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:  # first: the table is printed after, to a pipe that may be gone
        fh.write(json.dumps(out) + "\n")
    print_table(out)
    print(f"result appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
