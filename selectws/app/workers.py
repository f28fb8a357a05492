"""``[server] workers = N``: one supervisor process, N single-threaded worker processes on shared sockets.

The parent binds the listening socket(s) (or takes them from systemd socket activation), then forks N workers
that each run the ordinary :class:`~selectws.server.server.Server` loop on the *same* sockets: every worker
polls them and whoever calls ``accept()`` first gets the connection. One shared accept socket rather than one
``SO_REUSEPORT`` socket per worker: it works unchanged with the socket systemd hands over (one descriptor, bound
once), no connection is ever stranded in the queue of a worker that died (with ``SO_REUSEPORT`` each socket has
its own queue, and what sits in a dead worker's queue is reset), and a restarted worker simply starts accepting
again. The price is that the kernel does not balance connections evenly: an idle worker tends to win the race,
which is the one you want.

Groups span workers only through a broker: the configuration refuses ``workers > 1`` without ``[broker] url``.

The parent owns the conversation with systemd: it sends ``READY=1`` once every worker is listening (each says so
over a pipe), ``WATCHDOG=1`` from its own loop, ``STOPPING=1``, ``RELOADING=1``/``READY=1``; the workers do not
inherit ``NOTIFY_SOCKET`` (so the unit keeps the default ``NotifyAccess=main``). It restarts a worker that exits
or crashes (0.1 s backoff doubling to 30 s, reset once a worker has run for 30 s), forwards ``SIGTERM``/``SIGINT``
and ``SIGHUP`` to the workers, and exits when they have all exited after a stop: status 0 when every worker
exited 0, else 1. Workers that outlive ``shutdown_grace`` + 5 s after a stop are killed.

Liveness. A worker that is alive but not running (its loop stuck in a plugin, the process stopped, swapped out for
good) is not an exit, so the supervisor would never learn of it. Each worker therefore writes one byte to the same
pipe (non-blocking, from a timer of its own event loop: a stuck loop stops beating) every quarter of
``[server] worker_timeout``; the supervisor reads the pipes in its loop and SIGKILLs a worker silent for longer
than ``worker_timeout`` (SIGKILL ends a stopped or hung process too), logging ``worker unresponsive; killing it``
with the slot, the pid and how long it was silent; the reaped worker is then restarted like a crashed one.

Figures. ``/metrics``, ``/readyz`` and ``/admin`` are answered by whichever worker takes the request (the ops
listener is shared like the WebSocket one), yet must describe the instance. The supervisor maps a
:class:`~selectws.server.workerstats.WorkerTable` (shared memory, one slot per worker) before forking; each worker
publishes its figures to its slot every second and right before it answers, and reads the others' from theirs
(selectws/server/opsview.py). The supervisor only clears the slot of a worker that exited. It does not aggregate
over the pipe: the answer would then be a copy of an older moment, and two scrapes landing on workers holding
copies of different ages would see counters go backwards; nor can it answer itself, since it serves no HTTP.

The systemd watchdog is not fooled by a supervisor whose loop runs while a worker does not: the supervisor sends
``WATCHDOG=1`` only while every running worker beat within the ping interval (``WatchdogSec/2``). A worker it
replaces in time (``worker_timeout`` below that) never stops the pings; one it cannot replace (``worker_timeout =
0``, or a SIGKILL that does not take, as in uninterruptible sleep) withholds them, and systemd restarts the unit.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import structlog

from selectws.app.api_key import read_api_key
from selectws.app.hooks import HookLoader
from selectws.app.jwt_keys import load_jwt
from selectws.brokers import broker_factory
from selectws.config import Config, split_host_port
from selectws.plugins.registry import find_plugin
from selectws.server.server import Server
from selectws.server.workerstats import WorkerSlot, WorkerTable
from selectws.transport.listen import bind_listeners, format_address
from selectws.transport.logs import flush_logs, get_logger
from selectws.transport.loop import EventLoop, Timer
from selectws.transport.sdnotify import Notifier, watchdog_interval

__all__ = ["Supervisor", "run_workers"]

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 30.0  # a worker that ran this long resets its slot's backoff
_BEATS_PER_TIMEOUT = 4  # a worker beats every timeout / 4: one late beat is no alarm
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_CHILD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class _WorkerNotifier(Notifier):
    """A worker's "notifier": ``READY=1`` becomes ``R`` on the pipe to the supervisor, a heartbeat ``H``; the rest
    goes nowhere. The pipe stays open for the worker's life (the supervisor sees its end as end-of-file)."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self._fd = fd

    def _write(self, byte: bytes) -> bool:
        try:
            os.write(self._fd, byte)  # non-blocking: a full pipe (a supervisor not reading) loses the byte
        except OSError:
            return False
        return True

    def notify(self, message: str) -> bool:
        return message.startswith("READY=1") and self._write(b"R")

    def beat(self) -> bool:
        """One heartbeat: "this worker's loop ran just now"."""
        return self._write(b"H")


