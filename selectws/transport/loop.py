"""The event loop: one ``selectors.DefaultSelector``, a timer heap, signals through a wakeup fd.

It is deliberately boring. Each registered file object carries a handler in ``SelectorKey.data`` whose
``handle_event(mask)`` is called when the selector reports it. A connection is its own timer (:class:`TimerEntry`,
:meth:`EventLoop.arm`): the loop keeps the entries due in the same tick (under 1/128 of their delay) in one
bucket, a list threaded through the entries themselves, so a connection's timer costs two pointers and no object,
and moving or dropping it is O(1). Other timers are :class:`Timer` objects in a heap (one per bucket among them),
ordered by their ``deadline`` (no tuple and no sequence number per entry), cancelled lazily: a cancelled timer
drops its callback at once, and the heap is rebuilt without the cancelled entries when they are most of it, as
asyncio does. Signal handlers only write the signal number to a socketpair (:func:`signal.set_wakeup_fd`), and the
loop runs the Python-level handler between iterations, so no code ever runs inside a signal handler and no system
call is ever interrupted half-way. After the I/O callbacks, signal handlers and timers of an iteration,
``end_of_iteration`` hooks run (the server flushes every connection that got output, one ``send`` per connection
for all of it). ``after_batch`` hooks also run after every :data:`BATCH` I/O callbacks of a long iteration (the
server flushes there too, so that a reply does not wait for thousands of other reads). :meth:`EventLoop.run`
repeats :meth:`EventLoop.run_once`, which a test may call itself to step the loop.
"""

from __future__ import annotations

import heapq
import math
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["BATCH", "EventLoop", "Handler", "Timer"]

#: The ``after_batch`` hooks run after every BATCH I/O callbacks of an iteration. It bounds how long output produced
#: early in an iteration of many ready sockets waits for the rest of it (the server's replies: at most 32 reads and
#: their handling, not the whole iteration). It is also what keeps the interrupts of deferred socket-buffer frees
#: away when the peers are local: Linux frees a read buffer on the CPU that allocated it, and interrupts that CPU
#: once 32 are waiting for it (net.core.skb_defer_max, 64 by default, halved); a peer that got its replies after
#: at most 32 reads sends again, and frees them itself first (docs/performance.md).
BATCH = 32


class Handler(Protocol):
    def handle_event(self, mask: int) -> None: ...


# The heap is rebuilt without its cancelled entries when it holds more than _MIN_SCHEDULED_TIMERS entries and more
# than this fraction of them are cancelled (asyncio's BaseEventLoop: _MIN_SCHEDULED_TIMER_HANDLES and
# _MIN_CANCELLED_TIMER_HANDLES_FRACTION).
_MIN_SCHEDULED_TIMERS = 100
_EVENT_READ = selectors.EVENT_READ
_EVENT_WRITE = selectors.EVENT_WRITE
_EPOLLIN = getattr(select, "EPOLLIN", 1)
_EPOLLOUT = getattr(select, "EPOLLOUT", 4)
_MIN_CANCELLED_TIMERS_FRACTION = 0.5


class Timer:
    """A scheduled callback; :meth:`cancel` makes the loop skip it.

    A cancelled (or fired) timer holds nothing: :meth:`cancel` drops the callback at once, so an object that is its
    own timer callback is freed when its last other reference goes, not when the deadline would have passed.
    ``when`` may be moved later in place ("re-armed"): the loop re-queues the timer when its old deadline comes.
    The heap orders timers by ``deadline``, the ``when`` they were queued with, which never changes in the heap.
    """

    __slots__ = ("_loop", "callback", "deadline", "when")

    def __init__(self, when: float, callback: Callable[[], None], loop: EventLoop | None = None) -> None:
        self.when = self.deadline = when
        self.callback: Callable[[], None] | None = callback
        self._loop = loop  # the loop whose heap holds this timer, while it is live there; None afterwards

    def __lt__(self, other: Timer) -> bool:
        return self.deadline < other.deadline

    @property
    def cancelled(self) -> bool:
        """Cancelled, or fired: either way it will not run (again)."""
        return self.callback is None

    def cancel(self) -> None:
        if self.callback is None:
            return
        self.callback = None
        loop = self._loop
        if loop is not None:
            self._loop = None
            loop._timer_cancelled()


#: The deadline of a :class:`TimerEntry` is rounded up to a tick of its delay's scale: a power of two between
#: 1/256 and 1/128 of the delay (1/8 s for a 20 s keepalive), and at least 2**_MIN_TICK_EXPONENT s (about 1 ms).
#: It is never early, and late by less than 1/128 of its delay; the entries due in the same tick share one bucket,
#: one heap entry and one float (none of it per entry).
_TICK_BITS = 8
_MIN_TICK_EXPONENT = -10


