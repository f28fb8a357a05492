"""The latency the Redis hop adds to a broadcast: publish on daemon A, receive on A vs on B.

Starts a ``redis-server`` on a free port and two ``selectws serve`` daemons sharing it, connects a publisher
and a receiver to A and a receiver to B on ``/broadcast/lat``, then sends ``--messages`` messages one at a time
(the next only once both receivers have the previous one) and prints the median / p90 / p99 time from
``send`` to receipt on each side, and the difference of the medians (the added latency of the hop)::

    python benchmarks/redis_hop_latency.py --messages 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from websockets.sync.client import connect

warnings.filterwarnings("ignore", category=DeprecationWarning)  # connect() without "with" (websockets >= 17.1)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found (apt-get install -y redis-server)")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp(prefix="selectws-hop-")
    try:
        rport = free_port()
        procs.append(subprocess.Popen([redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(rport)
        config = os.path.join(tmp, "selectws.toml")
        with open(config, "w") as fh:
            fh.write(f'[logging]\nlevel = "warning"\n[broker]\nurl = "redis://127.0.0.1:{rport}/0"\n')
        ports = []
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "selectws", "serve", "--port", str(port),
                                           "--config", config], stdout=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            wait_port(port)
        path = "/broadcast/lat"
        pub = connect(f"ws://127.0.0.1:{ports[0]}{path}", ping_interval=None, compression=None)
        local = connect(f"ws://127.0.0.1:{ports[0]}{path}", ping_interval=None, compression=None)
        remote = connect(f"ws://127.0.0.1:{ports[1]}{path}", ping_interval=None, compression=None)
        time.sleep(0.5)  # B's SUBSCRIBE is asynchronous

        received: dict[str, list[float]] = {"local": [], "remote": []}
        events = {"local": threading.Semaphore(0), "remote": threading.Semaphore(0)}

        def reader(name: str, ws: object) -> None:
            for _ in range(args.messages + 1):
                ws.recv()  # type: ignore[attr-defined]
                received[name].append(time.perf_counter())
                events[name].release()

        threads = [threading.Thread(target=reader, args=(n, w), daemon=True)
                   for n, w in (("local", local), ("remote", remote))]
        for t in threads:
            t.start()
        payload = b"x" * args.size
        sent: list[float] = []
        for _ in range(args.messages + 1):  # the first one warms up and is not counted
            sent.append(time.perf_counter())
            pub.send(payload)
            for e in events.values():
                if not e.acquire(timeout=10):
                    sys.exit("a message did not arrive within 10 s")
        result = {}
        for name in ("local", "remote"):
            lat = sorted((r - s) * 1e6 for r, s in zip(received[name][1:], sent[1:], strict=True))
            result[name] = {"p50_us": round(statistics.median(lat), 1), "p90_us": round(lat[len(lat) * 9 // 10], 1),
                            "p99_us": round(lat[len(lat) * 99 // 100], 1)}
        result["added_p50_us"] = round(result["remote"]["p50_us"] - result["local"]["p50_us"], 1)
        result["messages"] = args.messages
        result["loadavg"] = os.getloadavg()
        print(json.dumps(result))
        for ws in (pub, local, remote):
            ws.close()
    finally:
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
