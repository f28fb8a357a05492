"""How long a hung Redis goes unnoticed: SIGSTOP the redis-server under two daemons and time the broker going down.

Starts a ``redis-server`` on a free port (127.0.0.1) and two ``selectws serve`` daemons A and B sharing it
(``[broker]`` defaults: ``health_timeout`` 3 s, ``connect_timeout`` 5 s, ``reconnect_min`` 0.5 s, unless
``--health-timeout`` says otherwise). A publisher on A sends ``--rate`` messages a second to ``/broadcast/hung``
(``--rate 0``: none, so the broker's connections are idle and only its PINGs can notice); a receiver on A (local
delivery) and one on B (through Redis) record what arrives. Each run:

1. waits until both brokers are up (``selectws_broker_up`` 1) and delivery flows, then sends Redis ``SIGSTOP``;
2. polls ``/metrics`` of A and B every 10 ms until ``selectws_broker_up`` is 0 on each: **detect_a**, **detect_b**
   (seconds from SIGSTOP; the polling adds up to ~10 ms plus a scrape);
3. keeps Redis stopped ``--stop`` seconds in all (10, as in the issue), then ``SIGCONT``, and polls until both are
   up again: **recover** (seconds from SIGCONT until both are up);
4. reports the longest gap in local delivery on A while Redis was stopped, the messages A counted as dropped
   (``selectws_broker_dropped_total``), how many of the messages sent before SIGCONT reached B after it (late,
   with the worst lateness), and A's and B's warning lines of the run.

One JSON line per run, then a summary line (min / median / max of the detection times). Bounded: every wait has
a timeout and the whole script gives up after ``--max-seconds``::

    python benchmarks/hung_broker.py --runs 5            # 500 messages/s, Redis stopped 10 s per run
    python benchmarks/hung_broker.py --runs 5 --rate 0 --stop 5   # idle connections
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from typing import Any

from websockets.sync.client import connect

warnings.filterwarnings("ignore", category=DeprecationWarning)  # connect() without "with" (websockets >= 17.1)

UP = 'selectws_broker_up{broker="redis"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def poll(ports: list[int], want: float, timeout: float) -> list[float | None]:
    """Seconds until ``selectws_broker_up`` equals ``want`` on each port (None: not within ``timeout``)."""
    start = time.monotonic()
    found: list[float | None] = [None] * len(ports)
    while None in found and time.monotonic() - start < timeout:
        for i, port in enumerate(ports):
            if found[i] is None and metrics(port).get(UP) == want:
                found[i] = round(time.monotonic() - start, 3)
        time.sleep(0.01)
    return found


def warnings_in(path: str, offset: int) -> tuple[list[str], int]:
    """The events of the warning (and worse) lines logged since ``offset`` bytes, and the new offset."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
            events.append(str(record.get("event")))
    return events, offset + len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stop", type=float, default=10.0, help="seconds Redis stays stopped (default 10)")
    ap.add_argument("--rate", type=float, default=500.0,
                    help="messages a second published on A (default 500; 0: none, the connections are idle)")
    ap.add_argument("--health-timeout", type=float, default=None, help="[broker] health_timeout (default: unset)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long (default 300)")
    args = ap.parse_args()
    give_up = time.monotonic() + args.max_seconds

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found (apt-get install -y redis-server)")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="selectws-hung-")
    stop = threading.Event()
    redis: subprocess.Popen[bytes] | None = None
    try:
        rport = free_port()
        redis = subprocess.Popen([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        wait_port(rport)
        config = os.path.join(tmp, "selectws.toml")
        extra = f"health_timeout = {args.health_timeout}\n" if args.health_timeout else ""
        with open(config, "w") as fh:
            fh.write(f'[logging]\nlevel = "info"\n[broker]\nurl = "redis://127.0.0.1:{rport}/0"\n{extra}')
        ports, logs = [], []
        for name in ("a", "b"):
            port = free_port()
            log = os.path.join(tmp, f"{name}.log")
            with open(log, "wb") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", str(port),
                     "--config", config, "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=err))
            ports.append(port)
            logs.append(log)
        for port in ports:
            wait_port(port)
        path = "/broadcast/hung"
        pub = connect(f"ws://127.0.0.1:{ports[0]}{path}", ping_interval=None, compression=None)
        local = connect(f"ws://127.0.0.1:{ports[0]}{path}", ping_interval=None, compression=None)
        remote = connect(f"ws://127.0.0.1:{ports[1]}{path}", ping_interval=None, compression=None)

        received: dict[str, list[tuple[float, float]]] = {"local": [], "remote": []}  # (sent at, received at)
        lock = threading.Lock()

        def reader(name: str, ws: Any) -> None:
            while not stop.is_set():
                try:
                    message = ws.recv(timeout=0.5)
                except TimeoutError:
                    continue
                except Exception:  # closed at the end
                    return
                now = time.monotonic()
                with lock:
                    received[name].append((float(message), now))

        def publisher() -> None:
            interval = 1.0 / args.rate
            next_at = time.monotonic()
            while not stop.is_set():
                pub.send(repr(time.monotonic()))
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

        threads = [threading.Thread(target=reader, args=(n, w), daemon=True)
                   for n, w in (("local", local), ("remote", remote))]
        if args.rate > 0:
            threads.append(threading.Thread(target=publisher, daemon=True))
        for t in threads:
            t.start()

        results = []
        offsets = [0, 0]
        for run in range(args.runs):
            if time.monotonic() + args.stop + 30 > give_up:
                print(json.dumps({"run": run, "skipped": "--max-seconds reached"}), flush=True)
                break
            if None in poll(ports, 1.0, 30.0):
                sys.exit("a broker did not come up within 30 s")
            # Delivery flows through Redis again; a random phase against the broker's PING timer (every second).
            time.sleep(1.0 + random.random())
            for i in range(2):
                _, offsets[i] = warnings_in(logs[i], offsets[i])
            dropped_before = metrics(ports[0])["selectws_broker_dropped_total"]
            stopped_at = time.monotonic()
            redis.send_signal(signal.SIGSTOP)
            try:
                detect = poll(ports, 0.0, args.stop)
                time.sleep(max(0.0, stopped_at + args.stop - time.monotonic()))
            finally:
                redis.send_signal(signal.SIGCONT)
            resumed_at = time.monotonic()
            recover = poll(ports, 1.0, 30.0)
            time.sleep(1.0)
            with lock:
                local_times = [r for s, r in received["local"] if stopped_at <= r <= resumed_at]
                late = [r - s for s, r in received["remote"] if s < resumed_at <= r]
            gaps = [b - a for a, b in zip([stopped_at, *local_times], [*local_times, resumed_at], strict=True)]
            local_max_gap = round(max(gaps), 3) if args.rate > 0 else None
            run_warnings = []
            for i in range(2):
                events, offsets[i] = warnings_in(logs[i], offsets[i])
                run_warnings.append(events)
            result = {
                "run": run, "stop_s": args.stop, "rate": args.rate, "detect_a": detect[0], "detect_b": detect[1],
                "recover_a": recover[0], "recover_b": recover[1],
                "local_delivered_while_stopped": len(local_times), "local_max_gap_s": local_max_gap,
                "dropped_a": int(metrics(ports[0])["selectws_broker_dropped_total"] - dropped_before),
                "late_at_b": len(late), "late_at_b_max_s": round(max(late), 3) if late else 0.0,
                "warnings_a": run_warnings[0], "warnings_b": run_warnings[1], "loadavg": os.getloadavg(),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
        detections = [r[k] for r in results for k in ("detect_a", "detect_b") if r[k] is not None]
        missed = sum(r[k] is None for r in results for k in ("detect_a", "detect_b"))
        print(json.dumps({"summary": "seconds from SIGSTOP to selectws_broker_up 0", "n": len(detections),
                          "missed": missed, "min": min(detections, default=None),
                          "median": statistics.median(detections) if detections else None,
                          "max": max(detections, default=None)}), flush=True)
        stop.set()
        for ws in (pub, local, remote):
            ws.close()
    finally:
        stop.set()
        if redis is not None and redis.poll() is None:
            redis.send_signal(signal.SIGCONT)
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