class TimerEntry:
    """Base of an object that is its own timer (a connection: one timer each, re-armed all its life).

    :meth:`EventLoop.arm` puts it in the bucket of its deadline, rounded up to a tick (less than 1/128 of the
    delay): a circular doubly-linked list threaded through the objects themselves (``_tprev``, ``_tnext``), with
    one heap entry and one deadline per bucket, not per object. Arming, re-arming (later or earlier) and
    :meth:`EventLoop.disarm` are O(1) and allocate nothing, and a disarmed object is referenced by nothing, so it is
    freed as soon as its last other reference goes. When its bucket is due the loop disarms it and calls it.
    Subclasses set ``_tprev`` and ``_tnext`` to None in ``__init__`` (no ``super().__init__()`` call needed).
    """

    __slots__ = ("_tnext", "_tprev")

    _tnext: TimerEntry | _Bucket | None
    _tprev: TimerEntry | _Bucket | None

    @property
    def armed(self) -> bool:
        return self._tnext is not None

    def __call__(self) -> None:
        """The deadline came (the entry is disarmed by then: re-arming it here is allowed)."""
        raise NotImplementedError


class _Bucket(Timer):
    """The armed :class:`TimerEntry` objects of one tick: the Timer of the tick in the heap (its own callback), and
    the sentinel of their list. An empty list points at the bucket itself; the pointers are cleared when the bucket
    goes (no cycle is left: the Timer's callback is dropped when it fires or is cancelled, as for any Timer)."""

    __slots__ = ("_tnext", "_tprev", "owner")

    def __init__(self, loop: EventLoop, deadline: float) -> None:
        super().__init__(deadline, self, loop)
        self._tnext: TimerEntry | _Bucket | None = self
        self._tprev: TimerEntry | _Bucket | None = self
        self.owner = loop  # _loop is the heap's (None once fired or cancelled)

    def __call__(self) -> None:
        self.owner._fire_bucket(self)


