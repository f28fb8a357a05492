"""The supervisor's liveness bookkeeping, driven without worker processes: a fake clock, a recorded ``os.kill``.

The process-level behaviour (a SIGSTOPped worker killed, logged and replaced) is in
``tests/integration/test_worker_liveness.py``.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from selectws.app import workers
from selectws.app.workers import Heartbeats, Supervisor, _beat_every, _WorkerNotifier
from selectws.config import ConfigError, parse_config
from selectws.transport.loop import EventLoop


def _rounded(found: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(slot, round(seconds, 6)) for slot, seconds in found]


def test_heartbeats_silence_counts_from_the_start_and_the_last_beat() -> None:
    hb = Heartbeats()
    hb.watch(0, 100.0)
    hb.watch(1, 100.0)
    assert hb.silent(100.9, 1.0) == []
    hb.beat(1, 100.8)
    assert _rounded(hb.silent(101.5, 1.0)) == [(0, 1.5)]  # a worker that never beat is silent too
    assert hb.silence(1, 101.5) == pytest.approx(0.7)
    assert [slot for slot, _ in hb.silent(103.0, 1.0)] == [0, 1]  # the longest silence first
    hb.forget(0)
    assert _rounded(hb.silent(103.0, 1.0)) == [(1, 2.2)]
    hb.beat(0, 103.0)  # a late byte from a worker that is gone does not bring it back
    assert hb.silence(0, 104.0) == 0.0
    hb.watch(0, 103.0)  # its replacement starts with a clean slate
    assert _rounded(hb.silent(103.5, 1.0)) == [(1, 2.7)]


def test_a_worker_beats_from_its_loop_timer_and_not_otherwise() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    loop = EventLoop()
    try:
        notifier = _WorkerNotifier(w)
        _beat_every(loop, notifier, 0.01)
        assert os.read(r, 100) == b"H"  # at once
        for _ in range(200):  # bounded: about 5 beats in 0.05 s
            loop.run_once(0.05)
            if loop.iterations >= 5:
                break
        beats = os.read(r, 100)
        assert set(beats) == {ord("H")} and len(beats) >= 3
        with pytest.raises(BlockingIOError):  # the loop is not running: no beat
            os.read(r, 100)
        assert notifier.ready(status="ignored") is True
        assert os.read(r, 100) == b"R"
        os.close(r)
        assert notifier.beat() is False  # the supervisor is gone (EPIPE): never raises into the loop
    finally:
        loop.close()
        os.close(w)


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, e, fields in self.lines if e == event]


class _Notifier:
    def __init__(self) -> None:
        self.pings = 0

    def watchdog(self) -> bool:
        self.pings += 1
        return True


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    for name in workers._CHILD_ENV:  # the supervisor takes these out of os.environ: restore them afterwards
        monkeypatch.delenv(name, raising=False)
    config = parse_config({"server": {"workers": 2, "worker_timeout": 2},
                           "broker": {"url": "redis://127.0.0.1:1/0"}})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sup = Supervisor(config, [sock], None)
    try:
        yield sup
    finally:
        sup.loop.close()
        sock.close()


def test_a_silent_worker_is_killed_once_and_its_restart_says_why(
        supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = supervisor
    log = sup.log = _Log()
    assert sup.beat_interval == 0.5  # worker_timeout / 4 (no systemd watchdog here)
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    now = [1000.0]
    sup.clock = lambda: now[0]
    for slot, pid in zip(sup.slots, (4242, 4343), strict=True):
        slot.pid = pid
        sup.heartbeats.watch(slot.index, now[0])

    now[0] = 1001.9
    sup.heartbeats.beat(1, now[0])
    sup._check_liveness()
    assert killed == []  # 1.9 s < worker_timeout

    now[0] = 1002.1
    sup._check_liveness()
    assert killed == [(4242, signal.SIGKILL)]  # slot 0 never beat; slot 1 did, 0.2 s ago
    [line] = log.events("worker unresponsive; killing it")
    assert line == {"worker": 0, "worker_pid": 4242, "silent": 2.1, "worker_timeout": 2.0}

    now[0] = 1003.0
    sup._check_liveness()
    assert killed == [(4242, signal.SIGKILL)]  # not again while it is being reaped

    sup._exited(sup.slots[0], signal.SIGKILL)  # the wait status of a process killed by SIGKILL
    [died] = log.events("worker died; restarting")
    assert died["worker_pid"] == 4242 and died["exit"] == "signal SIGKILL"
    assert died["cause"] == "unresponsive for 2.1 s"
    assert sup.slots[0].pid == 0 and sup.heartbeats.silence(0, now[0]) == 0.0
    assert sup.slots[0].timer is not None  # the restart, after the usual backoff
    sup.slots[0].timer.cancel()

    now[0] = 1010.0
    sup._check_liveness()
    assert killed == [(4242, signal.SIGKILL), (4343, signal.SIGKILL)]  # slot 1 fell silent since


def test_the_watchdog_is_pinged_only_while_every_worker_beats(supervisor: Supervisor) -> None:
    sup = supervisor
    log = sup.log = _Log()
    pings = _Notifier()
    sup.notifier = pings  # type: ignore[assignment]
    now = [50.0]
    sup.clock = lambda: now[0]
    for slot, pid in zip(sup.slots, (4242, 4343), strict=True):
        slot.pid = pid
        sup.heartbeats.watch(slot.index, now[0])

    now[0] = 50.4
    sup._watchdog(0.5)
    assert pings.pings == 1

    now[0] = 50.6  # both silent for 0.6 s > the ping interval
    sup.heartbeats.beat(1, now[0])
    sup._watchdog(0.5)
    sup._watchdog(0.5)
    assert pings.pings == 1
    [line] = log.events("worker silent; withholding the systemd watchdog ping")
    assert line["worker"] == 0 and line["worker_pid"] == 4242 and line["silent"] == 0.6

    sup.heartbeats.beat(0, now[0])
    sup._watchdog(0.5)
    assert pings.pings == 2
    assert log.events("workers beating again; watchdog pings resumed")

    sup.slots[0].pid = 0  # a slot waiting for its restart is not silent: it has no process
    sup.heartbeats.forget(0)
    now[0] = 50.9
    sup.heartbeats.beat(1, now[0])
    sup._watchdog(0.5)
    assert pings.pings == 3


@pytest.mark.parametrize("value", [0.5, -1])
def test_worker_timeout_is_0_or_at_least_a_second(value: float) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"worker_timeout": value}})
    assert info.value.key == "server.worker_timeout"
    assert str(info.value) in (f"server.worker_timeout: must be 0 (off) or >= 1, got {value!r}",
                               f"server.worker_timeout: must be >= 0, got {value!r}")
    assert parse_config({"server": {"worker_timeout": 0}}).server.worker_timeout == 0.0
    assert parse_config({}).server.worker_timeout == 10.0
