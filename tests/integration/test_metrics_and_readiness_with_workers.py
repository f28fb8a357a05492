"""``/metrics`` and ``/readyz`` of ``selectws serve --workers 2`` describe the instance, whichever worker answers.

Issue 16: each worker answered a scrape with its own figures only, so the counters of one Prometheus target jumped
up and down with the worker that happened to accept the scrape. Now every worker publishes its figures to memory
shared with the others (selectws/server/workerstats.py) and the worker that takes a request answers for all:
``/metrics`` gives every worker's series labelled ``worker="<slot>"``, and ``/readyz`` is 200 only while every
running worker is ready, with a line per worker.

Real daemon, real Redis (``workers > 1`` needs a broker); skipped without ``redis-server`` (failed under CI=true).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from browsertools import redis_process
from wstools import connect, http_exchange

TIMEOUT = 10.0
Series = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture
def redis_url() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server not installed; required under CI=true", pytrace=False)
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    with redis_process() as (url, proc):
        yield url, proc


def _config(url: str, extra: str = "") -> str:
    return f"""
    [server]
    worker_timeout = 30.0

    [ops]
    listen = "127.0.0.1:0"

    [broker]
    url = "{url}"
    reconnect_min = 0.2
    reconnect_max = 1.0
    {extra}
    """


def _ops_port(daemon: Any) -> int:
    return int(daemon.wait_for(event="listening")["ops_addresses"][0].rpartition(":")[2])


def _get(port: int, path: str) -> Any:
    return http_exchange(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())


def _parse(text: str) -> tuple[dict[Series, float], dict[str, str]]:
    """Samples by (name, sorted labels), and each family's TYPE."""
    samples: dict[Series, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            name, _, rest = head.partition("{")
            labels: list[tuple[str, str]] = []
            for part in rest.rstrip("}").split('",') if rest else []:
                key, _, val = part.partition("=")
                labels.append((key, val.strip('"')))
            samples[(name, tuple(sorted(labels)))] = float(value)
    return samples, types


def _total(samples: dict[Series, float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _wait_until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_of_two_workers_are_one_instance_and_never_go_backwards(start_daemon: Any, redis_url: Any) -> None:
    d = start_daemon(_config(redis_url[0]), extra_args=("--workers", "2"))
    pids = d.wait_for(event="workers ready", timeout=15)["pids"]
    ops = _ops_port(d)
    http_requests = 0
    scrapes: list[tuple[dict[Series, float], dict[str, str]]] = []

    def scrape() -> dict[Series, float]:
        nonlocal http_requests
        reply = _get(ops, "/metrics")
        http_requests += 1
        assert reply.status == 200, reply
        scrapes.append(_parse(reply.body.decode()))
        return scrapes[-1][0]

    made = sent = 0
    for round_ in range(4):
        with ExitStack() as stack:
            clients = [stack.enter_context(connect(d.url("/echo"))) for _ in range(8)]  # open at once: both workers
            made += len(clients)
            for i in range(5):
                for n, ws in enumerate(clients):
                    ws.send(f"{round_}.{n}.{i}")
                    assert ws.recv(timeout=TIMEOUT) == f"{round_}.{n}.{i}"
                    sent += 1
                scrape()
        scrape()
    served = {r["pid"] for r in d.logs(event="open")}
    assert served == set(pids), f"the clients did not reach both workers: {served} of {pids}"

    time.sleep(1.5)  # every worker has published since the clients left (once a second)
    final = scrape()

    # One target, every worker's series: every sample is labelled with its worker, both workers are there.
    workers = {dict(labels).get("worker") for _, labels in final}
    assert workers == {"0", "1"}, workers
    # The totals are what the clients did (the accepted count includes the scrapes on the ops listener).
    assert _total(final, "selectws_messages_received_total") == sent
    assert _total(final, "selectws_messages_sent_total") == sent
    assert _total(final, "selectws_connections_closed_total") == made
    assert _total(final, "selectws_connections_accepted_total") == made + http_requests
    assert _total(final, "selectws_connections_open") == 0
    # Counters never go backwards from one scrape to the next, whichever worker answered each.
    for (before, types), (after, _) in itertools.pairwise(scrapes):
        for series, value in before.items():
            if types.get(series[0]) == "counter" and series in after:
                assert after[series] >= value, f"{series} went from {value} to {after[series]}"
    counter_totals = [_total(s, "selectws_messages_received_total") for s, _ in scrapes]
    assert counter_totals == sorted(counter_totals), counter_totals
    print(f"{len(scrapes)} scrapes; messages received per scrape (sum over workers): {counter_totals}")


def test_readyz_answers_for_every_worker(start_daemon: Any, redis_url: Any) -> None:
    url, redis = redis_url
    d = start_daemon(_config(url), extra_args=("--workers", "2"), allow_errors=True)
    pids = d.wait_for(event="workers ready", timeout=15)["pids"]
    ops = _ops_port(d)
    _wait_until(lambda: all(f"pid {p}: ready" in _get(ops, "/readyz").body.decode() for p in pids),
                "both workers ready")
    for _ in range(10):  # whichever worker takes it, the same answer
        reply = _get(ops, "/readyz")
        lines = reply.body.decode().splitlines()
        assert reply.status == 200, reply
        assert lines[0] == "ready" and sorted(lines[1:]) == sorted(
            f"worker {i} pid {pid}: ready" for i, pid in _slots(d, pids).items()), lines
        assert reply.header("X-Broker") == "up"

    # A worker whose loop does not run (stopped) is listed, not counted: the other one serves meanwhile.
    victim = pids[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        reply = _wait_until(lambda: (r := _get(ops, "/readyz")) and "not counted" in r.body.decode() and r,
                            "the stopped worker's figures to go stale")
        assert reply.status == 200, reply
        assert f"pid {victim}: no figures for" in reply.body.decode()
    finally:
        os.kill(victim, signal.SIGCONT)
    _wait_until(lambda: f"pid {victim}: ready" in _get(ops, "/readyz").body.decode(), "the worker back")

    # Redis gone: every worker's broker is down, so every answer is 503, whichever worker gives it.
    redis.kill()
    redis.wait(5)
    _wait_until(lambda: _get(ops, "/readyz").body.decode().count(": broker down") == 2,
                "both workers to see (and publish, within a second) that the broker is down")
    for _ in range(6):
        reply = _get(ops, "/readyz")
        lines = reply.body.decode().splitlines()
        assert reply.status == 503 and lines[0] == "broker down", lines
        assert all(": broker down" in line for line in lines[1:]) and len(lines) == 3, lines
        assert reply.header("X-Broker") == "down" and reply.header("Retry-After") == "5"
    # /healthz stays "the loop is alive": 200.
    assert _get(ops, "/healthz").status == 200


def _slots(daemon: Any, pids: list[int]) -> dict[int, int]:
    """Worker slot -> pid, from the supervisor's ``worker started`` lines."""
    return {r["worker"]: r["worker_pid"] for r in daemon.logs(event="worker started") if r["worker_pid"] in pids}
