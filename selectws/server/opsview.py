"""What ``/metrics``, ``/readyz`` and the admin page report: this process's figures, or the whole instance's when
it runs as one of ``[server] workers = N`` (selectws/app/workers.py).

A *sample* is one process's figures at one moment, as a JSON-able dict: connections by route, message counters
and rates, loop lag, the busiest groups, broker and webhook state, whether it is ready, and -- in a worker -- the
Prometheus text of its metrics. :class:`OpsView` takes one whenever asked and, once a second from a timer of the
loop, works out the rates (messages per second over the last tick) and the loop lag (the longest iteration since
the last tick). The timer runs in a worker always (each worker publishes its sample to the shared
:class:`~selectws.server.workerstats.WorkerTable`, so that whichever worker takes a request answers for all), and
in a single process only while someone watches the admin page.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from selectws.server.metrics import render_metrics
from selectws.server.stats import ServerStats
from selectws.server.workerstats import WorkerSlot, merge_metrics
from selectws.transport.loop import EventLoop, Timer

__all__ = ["STALE_AFTER", "TICK", "TOP_GROUPS", "OpsView", "readiness"]

TICK = 1.0  # seconds between samples (rates, lag, a worker's publication, an admin snapshot)
STALE_AFTER = 3.0  # a worker whose latest sample is older is not running its loop: shown, not counted as ready
TOP_GROUPS = 10


def _why_not_ready(stats: ServerStats, listening: bool) -> str:
    if stats.draining:
        return "draining"
    if not listening:
        return "not listening"
    if not stats.broker.up:
        return "broker down"
    return "ready"


def readiness(samples: list[dict[str, Any]], now: float) -> tuple[bool, str, list[str]]:
    """The instance's readiness from its workers' samples: ``(ready, first line, one line per worker)``.

    Ready while every worker with a fresh sample (at most :data:`STALE_AFTER` old) is: listening, not draining,
    its broker up. A worker with a stale sample (its loop is not running; the supervisor will replace it) is
    listed but not counted: it accepts nothing meanwhile, so the others serve. The answer does not depend on which
    worker gives it (up to the age of the samples, a second).
    """
    lines, first = [], "ready"
    fresh = 0
    for sample in samples:
        age = max(0.0, now - float(sample["at"]))
        where = f"worker {sample['worker']} pid {sample['pid']}"
        if age > STALE_AFTER:
            lines.append(f"{where}: no figures for {age:.1f} s (not counted)")
            continue
        fresh += 1
        why = str(sample["why"])
        status = sample["broker"].get("status")
        lines.append(f"{where}: {why}" + (f" ({status})" if why == "broker down" and status else ""))
        if why != "ready" and first == "ready":
            first = why
    if not fresh and first == "ready":
        first = "no worker"
    return first == "ready", first, lines


class OpsView:
    """This process's operator figures; with a :class:`WorkerSlot`, every worker's (see the module docstring)."""

    def __init__(self, loop: EventLoop, stats: Callable[[], ServerStats], listening: Callable[[], bool],
                 groups: Callable[[], Mapping[str, Mapping[int, Any]]], worker: WorkerSlot | None = None,
                 log: Callable[[], Any] | None = None) -> None:
        self.loop = loop
        self.stats = stats
        self.listening = listening
        self.groups = groups
        self.worker = worker
        self._log = log
        self.in_rate: float | None = None
        self.out_rate: float | None = None
        self.lag = 0.0  # the longest loop iteration during the last tick, seconds
        self._prev: tuple[float, int, int] | None = None  # (loop time, messages in, messages out) at the last tick
        self._timer: Timer | None = None
        self._watchers = 0
        self._too_big_warned = False
        #: Called after every tick (the admin feed sends its snapshot).
        self.on_tick: list[Callable[[], None]] = []
        if worker is not None:  # a worker publishes always: from its first iteration (it is listening by then)
            loop.call_soon(self._tick)

    # ------------------------------------------------------------------ the timer
    def watch(self) -> None:
        """Someone watches (an admin page): tick from now on."""
        self._watchers += 1
        if self.worker is not None:
            self.worker.table.watched_until = time.time() + 3 * TICK
        if self._timer is None and self.worker is None:
            self._prev = None
            self.in_rate = self.out_rate = None
            self._baseline()
            self._timer = self.loop.call_later(TICK, self._tick)

    def unwatch(self) -> None:
        self._watchers = max(0, self._watchers - 1)
        if not self._watchers and self.worker is None and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _baseline(self) -> None:
        stats = self.stats()
        self._prev = (self.loop.now, stats.messages_in, stats.messages_out)
        self.loop.lag_peak = 0.0

    def _tick(self) -> None:
        loop = self.loop
        self._timer = loop.call_later(TICK, self._tick) if (self.worker is not None or self._watchers) else None
        stats = self.stats()
        now = loop.now
        prev = self._prev
        if prev is not None and now > prev[0]:
            elapsed = now - prev[0]
            self.in_rate = max(0, stats.messages_in - prev[1]) / elapsed
            self.out_rate = max(0, stats.messages_out - prev[2]) / elapsed
        self._prev = (now, stats.messages_in, stats.messages_out)
        self.lag = loop.lag_peak
        loop.lag_peak = 0.0
        if self.worker is not None:
            if self._watchers:  # the other workers list their busiest groups too (for a few seconds)
                self.worker.table.watched_until = time.time() + 3 * TICK
            self._publish(self.sample(stats))
        for callback in list(self.on_tick):
            callback()

    # ------------------------------------------------------------------ samples
    def _top_groups(self) -> list[list[Any]]:
        worker = self.worker
        if worker is not None and not self._watchers and worker.table.watched_until < time.time():
            return []  # O(groups), and only the admin page shows it: not while nobody watches
        groups = self.groups()
        top = heapq.nlargest(TOP_GROUPS, groups.items(), key=lambda item: len(item[1]))
        return [[name, len(members)] for name, members in top if members]

    def sample(self, stats: ServerStats | None = None) -> dict[str, Any]:
        """This process's figures now (the rates and the lag are those of the last tick)."""
        stats = self.stats() if stats is None else stats
        broker = stats.broker
        why = _why_not_ready(stats, self.listening())
        sample: dict[str, Any] = {
            "worker": None if self.worker is None else self.worker.index,
            "pid": os.getpid(),
            "at": time.time(),
            "started_at": stats.started_at,
            "ready": why == "ready",
            "why": why,
            "routes": dict(stats.open_by_route),
            "connections": stats.connections_open,
            "accepted": stats.accepted,
            "messages_in": stats.messages_in,
            "messages_out": stats.messages_out,
            "in_rate": self.in_rate,
            "out_rate": self.out_rate,
            "lag": self.lag,
            "lag_max": stats.loop_lag_max,
            "slow_consumers_dropped": stats.slow_consumers_dropped,
            "budget_dropped": stats.budget_dropped,
            "write_buffer_bytes": stats.write_buffer_bytes,
            "groups": stats.groups,
            "top_groups": self._top_groups(),
            "broker": {"kind": broker.kind, "up": broker.up, "status": broker.status, "dropped": broker.dropped,
                       "reconnects": broker.reconnects},
            "hooks": [{"url": h.url, "queued": h.queued, "sent": h.sent, "failed": h.failed, "dropped": h.dropped,
                       "failing": h.failing} for h in stats.hooks],
        }
        if self.worker is not None:
            sample["metrics"] = render_metrics(stats)
        return sample

    def _publish(self, sample: dict[str, Any]) -> None:
        assert self.worker is not None
        payload = json.dumps(sample, separators=(",", ":")).encode("utf-8")
        if self.worker.write(payload):
            return
        if not self._too_big_warned and self._log is not None:
            self._too_big_warned = True
            self._log().warning("worker figures too large for the shared table; publishing them without metrics",
                                size=len(payload), capacity=self.worker.table.capacity)
        slim = dict(sample, metrics="", top_groups=sample["top_groups"][:3])
        self.worker.write(json.dumps(slim, separators=(",", ":")).encode("utf-8"))

    def samples(self) -> list[dict[str, Any]]:
        """Every worker's sample (this one taken now, and published first), or this process's alone."""
        own = self.sample()
        if self.worker is None:
            return [own]
        self._publish(own)
        out = []
        for slot, data in self.worker.read_all():
            if slot == self.worker.index:
                out.append(own)
                continue
            try:
                out.append(json.loads(data))
            except ValueError:  # cannot happen (the table checks a CRC); a missing row is better than a 500
                continue
        return out

    # ------------------------------------------------------------------ what the endpoints answer
    def metrics_text(self) -> str:
        """``/metrics``: this process's, or every worker's series labelled ``worker="<slot>"``."""
        if self.worker is None:
            return render_metrics(self.stats())
        samples = self.samples()
        now = time.time()
        texts = [(int(s["worker"]), str(s["metrics"])) for s in samples if s.get("metrics")]
        ages = [(int(s["worker"]), round(max(0.0, now - float(s["at"])), 3)) for s in samples]
        return merge_metrics(texts, [(
            "selectws_worker_sample_age_seconds", "gauge",
            "How old the figures of each worker are in this answer (they are published every second; the worker "
            "that answers gives its own at once).", ages,
        )])

    def dashboard(self) -> dict[str, Any]:
        """The admin page's snapshot: totals, per-route connections, busiest groups, broker, hooks, workers."""
        samples = self.samples()
        now = time.time()
        routes: dict[str, int] = {}
        groups: dict[str, int] = {}
        hooks: dict[str, dict[str, Any]] = {}
        totals = {"connections": 0, "accepted": 0, "messages_in": 0, "messages_out": 0, "slow_consumers_dropped": 0,
                  "budget_dropped": 0, "write_buffer_bytes": 0, "groups": 0}
        in_rate: float | None = None
        out_rate: float | None = None
        rows = []
        for s in samples:
            for path, n in s["routes"].items():
                routes[path] = routes.get(path, 0) + int(n)
            for name, n in s["top_groups"]:
                groups[name] = groups.get(name, 0) + int(n)
            for key in totals:
                totals[key] += int(s[key])
            if s["in_rate"] is not None:
                in_rate = (in_rate or 0.0) + float(s["in_rate"])
                out_rate = (out_rate or 0.0) + float(s["out_rate"] or 0.0)
            for hook in s["hooks"]:
                seen = hooks.setdefault(hook["url"], {"url": hook["url"], "queued": 0, "sent": 0, "failed": 0,
                                                      "dropped": 0, "failing": False})
                for key in ("queued", "sent", "failed", "dropped"):
                    seen[key] += int(hook[key])
                seen["failing"] = bool(seen["failing"] or hook["failing"])
            rows.append({
                "worker": s["worker"], "pid": s["pid"], "age": round(max(0.0, now - float(s["at"])), 3),
                "why": s["why"], "connections": s["connections"], "in_rate": s["in_rate"],
                "out_rate": s["out_rate"], "lag": s["lag"], "lag_max": s["lag_max"], "broker_up": s["broker"]["up"],
                "groups": s["groups"], "started_at": s["started_at"],
            })
        brokers = [s["broker"] for s in samples]
        down = [b for b in brokers if not b["up"]]
        ready, why, _ = readiness(samples, now)
        # A group with members on several workers is in each worker's count: the sum is exact with one process,
        # or when every worker listed all its groups (10 or fewer); else it is an upper bound.
        if all(int(s["groups"]) <= len(s["top_groups"]) for s in samples):
            totals["groups"] = len(groups)
            groups_exact = True
        else:
            groups_exact = len(samples) == 1
        own = samples[0] if self.worker is None else next(s for s in samples if s["worker"] == self.worker.index)
        return {
            "t": now,
            "served_by": {"worker": own["worker"], "pid": own["pid"]},
            "started_at": min(float(s["started_at"]) for s in samples),
            "ready": ready,
            "why": why,
            "totals": dict(totals, in_rate=in_rate, out_rate=out_rate,
                           lag=max(float(s["lag"]) for s in samples),
                           lag_max=max(float(s["lag_max"]) for s in samples)),
            "routes": routes,
            "top_groups": sorted(groups.items(), key=lambda item: (-item[1], item[0]))[:TOP_GROUPS],
            "groups_exact": groups_exact,
            "broker": {
                "kind": brokers[0]["kind"], "up": not down,
                "status": (down[0] if down else brokers[0])["status"],
                "dropped": sum(int(b["dropped"]) for b in brokers),
                "reconnects": sum(int(b["reconnects"]) for b in brokers),
            },
            "hooks": list(hooks.values()),
            "workers": rows if self.worker is not None else [],
        }
