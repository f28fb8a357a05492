"""Measure one server at one load point: start it pinned to a core, run the C client pinned to another, read
/proc for CPU and RSS. Used by benchmarks/matrix/run.py; standard library only, nothing of selectws imported.

Everything is bounded in time: the server must listen within 20 s, the client is killed past its own bounds plus a
margin, the server gets SIGTERM then SIGKILL. Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_SRC = os.path.join(HERE, "wsload.c")
CLK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------- the C client
def cache_dir() -> str:
    """Where the compiled client and the server logs go: $XDG_CACHE_HOME/selectws-bench (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "selectws-bench")


def client_path(src: str = CLIENT_SRC, cache: str | None = None) -> str:
    """The binary's path, named after a hash of the source and the flags, so an edited wsload.c rebuilds."""
    with open(src, "rb") as fh:
        digest = hashlib.sha256(fh.read() + b"|-O2").hexdigest()[:12]
    return os.path.join(cache or cache_dir(), f"wsload-{digest}")


def ensure_client(src: str = CLIENT_SRC, cache: str | None = None) -> str:
    """Compile wsload.c with the system cc (once per source version); return the binary's path."""
    path = client_path(src, cache)
    if os.path.exists(path):
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise SystemExit("no C compiler (cc, gcc or clang) on PATH: install one (e.g. apt-get install gcc)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", tmp, src], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"compiling {src} failed:\n{proc.stderr}")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- /proc readers
def _stat(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])  # ppid, utime+stime (ticks)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a server with worker processes counts whole)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError):
                kids.setdefault(_stat(int(d))[0], []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    t = 0
    for p in pids:
        with contextlib.suppress(OSError):
            t += _stat(p)[1]
    return t / CLK


def rss_kib(pids: list[int]) -> int:
    t = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    t += int(line.split()[1])
                    break
    return t


def cpu_busy() -> dict[str, float]:
    """Busy seconds per CPU from /proc/stat: {'cpu0': s, 'cpu1': s, ...}."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                out[line.split()[0]] = (sum(v[:8]) - v[3] - v[4]) / CLK
    return out


def wait_quiet(max_wait: float, thresh: float = 15.0) -> float:
    """Wait (at most max_wait s) for a nearly idle machine; return the last busy % seen (of 100 * ncpu)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = cpu_busy()
        time.sleep(0.5)
        b1 = cpu_busy()
        busy = sum(b1[k] - b0[k] for k in b1) / 0.5 * 100
        if busy < thresh or time.monotonic() >= deadline:
            return round(busy, 1)


def listening(port: int) -> bool:
    """Whether anything listens on TCP port ``port`` (any address), from /proc/net/tcp{,6}."""
    want = f":{port:04X}"
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def port_free(port: int) -> bool:
    if listening(port):
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def raise_nofile() -> int:
    """Raise this process's open-files soft limit to the hard one (the servers and the client inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pin_prefix(cpu: str | None) -> list[str]:
    """``taskset -c CPU`` when a CPU is given and taskset exists."""
    if cpu in (None, "", "none") or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


# ---------------------------------------------------------------------------------------------- one point
@dataclass
class ServerSpec:
    label: str
    argv: list[str]  # "{port}" is substituted
    sub_path: str = "/sub"
    pub_path: str = "/pub"
    echo_path: str = "/echo"
    cwd: str | None = None
    env: dict[str, str] | None = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class PointSpec:
    name: str
    scenario: str  # echo | large | broadcast | idle | churn
    conns: int = 1
    window: int = 1
    size: int = 64
    duration: float = 6.0
    warmup: float = 2.0
    rate: float = 0.0  # churn
    deflate_fraction: float = 0.0  # churn
    concurrency: int = 0  # churn: most connections in flight
    title: str = ""  # for tables and charts; defaults to name
    metric: str = "msgs_per_s"  # the result key charted
    unit: str = "msg/s"
    better: str = "higher"  # or "lower"

    def params(self) -> dict[str, Any]:
        keys = ["conns", "window", "size", "duration", "warmup"]
        if self.scenario == "churn":
            keys = ["rate", "deflate_fraction", "concurrency", "size", "duration", "warmup"]
        elif self.scenario == "idle":
            keys = ["conns"]
        return {k: getattr(self, k) for k in keys}


def client_argv(client: str, point: PointSpec, server: ServerSpec, port: int, settle: float,
                connect_timeout: float = 30.0) -> list[str]:
    """The wsload command line for one point against one server."""
    argv = [client, "--host", HOST, "--port", str(port), "--path", server.echo_path,
            "--warmup", str(point.warmup), "--duration", str(point.duration), "--connect-timeout", str(connect_timeout)]
    sc = point.scenario
    if sc in ("echo", "large"):
        argv += ["--mode", "echo", "--conns", str(point.conns), "--window", str(point.window),
                 "--size", str(point.size)]
    elif sc == "broadcast":
        argv += ["--mode", "broadcast", "--conns", str(point.conns), "--window", str(point.window),
                 "--size", str(point.size), "--sub-path", server.sub_path, "--pub-path", server.pub_path]
    elif sc == "idle":
        argv += ["--mode", "idle", "--conns", str(point.conns), "--window", "1", "--size", "16",
                 "--hold", str(settle + 1.5)]
    elif sc == "churn":
        argv += ["--mode", "churn", "--rate", str(point.rate), "--deflate-fraction", str(point.deflate_fraction),
                 "--concurrency", str(point.concurrency or max(64, int(point.rate))), "--size", str(point.size),
                 "--conn-timeout", "10"]
    else:
        raise ValueError(f"unknown scenario {sc!r}")
    return argv


def start_server(server: ServerSpec, port: int, cpu: str | None, log: Any) -> subprocess.Popen[bytes]:
    argv = pin_prefix(cpu) + [a.replace("{port}", str(port)) for a in server.argv]
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd=server.cwd, env=server.env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"server exited rc={p.returncode} before listening (log: {log.name})")
        if listening(port):
            return p
        time.sleep(0.05)
    stop_server(p)
    raise RuntimeError(f"server did not listen on {port} within 20 s (log: {log.name})")


def stop_server(p: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's own process group (it was started in a new session), then SIGKILL."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def run_point(point: PointSpec, server: ServerSpec, *, client: str, port: int, server_cpu: str | None,
              client_cpu: str | None, settle: float = 1.0, quiet_wait: float = 3.0,
              log_dir: str | None = None) -> dict[str, Any]:
    """Run one point against one server; return the result record (status "ok" or why not)."""
    log_dir = log_dir or os.path.join(cache_dir(), "logs")
    os.makedirs(log_dir, exist_ok=True)
    res: dict[str, Any] = {"point": point.name, "scenario": point.scenario, "server": server.label,
                           "params": point.params()}
    res["busy_before_pct"] = wait_quiet(quiet_wait)
    logpath = os.path.join(log_dir, f"{server.label}.log")
    with open(logpath, "a") as log:
        log.write(f"=== {time.ctime()} point={point.name} port={port}\n")
        log.flush()
        srv = None
        for attempt in range(3):  # someone else's socket may take the port meanwhile: move on
            while not port_free(port):
                port += 1
            try:
                srv = start_server(server, port, server_cpu, log)
                break
            except RuntimeError as exc:
                if attempt == 2:
                    res["status"] = f"error: {exc}"
                    return res
                port += 1
        assert srv is not None
        res["port"] = port
        try:
            _drive(point, server, srv, client, port, client_cpu, settle, res)
        finally:
            stop_server(srv)
    return res


def _drive(point: PointSpec, server: ServerSpec, srv: subprocess.Popen[bytes], client: str, port: int,
           client_cpu: str | None, settle: float, res: dict[str, Any]) -> None:
    time.sleep(settle)
    spids = process_tree(srv.pid)
    rss0 = rss_kib(spids)
    argv = pin_prefix(client_cpu) + client_argv(client, point, server, port, settle)
    res["client_cmd"] = " ".join(argv)
    cl = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    sel = selectors.DefaultSelector()
    sel.register(cl.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    # The client bounds itself (connect timeout, warmup + duration, drain); this margin only catches a hang.
    limit = time.monotonic() + point.warmup + point.duration + 2 * 30 + settle + 60
    marks: dict[str, tuple[float, float, float, dict[str, float]]] = {}
    result: dict[str, Any] | None = None
    peak = rss0
    next_sample = 0.0
    try:
        while time.monotonic() < limit and result is None:
            ready = sel.select(timeout=0.2)
            now = time.monotonic()
            if point.scenario == "churn" and now >= next_sample:
                peak = max(peak, rss_kib(spids))
                next_sample = now + 0.2
            if not ready:
                if cl.poll() is not None:
                    break
                continue
            line = cl.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            line = line.strip()
            if line in ("START", "END"):
                marks[line] = (time.monotonic(), cpu_seconds(spids), cpu_seconds([cl.pid]), cpu_busy())
            elif line.startswith("READY"):  # idle: every connection open
                time.sleep(settle)
                res["server_rss_before_kib"] = rss0
                res["server_rss_after_kib"] = rss_kib(spids)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
    finally:
        sel.close()
        if cl.poll() is None:
            try:
                cl.wait(10)
            except subprocess.TimeoutExpired:
                cl.kill()
                cl.wait()
    err = (cl.stderr.read() or "").strip()  # type: ignore[union-attr]
    res.update(result if result is not None else {"status": "client-failed"})
    if err:
        res["client_stderr"] = err[-300:]
    if "START" in marks and "END" in marks:
        (t0, s0, c0, b0), (t1, s1, c1, b1) = marks["START"], marks["END"]
        dt = t1 - t0
        res["server_cpu_pct"] = round(100 * (s1 - s0) / dt, 1)
        res["client_cpu_pct"] = round(100 * (c1 - c0) / dt, 1)
        busy = sum(b1[k] - b0[k] for k in b1) / dt * 100
        res["other_cpu_pct"] = round(busy - res["server_cpu_pct"] - res["client_cpu_pct"], 1)
    if point.scenario == "idle" and "server_rss_after_kib" in res and res.get("opened"):
        res["rss_kib_per_conn"] = round((res["server_rss_after_kib"] - rss0) / res["opened"], 2)
    if point.scenario == "churn":
        time.sleep(2.0)  # the last connections are closed; give the server a moment to let go of them
        res["server_rss_before_kib"] = rss0
        res["server_rss_peak_kib"] = max(peak, rss_kib(spids))
        res["server_rss_after_kib"] = rss_kib(spids)
    if srv.poll() is not None:
        res["status"] = f"server-died rc={srv.returncode}"


def command_version(argv: list[str], timeout: float = 30) -> str | None:
    """First line of a command's stdout, or None when it fails."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None


def machine_info() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": model, "ncpu": os.cpu_count(), "kernel": os.uname().release,
            "driver_python": sys.version.split()[0]}
