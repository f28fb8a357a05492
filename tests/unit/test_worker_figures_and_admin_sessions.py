"""The pieces behind one-instance figures with workers and the admin page's sessions, without processes or sockets
(except the one ``fork`` that shows the table is shared).

* :class:`WorkerTable`: what one process writes another reads; never a torn sample; a cleared slot is empty.
* :func:`merge_metrics`: one exposition document, every family once, every sample labelled with its worker.
* :class:`OpsView` of two "workers" on one table (two views in this process): whichever answers a scrape, the
  totals are the sum and never go backwards.
* :func:`readiness` and the admin session tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import pytest

from selectws.protocol.http11 import Headers
from selectws.server.admin import AdminConsole
from selectws.server.metrics import MetricsWriter
from selectws.server.opsview import STALE_AFTER, OpsView, readiness
from selectws.server.stats import BrokerStats, ServerStats
from selectws.server.workerstats import WorkerSlot, WorkerTable, merge_metrics
from selectws.transport.loop import EventLoop

MEMORY = BrokerStats(kind="memory", up=True, status=None, dropped=0, reconnects=0)


def _stats(**changes: Any) -> ServerStats:
    idle = ServerStats(
        started_at=1_700_000_000.0, draining=False, accepted=0, accept_errors=0, rejected={}, handshake_failures=0,
        messages_in=0, messages_out=0, plugin_errors=0, slow_consumers_dropped=0, close_codes={}, bytes_in=0,
        bytes_out=0, sockets_open=0, handshaking=0, open_by_route={"/echo": 0}, groups=0, write_buffer_bytes=0,
        loop_iterations=0, loop_lag_max=0.0, timers=0, broker=MEMORY,
    )
    return replace(idle, **changes)


# ---------------------------------------------------------------------------------------------- the table
def test_a_slot_holds_the_latest_sample_and_a_cleared_one_nothing() -> None:
    table = WorkerTable(3, slot_size=4096)
    assert [table.read(i) for i in range(3)] == [None, None, None]
    for n in range(5):  # both halves get written in turn
        assert table.write(1, b"sample %d" % n)
        assert table.read(1) == b"sample %d" % n
    assert table.read(0) is None and table.read(2) is None
    assert not table.write(2, b"x" * (table.capacity + 1))  # too big: refused, nothing half-written
    assert table.read(2) is None
    table.clear(1)
    assert table.read(1) is None
    table.close()


def test_a_corrupted_sample_is_never_returned() -> None:
    table = WorkerTable(1, slot_size=4096)
    table.write(0, b"good")
    table.write(0, b"newer")
    current = table._mm[table._base(0)]  # the index of the current half
    at = table._half(0, current) + 16
    table._mm[at] = ord("N")  # as if a reader caught a write in the middle
    assert table.read(0) is None  # not b"Newer"


def test_what_a_forked_child_writes_the_parent_reads() -> None:
    table = WorkerTable(2, slot_size=4096)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        table.write(1, json.dumps({"worker": 1, "pid": os.getpid()}).encode())
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(table.read(1) or b"{}") == {"worker": 1, "pid": pid}


# ---------------------------------------------------------------------------------------------- metrics text
def test_merge_labels_every_sample_with_its_worker_and_keeps_each_family_once() -> None:
    def text(n: int) -> str:
        w = MetricsWriter()
        w.counter("selectws_messages_received_total", "Messages.", n)
        w.family("selectws_connections_open", "gauge", "Open.", [((("route", "/a b{c}"),), n)])
        return w.render()

    merged = merge_metrics([(0, text(3)), (1, text(4))], [("age", "gauge", "Age.", [(0, 0.5), (1, 0)])])
    assert merged.count("# TYPE selectws_messages_received_total counter") == 1
    assert 'selectws_messages_received_total{worker="0"} 3' in merged
    assert 'selectws_messages_received_total{worker="1"} 4' in merged
    assert 'selectws_connections_open{worker="1",route="/a b{c}"} 4' in merged
    assert 'age{worker="0"} 0.5' in merged
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(merged)}
    assert sum(s.value for s in families["selectws_messages_received"].samples) == 7


def test_two_workers_on_one_table_answer_alike_and_never_go_backwards() -> None:
    table = WorkerTable(2)
    counts = [0, 0]
    loops = [EventLoop(), EventLoop()]
    views = [
        OpsView(loops[i], lambda i=i: _stats(messages_in=counts[i], accepted=counts[i]), lambda: True, dict,
                WorkerSlot(table, i))
        for i in range(2)
    ]

    def total(text: str) -> float:
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("selectws_messages_received_total{"))

    seen = []
    for step in range(12):
        counts[step % 2] += step + 1  # traffic on one worker, then the other
        seen.append(total(views[(step * 7) % 2].metrics_text()))  # the scrape lands on either
    assert seen == sorted(seen), seen
    for view in views:  # each published just now: whichever answers, the exact sum
        view.metrics_text()
    assert total(views[0].metrics_text()) == total(views[1].metrics_text()) == sum(counts)
    for loop in loops:
        loop.close()


# ---------------------------------------------------------------------------------------------- readiness
def _sample(worker: int, why: str = "ready", age: float = 0.0, now: float = 1000.0) -> dict[str, Any]:
    return {"worker": worker, "pid": 100 + worker, "at": now - age, "why": why,
            "broker": {"status": "broker redis x: down" if why == "broker down" else None}}


def test_readiness_needs_every_running_worker_and_ignores_a_stale_one() -> None:
    assert readiness([_sample(0), _sample(1)], 1000.0) == (
        True, "ready", ["worker 0 pid 100: ready", "worker 1 pid 101: ready"])
    ok, first, lines = readiness([_sample(0), _sample(1, "broker down")], 1000.0)
    assert (ok, first) == (False, "broker down") and lines[1] == "worker 1 pid 101: broker down (broker redis x: down)"
    ok, first, lines = readiness([_sample(0), _sample(1, "draining", age=STALE_AFTER + 1)], 1000.0)
    assert ok and lines[1].startswith("worker 1 pid 101: no figures for 4.0 s")
    assert readiness([_sample(0, "draining")], 1000.0)[:2] == (False, "draining")


# ---------------------------------------------------------------------------------------------- admin sessions
class _Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _console(key: str | None = "k" * 24) -> AdminConsole:
    console = AdminConsole(None, None, _Log)  # type: ignore[arg-type]
    console.configure(True, key)
    return console


def test_a_session_token_is_signed_with_the_key_and_expires() -> None:
    console = _console()
    token = console.issue(now=1_000_000.0)
    assert console.valid(token, now=1_000_000.0 + 3600)
    assert not console.valid(token, now=1_000_000.0 + 12 * 3600 + 1)  # 12 hours at most
    payload, _, mac = token.rpartition(".")
    assert not console.valid(f"{payload}.{'0' * len(mac)}", now=1_000_000.0)
    later = payload.replace("v1.1043200.", "v1.9043200.")
    assert not console.valid(f"{later}.{mac}", now=1_000_000.0)  # the expiry is signed too
    assert not console.valid("", now=0) and not console.valid("v1.x.y.z", now=0)
    assert console.authenticated(Headers([("Cookie", f"other=1; selectws_admin={console.issue()}")]))
    console.configure(True, "another key of enough length")
    assert not console.valid(token, now=1_000_000.0)  # a new key ends every session
    console.configure(False, "k" * 24)
    assert not console.enabled and not console.valid(console.issue(), now=0)


def test_the_key_is_checked_exactly() -> None:
    console = _console("right-key")
    assert console.check_key("right-key")
    assert not console.check_key("right-ke") and not console.check_key("") and not console.check_key("right-key ")
