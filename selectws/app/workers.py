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

from selectws.brokers import broker_factory
from selectws.config import Config, split_host_port
from selectws.plugins.registry import find_plugin
from selectws.server.server import Server
from selectws.transport.listen import bind_listeners, format_address
from selectws.transport.logs import flush_logs, get_logger
from selectws.transport.loop import EventLoop, Timer
from selectws.transport.sdnotify import Notifier, watchdog_interval

__all__ = ["Supervisor", "run_workers"]

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 30.0
_HEALTHY_AFTER = 30.0  # a worker that ran this long resets its slot's backoff
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_CHILD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class _WorkerNotifier(Notifier):
    """A worker's "notifier": ``READY=1`` becomes one byte on the pipe to the supervisor; the rest goes nowhere."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self._fd = fd

    def notify(self, message: str) -> bool:
        if self._fd >= 0 and message.startswith("READY=1"):
            try:
                os.write(self._fd, b"R")
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1
            return True
        return False


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.failures = 0
        self.ready = False
        self.ready_fd = -1
        self.timer: Timer | None = None


class _ReadyPipe:
    """The supervisor's end of a worker's ready pipe, in the supervisor's loop."""

    def __init__(self, supervisor: Supervisor, slot: _Slot, fd: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.fd = fd

    def handle_event(self, mask: int) -> None:
        try:
            data = os.read(self.fd, 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.supervisor._worker_ready(self.slot)
        self.supervisor._close_ready(self.slot)


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

    def __init__(self, config: Config, sockets: list[socket.socket], reload: Callable[[], Config] | None) -> None:
        self.config = config
        self.reload = reload
        self.log = get_logger("selectws.workers")
        self.loop = EventLoop()
        self.notifier = Notifier.from_env()
        self.watchdog = watchdog_interval()
        for name in _CHILD_ENV:  # the supervisor alone talks to systemd
            os.environ.pop(name, None)
        self.inherited = bool(sockets)
        backlog = config.server.backlog
        self.sockets = sockets or bind_listeners(config.server.host, config.server.port, backlog)
        self.ops_sockets: list[socket.socket] = []
        if config.ops.listen:
            self.ops_sockets = bind_listeners(*split_host_port("ops.listen", config.ops.listen), backlog)
        self.slots = [_Slot(i) for i in range(config.server.workers)]
        self.parent_pid = os.getpid()
        self.stopping = False
        self.failed_exits = 0
        self.announced = False
        self._kill_timer: Timer | None = None
        self._pipes: dict[int, _ReadyPipe] = {}

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
        try:
            loop.run()
        finally:
            for sock in self.sockets + self.ops_sockets:
                sock.close()
            for slot in self.slots:
                self._close_ready(slot)
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
        slot.ready_fd = r
        pipe = self._pipes[r] = _ReadyPipe(self, slot, r)
        self.loop.register(r, selectors.EVENT_READ, pipe)
        self.log.info("worker started", worker=slot.index, worker_pid=pid)

    def _child(self, index: int, ready_fd: int, mask: Any) -> None:  # pragma: no cover - runs in the child
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
            server = Server(self.config, plugins=find_plugin, sockets=self.sockets,
                            ops_sockets=self.ops_sockets or None, notifier=_WorkerNotifier(ready_fd),
                            broker=broker_factory(self.config.broker),
                            reload=None if self.reload is None else _reload_and_tag(self.reload, index))
            _watch_parent(server, self.parent_pid)
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

    def _close_ready(self, slot: _Slot) -> None:
        fd = slot.ready_fd
        if fd < 0:
            return
        slot.ready_fd = -1
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
        self._close_ready(slot)
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
        self.log.error("worker died; restarting", worker=slot.index, worker_pid=pid, exit=how,
                       ran=round(ran, 3), restart_in=round(delay, 3))
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

    def _watchdog(self, interval: float) -> None:
        self.notifier.watchdog()
        self.loop.call_later(interval, lambda: self._watchdog(interval))


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


def run_workers(config: Config, sockets: list[socket.socket], reload: Callable[[], Config] | None) -> int:
    """Bind (unless ``sockets`` came from systemd), fork ``config.server.workers`` workers, supervise them.

    ``reload`` re-reads the configuration on SIGHUP, in the supervisor (for workers started later) and in each
    worker. Each worker builds its own broker (its own connections to Redis) from the configuration it starts with.
    """
    return Supervisor(config, sockets, reload).run()
