"""A snapshot of the server's counters and gauges, for ``/metrics``, ``/healthz`` and systemd's status line.

The hot path only increments plain integers on :class:`Counters`; :meth:`Server.stats` copies them into a
:class:`ServerStats` value, with the gauges computed at that moment. Readers (metrics, health) see that value and
nothing of the server's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BrokerStats", "Counters", "HookStats", "ServerStats"]


class Counters:
    """Plain integers bumped on the hot path (attribute increments, no calls)."""

    __slots__ = (
        "accept_errors",
        "accepted",
        "budget_dropped",
        "close_codes",
        "closed_bytes_in",
        "closed_bytes_out",
        "handshake_failure_reasons",
        "handshake_failures",
        "messages_in",
        "messages_out",
        "plugin_errors",
        "rate_limit_closes",
        "rate_limited",
        "recoveries",
        "rejected",
        "slow_consumers_dropped",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.accept_errors = 0
        self.rejected: dict[int, int] = {}
        self.handshake_failures = 0
        self.handshake_failure_reasons: dict[str, int] = {}  # the same, by reason (selectws/server/refusals.py)
        self.messages_in = 0
        self.messages_out = 0
        self.plugin_errors = 0
        self.slow_consumers_dropped = 0
        self.budget_dropped = 0  # connections dropped by the max_buffered_total budget
        self.close_codes: dict[int, int] = {}
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0
        self.rate_limited: dict[str, int] = {}  # route path -> messages refused by its rate limit
        self.rate_limit_closes: dict[str, int] = {}  # route path -> connections closed (1008) for going over it
        self.recoveries = {"ok": 0, "lost": 0}  # joins with a position: everything replayed, or history lost


@dataclass(frozen=True, slots=True)
class BrokerStats:
    kind: str
    up: bool
    status: str | None  # a line for /healthz, or None when there is nothing to say
    dropped: int
    reconnects: int
    published: int | None = None  # None: the broker does not count it (in memory)
    received: int | None = None
    errors: int | None = None


@dataclass(frozen=True, slots=True)
class HookStats:
    """One ``[[hooks]]`` receiver (selectws/server/hooks.py); counts are events, except the two request counts."""

    url: str  # without its query
    queued: int
    sent: int
    failed: int  # in requests that left and failed: not resent (at-most-once)
    dropped: int  # refused by a full queue
    requests: int
    request_failures: int
    failing: bool  # in a failure episode (backing off)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Everything an operator endpoint reports, taken at one moment."""

    started_at: float  # time.time() at start
    draining: bool
    accepted: int
    accept_errors: int
    rejected: dict[int, int]
    handshake_failures: int
    messages_in: int
    messages_out: int
    plugin_errors: int
    slow_consumers_dropped: int
    close_codes: dict[int, int]
    bytes_in: int
    bytes_out: int
    sockets_open: int
    handshaking: int
    open_by_route: dict[str, int]
    groups: int
    write_buffer_bytes: int
    loop_iterations: int
    loop_lag_max: float
    timers: int
    broker: BrokerStats
    write_buffer_budget: int = 0  # [limits] max_buffered_total
    budget_dropped: int = 0  # connections dropped by it
    # Out of file descriptors (selectws/server/accept.py): accept() failing now, the spare descriptors held, and
    # the connections accepted on one of them since start.
    accept_paused: bool = False
    accept_reserve: int = 0
    accept_reserve_used: int = 0
    hooks: tuple[HookStats, ...] = ()  # one per [[hooks]] receiver
    # Per-connection rate limits, by route path (every route with a limit, 0 until it refuses something): messages
    # refused (dropped, or the one that closed the connection), and connections closed with 1008 for it.
    rate_limited: dict[str, int] = field(default_factory=dict)
    rate_limit_closes: dict[str, int] = field(default_factory=dict)
    # History (selectws/server/history.py): joins that asked to recover, by result ("ok": every missed message
    # replayed; "lost": the epoch changed or messages were trimmed), and the groups presence knows on other instances.
    recoveries: dict[str, int] = field(default_factory=lambda: {"ok": 0, "lost": 0})
    remote_members: int = 0
    # handshake_failures by reason (the FAILURE_REASONS of selectws/server/refusals.py); they add up to it.
    handshake_failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def connections_open(self) -> int:
        return sum(self.open_by_route.values())