def _beat_every(loop: EventLoop, notifier: _WorkerNotifier, interval: float) -> None:
    """Beat now and then every ``interval`` seconds from a timer of ``loop``: a stuck loop falls silent."""

    def beat() -> None:
        notifier.beat()
        loop.call_later(interval, beat)

    beat()


class Heartbeats:
    """The supervisor's liveness bookkeeping: when each worker slot last gave a sign of life.

    Pure (the caller passes the clock), so it is tested without processes. A slot is watched from its worker's
    start (silence counts from the fork, so a worker stuck before its first beat is caught too) until its worker
    is gone.
    """

    def __init__(self) -> None:
        self._last: dict[int, float] = {}

    def watch(self, slot: int, now: float) -> None:
        """A worker started in ``slot``."""
        self._last[slot] = now

    def beat(self, slot: int, now: float) -> None:
        """A sign of life from the worker in ``slot`` (ignored once it is no longer watched)."""
        if slot in self._last:
            self._last[slot] = now

    def forget(self, slot: int) -> None:
        """The worker in ``slot`` is gone (reaped, or its pipe ended)."""
        self._last.pop(slot, None)

    def silence(self, slot: int, now: float) -> float:
        """Seconds since the last sign of life of ``slot`` (0 when not watched)."""
        last = self._last.get(slot)
        return 0.0 if last is None else max(0.0, now - last)

    def silent(self, now: float, limit: float) -> list[tuple[int, float]]:
        """``(slot, seconds)`` of every watched slot silent for longer than ``limit``, the longest first."""
        found = [(slot, now - last) for slot, last in self._last.items() if now - last > limit]
        return sorted(found, key=lambda item: -item[1])


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.failures = 0
        self.ready = False
        self.pipe_fd = -1
        self.killed_silent = 0.0  # > 0: we SIGKILLed this worker after that many seconds without a heartbeat
        self.timer: Timer | None = None


