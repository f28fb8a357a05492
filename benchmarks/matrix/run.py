#!/usr/bin/env python3
"""Run selectws and its peers side by side at every load point; append JSON lines, print a table, draw a chart.

    python benchmarks/matrix/run.py [--quick] [--peer-python PYTHON] [--servers selectws,websockets,picows]
                                    [--points echo-c1-w1,...] [--out FILE.jsonl] [--chart FILE.png]
    python benchmarks/matrix/run.py --report FILE.jsonl     # redraw the table and chart of the file's last run

selectws is this checkout's daemon (``python -m selectws serve``, shipped defaults, run by the interpreter running
this script, with the checkout first on PYTHONPATH); the peers (python-websockets, picows on uvloop) run under
``--peer-python`` (default: this interpreter) and are skipped, saying so, when their packages are missing there.
The server is pinned to one core and the C load client (wsload.c, compiled on first use) to another. The points
run one after the other, every server in turn at each point. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import measure  # noqa: E402
import report  # noqa: E402
from measure import PointSpec, ServerSpec  # noqa: E402

POINT_IDS = ["echo-c1-w1", "echo-c100-w1", "echo-c100-w64", "echo-1mib-w4", "broadcast-1000", "idle", "churn"]


def build_points(a: argparse.Namespace) -> list[PointSpec]:
    d, w = a.duration, a.warmup
    pts = [
        PointSpec("echo-c1-w1", "echo", conns=1, window=1, duration=d, warmup=w, metric="p50_us", unit="µs",
                  better="lower", title="echo, 1 conn, 1 in flight: p50 round trip"),
        PointSpec("echo-c100-w1", "echo", conns=100, window=1, duration=d, warmup=w,
                  title="echo, 100 conns, 1 in flight"),
        PointSpec("echo-c100-w64", "echo", conns=100, window=64, duration=d, warmup=w,
                  title="echo, 100 conns, 64 in flight"),
        PointSpec("echo-1mib-w4", "large", conns=1, window=4, size=1 << 20, duration=d, warmup=w, metric="MB_per_s",
                  unit="MB/s", title="echo 1 MiB binary, 4 in flight"),
        PointSpec("broadcast-1000", "broadcast", conns=a.broadcast_subs, window=16, duration=d, warmup=w,
                  metric="deliveries_per_s", unit="deliveries/s",
                  title=f"broadcast, 1 publisher → {a.broadcast_subs} subscribers"),
        PointSpec("idle", "idle", conns=a.idle_conns, duration=0, warmup=0, metric="rss_kib_per_conn",
                  unit="KiB/conn", better="lower", title=f"{a.idle_conns:,} idle connections: server RSS each"),
        PointSpec("churn", "churn", rate=a.churn_rate, deflate_fraction=a.churn_deflate, duration=a.churn_duration,
                  warmup=min(2.0, w), concurrency=max(64, int(a.churn_rate)), metric="server_cpu_pct", unit="% CPU",
                  better="lower",
                  title=f"churn {a.churn_rate:g} conns/s for {a.churn_duration:g} s, {a.churn_deflate:.0%} deflate: "
                        "server CPU"),
    ]
    wanted = a.points.split(",") if a.points else POINT_IDS
    unknown = set(wanted) - set(POINT_IDS)
    if unknown:
        raise SystemExit(f"unknown point(s) {sorted(unknown)}; choose from {POINT_IDS}")
    return [p for p in pts if p.name in wanted]


def _clean_env(extra_path: str | None = None) -> dict[str, str]:
    """The environment of a server: no SELECTWS_* overrides, no inherited socket activation."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SELECTWS_", "LISTEN_")) and k != "NOTIFY_SOCKET"}
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _probe(python: str, code: str, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """Run ``code`` (printing one JSON object) under ``python``; None if it fails (package missing)."""
    try:
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


VERSIONS = ("import json, sys, importlib.metadata as m\n"
            "out = {'python': sys.version.split()[0]}\n"
            "for n in NAMES:\n"
            "    out[n] = m.version(n)\n"
            "print(json.dumps(out))\n")


def _git_commit() -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=20, env=env)
        if head.returncode != 0:
            return "unknown"
        st = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "selectws"],
                            capture_output=True, text=True, timeout=20, env=env)
        return head.stdout.strip() + ("-dirty" if st.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def build_servers(a: argparse.Namespace) -> tuple[list[ServerSpec], list[str]]:
    """The servers to run and the notes on those skipped."""
    wanted = a.servers.split(",")
    known = ["selectws", "websockets", "picows"]
    if set(wanted) - set(known):
        raise SystemExit(f"unknown server(s) {sorted(set(wanted) - set(known))}; choose from {known}")
    out, skipped = [], []
    if "selectws" in wanted:
        env = _clean_env(ROOT)
        v = _probe(sys.executable, "import json, sys, selectws\n"
                   "print(json.dumps({'python': sys.version.split()[0], 'selectws': selectws.__version__, "
                   "'file': selectws.__file__}))", env)
        if v is None:
            raise SystemExit(f"{sys.executable} cannot import selectws from {ROOT} (its dependencies: "
                             "pip install -e .)")
        if not os.path.abspath(v.pop("file")).startswith(os.path.join(ROOT, "selectws")):
            print(f"note: {sys.executable} imports selectws from outside this checkout", file=sys.stderr)
        out.append(ServerSpec("selectws", [sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1",
                                           "--port", "{port}"],
                              sub_path="/broadcast/bench", pub_path="/broadcast/bench", cwd=ROOT, env=env,
                              versions={"selectws": v["selectws"], "selectws_commit": _git_commit(),
                                        "selectws_python": v["python"]}))
    peers = {
        "websockets": (["websockets"], "srv_websockets.py"),
        "picows": (["picows", "uvloop"], "srv_picows.py"),
    }
    for name, (pkgs, script) in peers.items():
        if name not in wanted:
            continue
        v = _probe(a.peer_python, VERSIONS.replace("NAMES", repr(pkgs)), _clean_env())
        if v is None:
            skipped.append(f"{name}: skipped, {a.peer_python} lacks {' / '.join(pkgs)} "
                           f"(point --peer-python at a venv with: pip install {' '.join(pkgs)})")
            continue
        versions = {f"{name}_python": v.pop("python"), **v}
        out.append(ServerSpec(name, [a.peer_python, os.path.join(HERE, "servers", script), "--port", "{port}"],
                              cwd=HERE, env=_clean_env(), versions=versions))
    return out, skipped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 s points, 1,000 idle connections, churn 500/s for 3 s")
    p.add_argument("--servers", default="selectws,websockets,picows", help="comma-separated (default: all three)")
    p.add_argument("--points", help=f"comma-separated subset of {','.join(POINT_IDS)}")
    p.add_argument("--peer-python", default=sys.executable,
                   help="the python that runs the peer servers (needs websockets; picows and uvloop for picows)")
    p.add_argument("--out", help="JSON lines to append to (default: benchmarks/results/<date>.jsonl)")
    p.add_argument("--chart", help="PNG to write (default: the --out path with .png)")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--report", metavar="JSONL", help="only print the table and draw the chart of this file's last run")
    p.add_argument("--run-id", help="with --report: that run instead of the last one")
    p.add_argument("--duration", type=float, help="seconds measured per point (default 6; --quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (default 2; --quick 0.5)")
    p.add_argument("--idle-conns", type=int, help="idle point: connections (default 10000; --quick 1000; at most "
                   "the open-files limit less 1,000: 19,000 where it is 20,000)")
    p.add_argument("--broadcast-subs", type=int, default=1000)
    p.add_argument("--churn-rate", type=float, help="churn point: connections per second (default 2000; --quick 500)")
    p.add_argument("--churn-duration", type=float, help="churn point: seconds measured (default 30; --quick 3)")
    p.add_argument("--churn-deflate", type=float, default=0.5, help="share of churn connections offering "
                   "permessage-deflate (default 0.5)")
    p.add_argument("--server-cpu", default="0", help="core the server is pinned to ('none': not pinned)")
    p.add_argument("--client-cpu", default="1", help="core the load client is pinned to ('none': not pinned)")
    p.add_argument("--port", type=int, default=21000, help="first port tried (below the ephemeral range)")
    p.add_argument("--quiet-wait", type=float, default=3.0,
                   help="before each point, wait up to this many seconds for an idle machine")
    return p


def finish(records: list[dict[str, Any]], out: str | None, chart: str | None, no_chart: bool) -> None:
    table = report.markdown(records)
    print()
    print(table)
    if out:
        md = os.path.splitext(out)[0] + ".md"
        with open(md, "w") as fh:
            fh.write(table)
        print(f"table: {md}")
    if not no_chart and chart:
        path = report.chart(records, chart)
        if path:
            print(f"chart: {path}")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.report:
        records = report.load_run(a.report, a.run_id)
        if not records:
            raise SystemExit(f"no records in {a.report}")
        finish(records, None, a.chart or os.path.splitext(a.report)[0] + ".png", a.no_chart)
        return 0
    a.duration = a.duration if a.duration is not None else (2.0 if a.quick else 6.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 2.0)
    a.idle_conns = a.idle_conns or (1000 if a.quick else 10000)
    a.churn_rate = a.churn_rate or (500.0 if a.quick else 2000.0)
    a.churn_duration = a.churn_duration or (3.0 if a.quick else 30.0)
    if not 0 <= a.churn_deflate <= 1:
        raise SystemExit("--churn-deflate must be within 0..1")
    nofile = measure.raise_nofile()
    if a.idle_conns > nofile - 1000 or a.broadcast_subs > nofile - 1000:
        raise SystemExit(f"--idle-conns / --broadcast-subs must stay below the open-files limit ({nofile}) less "
                         "1,000 (server and client each hold one descriptor per connection)")
    ncpu = os.cpu_count() or 1
    for flag, cpu in (("--server-cpu", a.server_cpu), ("--client-cpu", a.client_cpu)):
        if cpu != "none" and (not cpu.isdigit() or int(cpu) >= ncpu):
            raise SystemExit(f"{flag} {cpu}: this machine has CPUs 0..{ncpu - 1} (or say 'none')")
    if a.server_cpu == a.client_cpu and a.server_cpu != "none":
        print("warning: server and client pinned to the same core; figures will be halved", file=sys.stderr)
    if not measure.pin_prefix("0"):
        print("warning: taskset not found: server and client are not pinned", file=sys.stderr)

    date = datetime.datetime.now().astimezone()
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"{date:%Y-%m-%d}.jsonl")
    chart = a.chart or os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    points = build_points(a)
    servers, skipped = build_servers(a)
    for note in skipped:
        print(note, file=sys.stderr)
    if not servers:
        raise SystemExit("no server to run")
    client = measure.ensure_client()
    cc = measure.command_version([os.environ.get("CC") or "cc", "--version"]) or "?"
    versions: dict[str, str] = {"cc": cc}
    for s in servers:
        versions.update(s.versions)
    common = {
        "run_id": date.isoformat(timespec="seconds"), "date": date.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), os.path.relpath(os.path.abspath(__file__), ROOT)]
                              + (argv if argv is not None else sys.argv[1:])),
        "versions": versions, **measure.machine_info(), "server_cpu": a.server_cpu, "client_cpu": a.client_cpu,
        "quick": a.quick, "skipped": skipped,
    }
    cpu = None if a.server_cpu == "none" else a.server_cpu
    ccpu = None if a.client_cpu == "none" else a.client_cpu
    print(f"{len(points)} points x {len(servers)} servers ({', '.join(s.label for s in servers)}); results -> {out}")
    records = []
    port = a.port
    n, total = 0, len(points) * len(servers)
    t_start = time.monotonic()
    for point in points:
        for server in servers:
            n += 1
            print(f"[{n}/{total}] {point.name} :: {server.label} ...", end=" ", flush=True)
            try:
                res = measure.run_point(point, server, client=client, port=port, server_cpu=cpu, client_cpu=ccpu,
                                        quiet_wait=a.quiet_wait)
            except Exception as exc:  # record it and go on with the next point
                res = {"point": point.name, "scenario": point.scenario, "server": server.label,
                       "params": point.params(), "status": f"error: {exc!r}"}
            port = res.get("port", port) + 1
            res.update(common)
            res["title"] = point.title or point.name
            res["server_cmd"] = shlex.join(a.replace("{port}", str(res.get("port", "{port}"))) for a in server.argv)
            res["metric"] = {"key": point.metric, "value": res.get(point.metric), "unit": point.unit,
                             "better": point.better}
            with open(out, "a") as fh:
                fh.write(json.dumps(res, sort_keys=True, ensure_ascii=False) + "\n")
            records.append(res)
            figure = report.cell(res)
            ccpu_s = f", client CPU {res['client_cpu_pct']:.0f} %" if "client_cpu_pct" in res else ""
            print(f"{figure}{ccpu_s}", flush=True)
            if res.get("client_stderr"):
                print(f"    client stderr: {res['client_stderr'][-200:]!r}", flush=True)
    print(f"done in {time.monotonic() - t_start:.0f} s")
    for note in skipped:
        print(note)
    finish(records, out, chart, a.no_chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