class _SignalWakeup:
    """Readable end of the wakeup socketpair: each byte is a signal number."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.rsock, self.wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.wsock.setblocking(False)

    def handle_event(self, mask: int) -> None:
        try:
            data = self.rsock.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            self.loop._pending_signals.append(signum)


class EventLoop:
    """A single-threaded selector loop with timers and signal dispatch."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        # On Linux the DefaultSelector is an EpollSelector: run_once() then polls its epoll object itself and finds
        # each handler in the selector's own fd-to-key map, the same lookup select() makes, without select()'s
        # method call, tuple and list per ready descriptor (a measurable share of a small message's cost).
        # Registration still goes through the selector's public API; elsewhere, select() is used as it is.
        self._epoll: Any = None
        self._fd_to_key: dict[int, selectors.SelectorKey] | None = None
        if type(self.selector) is getattr(selectors, "EpollSelector", None):
            self._epoll = getattr(self.selector, "_selector", None)
            self._fd_to_key = getattr(self.selector, "_fd_to_key", None)
            if self._epoll is None or not isinstance(self._fd_to_key, dict):
                self._epoll = self._fd_to_key = None
        self._timers: list[Timer] = []  # a heap, by deadline
        self._cancelled_timers = 0  # entries of _timers whose timer is cancelled
        self._buckets: dict[float, _Bucket] = {}  # the armed TimerEntry objects, by (rounded) deadline
        self._armed = 0  # TimerEntry objects in the buckets
        self._running = False
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._pending_signals: list[int] = []
        self._wakeup: _SignalWakeup | None = None
        self._old_wakeup_fd = -1
        self.end_of_iteration: list[Callable[[], None]] = []
        self.after_batch: list[Callable[[], None]] = []  # after every BATCH I/O callbacks (not at the end)
        self._soon: list[Callable[[], None]] = []  # work left over from an earlier iteration (call_soon)
        self.now = time.monotonic()
        self.iterations = 0
        self.max_lag = 0.0  # the longest an iteration took to come back to select(), seconds
        self.lag_peak = 0.0  # the same since a reader last set it to 0 (the operator figures, once a second)

    # ------------------------------------------------------------------ I/O
    def register(self, fileobj: Any, events: int, handler: Handler) -> None:
        self.selector.register(fileobj, events, handler)

    def modify(self, fileobj: Any, events: int, handler: Handler) -> None:
        self.selector.modify(fileobj, events, handler)

    def unregister(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the next iteration, after its I/O handlers, without waiting in ``select()``: the
        rest of a job that was cut short so that other connections are served in between."""
        self._soon.append(callback)

    # ------------------------------------------------------------------ timers
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback, self)
        heapq.heappush(self._timers, timer)
        return timer

    def arm(self, entry: TimerEntry, when: float) -> None:
        """Call ``entry`` at ``when`` (rounded up to its tick: see _TICK_BITS), instead of whenever it was armed for."""
        exponent = math.frexp(when - self.now)[1] - _TICK_BITS
        tick = math.ldexp(1.0, exponent if exponent > _MIN_TICK_EXPONENT else _MIN_TICK_EXPONENT)
        try:
            key = math.ceil(when / tick) * tick
        except (OverflowError, ValueError):  # infinite: never (a bucket whose Timer never fires)
            key = when
        buckets = self._buckets
        bucket = buckets.get(key)
        if entry._tnext is not None:
            self._unlink(entry, bucket)
        else:
            self._armed += 1
        if bucket is None:
            bucket = buckets[key] = _Bucket(self, key)
            heapq.heappush(self._timers, bucket)
        tail = bucket._tprev
        assert tail is not None
        entry._tprev = tail
        entry._tnext = bucket
        tail._tnext = entry
        bucket._tprev = entry

    def disarm(self, entry: TimerEntry) -> None:
        """``entry`` will not be called (nothing happens if it is not armed)."""
        if entry._tnext is not None:
            self._unlink(entry, None)
            self._armed -= 1

    def _unlink(self, entry: TimerEntry, keep: _Bucket | None) -> None:
        """Take ``entry`` out of its bucket; a bucket left empty goes, with its Timer (unless it is ``keep``)."""
        prev, after = entry._tprev, entry._tnext
        assert prev is not None and after is not None
        prev._tnext = after
        after._tprev = prev
        entry._tprev = entry._tnext = None
        if prev is after and type(prev) is _Bucket and prev is not keep:
            bucket = prev
            if self._buckets.get(bucket.deadline) is bucket:  # not the one being fired (_fire_bucket clears it)
                del self._buckets[bucket.deadline]
                bucket._tnext = bucket._tprev = None
                bucket.cancel()

    def _fire_bucket(self, bucket: _Bucket) -> None:
        """A bucket's deadline came: call its entries, each disarmed first (one may re-arm, or disarm another)."""
        if self._buckets.get(bucket.deadline) is bucket:
            del self._buckets[bucket.deadline]  # from here on, _unlink leaves this bucket alone when it empties
        while True:
            entry = bucket._tnext
            if entry is bucket or entry is None:
                break
            assert isinstance(entry, TimerEntry)
            self.disarm(entry)
            entry()
        bucket._tnext = bucket._tprev = None

    @property
    def timer_count(self) -> int:
        """Live (not cancelled) timers in the heap, plus armed :class:`TimerEntry` objects (not their buckets)."""
        return len(self._timers) - self._cancelled_timers - len(self._buckets) + self._armed

    @property
    def timer_heap_size(self) -> int:
        """Entries in the heap, cancelled ones included until they are popped or compacted away."""
        return len(self._timers)

    def _timer_cancelled(self) -> None:
        """A live timer of this loop's heap was cancelled (from :meth:`Timer.cancel`)."""
        self._cancelled_timers = cancelled = self._cancelled_timers + 1
        count = len(self._timers)
        if count > _MIN_SCHEDULED_TIMERS and cancelled > count * _MIN_CANCELLED_TIMERS_FRACTION:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Rebuild the heap with only its live timers; in place, so ``run_once`` and ``_run_timers`` may hold it."""
        timers = self._timers
        timers[:] = [timer for timer in timers if timer.callback is not None]
        heapq.heapify(timers)
        self._cancelled_timers = 0

    def _run_timers(self) -> None:
        now = self.now = time.monotonic()
        timers = self._timers
        while timers and timers[0].deadline <= now:
            timer = heapq.heappop(timers)
            callback = timer.callback
            if callback is None:  # cancelled
                self._cancelled_timers -= 1
                continue
            if timer.when > now:
                # Re-armed in place for a later deadline (see ServerConnection._set_timer): queue it again.
                timer.deadline = timer.when
                heapq.heappush(timers, timer)
                continue
            timer.callback = timer._loop = None
            callback()

    # ------------------------------------------------------------------ signals
    def add_signal_handler(self, signum: int, handler: Callable[[int], None]) -> None:
        """Run ``handler(signum)`` in the loop when the signal arrives."""
        if self._wakeup is None:
            self._wakeup = _SignalWakeup(self)
            self.selector.register(self._wakeup.rsock, selectors.EVENT_READ, self._wakeup)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wakeup.wsock.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = handler
        # The Python-level handler does nothing: the C handler already wrote the number to the wakeup fd.
        signal.signal(signum, _noop_signal_handler)

    def _dispatch_signals(self) -> None:
        pending, self._pending_signals = self._pending_signals, []
        for signum in pending:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # ------------------------------------------------------------------ running
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """Run until :meth:`stop`."""
        self._running = True
        run_once = self.run_once
        while self._running:
            run_once()

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration: wait for I/O at most ``timeout`` seconds (``None``: no limit) or until the next timer is
        due, then run the I/O handlers, the signal handlers, the due timers and the ``end_of_iteration`` hooks."""
        timers = self._timers
        soon: list[Callable[[], None]] | tuple[()] = self._soon  # what earlier iterations left; what this one
        if soon:  # leaves waits for the next
            self._soon = []
        else:
            soon = ()
        if self._pending_signals or soon:
            timeout = 0.0
        elif timers:
            delay = timers[0].deadline - time.monotonic()
            if timeout is None or delay < timeout:
                timeout = delay if delay > 0.0 else 0.0
        epoll = self._epoll
        if epoll is not None:
            fd_to_key = self._fd_to_key
            assert fd_to_key is not None
            if timeout is None:
                timeout = -1
            elif timeout <= 0:
                timeout = 0
            else:  # epoll_wait() counts milliseconds: round up, to wait at least that long
                timeout = math.ceil(timeout * 1e3) * 1e-3
            try:
                ready = epoll.poll(timeout, len(fd_to_key) or 1)
            except InterruptedError:
                ready = []
            start = self.now = time.monotonic()
            handled = 0
            for fd, flags in ready:
                if handled == BATCH:
                    handled = 0
                    for hook in self.after_batch:
                        hook()
                handled += 1
                try:
                    key = fd_to_key[fd]
                except KeyError:  # unregistered by an earlier handler of this iteration
                    continue
                if flags == _EPOLLIN:  # the common case: readable only, and always wanted
                    key.data.handle_event(_EVENT_READ)
                    continue
                # select()'s translation: anything but "out" counts as readable (errors and hang-ups too, so the
                # handler's recv sees them), anything but "in" as writable; then only what the key asked for.
                mask = (_EVENT_READ if flags & ~_EPOLLOUT else 0) | (_EVENT_WRITE if flags & ~_EPOLLIN else 0)
                mask &= key.events
                if mask:
                    key.data.handle_event(mask)
        else:
            events = self.selector.select(timeout)
            start = self.now = time.monotonic()
            registered = self.selector.get_map()
            handled = 0
            for key, mask in events:
                if handled == BATCH:
                    handled = 0
                    for hook in self.after_batch:
                        hook()
                handled += 1
                if registered.get(key.fileobj) is key:  # not unregistered by an earlier handler of this iteration
                    key.data.handle_event(mask)
        for callback in soon:
            callback()
        if self._pending_signals:
            self._dispatch_signals()
        if timers and timers[0].deadline <= start:
            self._run_timers()
        # Last, so output queued by signal handlers and timers (keepalive pings, the close frame of a failed
        # keepalive or close timeout) goes out now, not whenever select() next wakes up.
        for hook in self.end_of_iteration:
            hook()
        lag = time.monotonic() - start
        if lag > self.lag_peak:  # lag_peak <= max_lag: one comparison in the common case, as before
            self.lag_peak = lag
            if lag > self.max_lag:
                self.max_lag = lag
        self.iterations += 1

    def forget_after_fork(self) -> None:
        """In a forked child: drop this (the parent's) loop without touching what the parent still uses.

        Signals go back to their default action, the wakeup fd is detached, and our copies of the selector
        and wakeup descriptors are closed (an epoll instance is shared with the parent: never unregister).
        """
        for signum in list(self._signal_handlers):
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        self._pending_signals.clear()
        signal.set_wakeup_fd(-1)
        if self._wakeup is not None:
            self._wakeup.rsock.close()
            self._wakeup.wsock.close()
            self._wakeup = None
        self.selector.close()
        for timer in self._timers:
            timer._loop = None
        self._timers.clear()
        self._cancelled_timers = 0
        for bucket in self._buckets.values():  # our copies of the parent's entries: unlinked, disarmed
            entry = bucket._tnext
            while entry is not None and entry is not bucket:
                after = entry._tnext
                entry._tprev = entry._tnext = None
                entry = after
            bucket._tnext = bucket._tprev = None
        self._buckets.clear()
        self._armed = 0
        self._soon.clear()
        self.end_of_iteration.clear()

    def close(self) -> None:
        for signum in list(self._signal_handlers):
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self.unregister(self._wakeup.rsock)
            self._wakeup.rsock.close()
            self._wakeup.wsock.close()
            self._wakeup = None
        self.selector.close()


def _noop_signal_handler(signum: int, frame: object) -> None:
    """Present so Python does not apply the default action; the loop does the work."""