class _WorkerPipe:
    """The supervisor's end of a worker's pipe (``R`` = ready, ``H`` = heartbeat), in the supervisor's loop."""

    def __init__(self, supervisor: Supervisor, slot: _Slot, fd: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.fd = fd

    def handle_event(self, mask: int) -> None:
        try:
            data = os.read(self.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        supervisor = self.supervisor
        if not data:  # the worker is exiting (or gone): SIGCHLD follows
            supervisor.heartbeats.forget(self.slot.index)
            supervisor._close_pipe(self.slot)
            return
        supervisor.heartbeats.beat(self.slot.index, supervisor.clock())
        if b"R" in data:
            supervisor._worker_ready(self.slot)


def _add_worker_fields(index: int) -> Callable[[Any, str, Any], Any]:
    pid = os.getpid()

    def processor(logger: Any, method_name: str, event_dict: Any) -> Any:
        event_dict.setdefault("worker", index)
        event_dict.setdefault("pid", pid)
        return event_dict

    return processor


def _tag_logs(index: int) -> None:
    """Every log line of this worker carries ``worker`` (slot) and ``pid`` (again after a reload reconfigures)."""
    processors = list(structlog.get_config()["processors"])
    processors.insert(0, _add_worker_fields(index))
    structlog.configure(processors=processors)


class Supervisor:
    """The parent process: binds, forks, supervises (see the module docstring)."""

    def __init__(self, config: Config, sockets: list[socket.socket], reload: Callable[[], Config] | None,
                 hooks: HookLoader | None = None) -> None:
        self.config = config
        self.reload = reload
        self.hooks = hooks  # [[hooks]]: each worker sends its own webhooks (host names resolved before the fork)
        self.log = get_logger("selectws.workers")
        self.loop = EventLoop()
        self.clock: Callable[[], float] = time.monotonic
        self.notifier = Notifier.from_env()
        self.watchdog = watchdog_interval()
        self.worker_timeout = config.server.worker_timeout  # fixed for this supervisor's life (its workers' pace)
        # Workers beat if anyone listens: our own check (worker_timeout) or the systemd watchdog (its interval).
        limits = [t for t in (self.worker_timeout, self.watchdog or 0.0) if t > 0]
        self.beat_interval = min(limits) / _BEATS_PER_TIMEOUT if limits else 0.0
        self.heartbeats = Heartbeats()
        self._watchdog_withheld = False
        for name in _CHILD_ENV:  # the supervisor alone talks to systemd
            os.environ.pop(name, None)
        self.inherited = bool(sockets)
        backlog = config.server.backlog
        self.sockets = sockets or bind_listeners(config.server.host, config.server.port, backlog)
        self.ops_sockets: list[socket.socket] = []
        if config.ops.listen:
            self.ops_sockets = bind_listeners(*split_host_port("ops.listen", config.ops.listen), backlog)
        self.slots = [_Slot(i) for i in range(config.server.workers)]
        self.table = WorkerTable(len(self.slots))  # each worker's figures, shared (mapped before any fork)
        self.parent_pid = os.getpid()
        self.stopping = False
        self.failed_exits = 0
        self.announced = False
        self._kill_timer: Timer | None = None
        self._pipes: dict[int, _WorkerPipe] = {}

    # ------------------------------------------------------------------ running
    def run(self) -> int:
        loop = self.loop
        loop.end_of_iteration.append(flush_logs)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        loop.add_signal_handler(signal.SIGCHLD, self._on_child)
        addresses = [format_address(s.getsockname()) for s in self.sockets]
        self.log.info("supervisor starting", workers=len(self.slots), addresses=addresses,
                      inherited=self.inherited, pid=os.getpid())
        for slot in self.slots:
            self._spawn(slot)
        if self.watchdog:
            self._watchdog(self.watchdog)
        if self.worker_timeout:
            self._check_liveness()
        try:
            loop.run()
        finally:
            for sock in self.sockets + self.ops_sockets:
                sock.close()
            for slot in self.slots:
                self._close_pipe(slot)
            self.table.close()
            flush_logs()
            loop.close()
            self.notifier.close()
        return 1 if self.failed_exits else 0

    def _spawn(self, slot: _Slot) -> None:
        slot.timer = None
        if self.stopping:
            return
        r, w = os.pipe()
        flush_logs()  # nothing buffered may be written twice
        sys.stderr.flush()
        # Signals stay blocked across fork() until the child has dropped the parent's handlers and wakeup fd.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            os.close(r)
            self._child(slot.index, w, blocked)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(w)
        os.set_blocking(r, False)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.ready = False
        slot.killed_silent = 0.0
        slot.pipe_fd = r
        self.heartbeats.watch(slot.index, self.clock())
        pipe = self._pipes[r] = _WorkerPipe(self, slot, r)
        self.loop.register(r, selectors.EVENT_READ, pipe)
        self.log.info("worker started", worker=slot.index, worker_pid=pid)

    def _child(self, index: int, pipe_fd: int, mask: Any) -> None:  # pragma: no cover - runs in the child
        code = 1
        try:
            self.loop.forget_after_fork()
            # A process group of its own: Ctrl-C in a terminal reaches the supervisor only, which forwards it
            # once (two stop signals would cut the drain short). Under systemd, KillMode=mixed (the unit's)
            # likewise signals the main process only.
            os.setpgid(0, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in list(self._pipes):
                try:
                    os.close(fd)
                except OSError:
                    pass
            _tag_logs(index)
            os.set_blocking(pipe_fd, False)
            notifier = _WorkerNotifier(pipe_fd)
            server = Server(self.config, plugins=find_plugin, sockets=self.sockets,
                            ops_sockets=self.ops_sockets or None, notifier=notifier,
                            broker=broker_factory(self.config.broker),
                            reload=None if self.reload is None else _reload_and_tag(self.reload, index),
                            hooks=self.hooks, api_key=read_api_key, jwt=load_jwt,
                            worker_stats=WorkerSlot(self.table, index))
            _watch_parent(server, self.parent_pid)
            if self.beat_interval:
                _beat_every(server.loop, notifier, self.beat_interval)
            server.run()
            code = 0
        except BaseException as exc:  # the worker must end in os._exit, whatever happened
            try:
                get_logger("selectws.workers").error("worker failed", error=str(exc),
                                                     traceback=traceback.format_exc())
            except Exception:
                pass
        finally:
            try:
                flush_logs()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _close_pipe(self, slot: _Slot) -> None:
        fd = slot.pipe_fd
        if fd < 0:
            return
        slot.pipe_fd = -1
        self._pipes.pop(fd, None)
        self.loop.unregister(fd)
        os.close(fd)

    def _worker_ready(self, slot: _Slot) -> None:
        slot.ready = True
        if not self.announced and all(s.ready for s in self.slots):
            self.announced = True
            pids = [s.pid for s in self.slots]
            self.log.info("workers ready", workers=len(pids), pids=pids)
            self.notifier.ready(status=f"{len(pids)} workers serving (pids {', '.join(map(str, pids))})")

    # ------------------------------------------------------------------ signals
    def _on_child(self, signum: int) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            self._exited(slot, status)
        if self.stopping and not any(s.pid for s in self.slots):
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            self.log.info("all workers exited", failed=self.failed_exits)
            self.loop.stop()

    def _exited(self, slot: _Slot, status: int) -> None:
        pid, slot.pid = slot.pid, 0
        self.heartbeats.forget(slot.index)
        self.table.clear(slot.index)  # its figures go with it (its replacement starts its series from 0)
        self._close_pipe(slot)
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        if self.stopping:
            if code != 0:
                self.failed_exits += 1
            self.log.info("worker exited", worker=slot.index, worker_pid=pid, exit=how)
            return
        ran = time.monotonic() - slot.started
        if ran >= _HEALTHY_AFTER:
            slot.failures = 0
        delay = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** slot.failures)
        slot.failures += 1
        cause = {"cause": f"unresponsive for {slot.killed_silent:.1f} s"} if slot.killed_silent else {}
        self.log.error("worker died; restarting", worker=slot.index, worker_pid=pid, exit=how,
                       ran=round(ran, 3), restart_in=round(delay, 3), **cause)
        slot.timer = self.loop.call_later(delay, lambda: self._spawn(slot))

    def _on_stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.stopping:
            self.stopping = True
            self.log.info("stop signal: stopping workers", signal=name)
            self.notifier.send("STOPPING=1")
            for slot in self.slots:
                if slot.timer is not None:
                    slot.timer.cancel()
                    slot.timer = None
            grace = self.config.timeouts.shutdown_grace + 5.0
            self._kill_timer = self.loop.call_later(grace, self._kill_remaining)
            # The workers close their copies when they start draining; with ours closed too, new connections
            # are refused at once (as with one process) instead of waiting in a backlog nobody accepts from.
            # Under socket activation systemd keeps its own copy, and clients wait for the next start.
            for sock in self.sockets:
                sock.close()
            self.sockets = []
        self._forward(signum)
        if not any(s.pid for s in self.slots):
            self.loop.stop()

    def _kill_remaining(self) -> None:
        self.log.warning("workers still running after the grace period; killing them",
                         pids=[s.pid for s in self.slots if s.pid])
        self._forward(signal.SIGKILL)

    def _on_reload(self, signum: int) -> None:
        self.notifier.reloading()
        if self.reload is not None:
            try:
                self.config = self.reload()  # for workers started from now on
            except Exception as exc:
                self.log.error("reload failed; keeping the running configuration", error=str(exc),
                               key=getattr(exc, "key", None))
        self._forward(signum)
        self.notifier.ready(status=f"reload forwarded to {sum(1 for s in self.slots if s.pid)} workers")

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ liveness
    def _check_liveness(self) -> None:
        """Every ``beat_interval``: SIGKILL each worker silent for longer than ``worker_timeout`` (once; SIGCHLD
        then reaps and restarts it). Beats read in this iteration are already counted: the loop runs the I/O
        handlers before the timers, so a supervisor that was itself stalled does not blame its workers."""
        self.loop.call_later(self.beat_interval, self._check_liveness)
        for index, silent in self.heartbeats.silent(self.clock(), self.worker_timeout):
            slot = self.slots[index]
            if not slot.pid or slot.killed_silent:
                continue
            slot.killed_silent = silent
            self.log.error("worker unresponsive; killing it", worker=index, worker_pid=slot.pid,
                           silent=round(silent, 3), worker_timeout=self.worker_timeout)
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` every ``interval``, but only while every running worker beat within ``interval``."""
        self.loop.call_later(interval, lambda: self._watchdog(interval))
        silent = [(i, s) for i, s in self.heartbeats.silent(self.clock(), interval) if self.slots[i].pid]
        if not silent:
            if self._watchdog_withheld:
                self._watchdog_withheld = False
                self.log.info("workers beating again; watchdog pings resumed")
            self.notifier.watchdog()
            return
        if not self._watchdog_withheld:
            self._watchdog_withheld = True
            index, seconds = silent[0]
            self.log.error("worker silent; withholding the systemd watchdog ping", worker=index,
                           worker_pid=self.slots[index].pid, silent=round(seconds, 3),
                           worker_timeout=self.worker_timeout)


def _reload_and_tag(reload: Callable[[], Config], index: int) -> Callable[[], Config]:
    """A worker's reload: ``reload``, then tag the log lines again (the reload may have reconfigured logging)."""

    def reload_and_tag() -> Config:
        config = reload()
        _tag_logs(index)
        return config

    return reload_and_tag


def _watch_parent(server: Server, parent: int) -> None:
    """A worker whose supervisor is gone (SIGKILL, a crash) drains and exits instead of holding the port forever.

    Under systemd, KillMode=mixed also kills what is left of the unit; elsewhere this is the only way out.
    """

    def check() -> None:
        if os.getppid() != parent:
            if not server.draining:
                server.log.warning("supervisor gone; stopping", supervisor=parent)
                server.shutdown()
            return
        server.loop.call_later(1.0, check)

    server.loop.call_later(1.0, check)


def run_workers(config: Config, sockets: list[socket.socket], reload: Callable[[], Config] | None,
                hooks: HookLoader | None = None) -> int:
    """Bind (unless ``sockets`` came from systemd), fork ``config.server.workers`` workers, supervise them.

    ``reload`` re-reads the configuration on SIGHUP, in the supervisor (for workers started later) and in each
    worker. Each worker builds its own broker (its own connections to Redis) from the configuration it starts with.
    """
    return Supervisor(config, sockets, reload, hooks).run()
