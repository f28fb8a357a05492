"""``/metrics``: the server's counters in the Prometheus text exposition format, version 0.0.4.

The hot path only ever increments plain integers (:class:`~selectws.server.stats.Counters`). Nothing here runs
until a scraper asks: the handler then takes one :class:`~selectws.server.stats.ServerStats` snapshot from the
provider it was given and :func:`render_metrics` formats it; nothing of the server itself is read here. There is
no client library: the format is a few lines of text per metric family::

    # HELP selectws_messages_received_total WebSocket messages received (after reassembly).
    # TYPE selectws_messages_received_total counter
    selectws_messages_received_total 42

Counters end in ``_total``; label values are escaped as the format requires (backslash, double quote, newline).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable

from selectws import __version__
from selectws.protocol.http11 import Request
from selectws.server.refusals import FAILURE_REASONS
from selectws.server.routing import HttpHandler, HttpResult
from selectws.server.stats import ServerStats

__all__ = ["CONTENT_TYPE", "MetricsWriter", "metrics_handler", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsWriter:
    """Accumulates metric families and renders them as one exposition-format document."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        """One family: HELP and TYPE lines, then a line per sample (``kind`` is ``counter`` or ``gauge``)."""
        lines = self._lines
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")

    def counter(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "counter", help_text, [((), value)])

    def gauge(self, name: str, help_text: str, value: float) -> None:
        self.family(name, "gauge", help_text, [((), value)])

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


def _failure_samples(stats: ServerStats) -> list[Sample]:
    """handshake_failures_total by reason: every known reason (0 until it happens), then any other; what the
    total has beyond the reasons (a snapshot made without them) as ``other``, so the samples still add up."""
    reasons = stats.handshake_failure_reasons
    samples: list[Sample] = [((("reason", r),), reasons.get(r, 0)) for r in FAILURE_REASONS]
    samples += [((("reason", r),), n) for r, n in sorted(reasons.items()) if r not in FAILURE_REASONS]
    rest = stats.handshake_failures - sum(reasons.values())
    if rest > 0:
        samples.append(((("reason", "other"),), rest))
    return samples


def render_metrics(stats: ServerStats) -> str:
    """Every metric of the snapshot ``stats``, formatted now."""
    w = MetricsWriter()
    p = "selectws_"
    w.family(f"{p}build_info", "gauge", "Version of the running selectws.", [((("version", __version__),), 1)])
    w.counter(f"{p}connections_accepted_total", "TCP connections accepted (WebSocket and plain HTTP).",
              stats.accepted)
    w.counter(f"{p}accept_errors_total", "accept() failures for lack of resources (file descriptors, memory).",
              stats.accept_errors)
    w.gauge(f"{p}accept_paused", "1 while accept() fails for lack of resources (listeners paused or answering from "
            "the reserve of spare descriptors only), else 0.", 1 if stats.accept_paused else 0)
    w.gauge(f"{p}accept_reserve_fds", "Spare descriptors held for accepting while out of file descriptors.",
            stats.accept_reserve)
    w.counter(f"{p}accept_reserve_used_total", "Connections accepted on a spare descriptor while out of file "
              "descriptors (served /healthz and /metrics only; WebSocket upgrades answered 503).",
              stats.accept_reserve_used)
    w.family(f"{p}http_rejected_total", "counter", "Handshakes and HTTP requests answered with an error status.",
             [((("status", str(status)),), n) for status, n in sorted(stats.rejected.items())])
    w.family(f"{p}handshake_failures_total", "counter", "Opening handshakes refused or timed out (TLS included), "
             "by reason: " + ", ".join(FAILURE_REASONS) + " (selectws/server/refusals.py).",
             _failure_samples(stats))
    w.counter(f"{p}messages_received_total", "WebSocket messages received (after reassembly).", stats.messages_in)
    w.counter(f"{p}messages_sent_total", "WebSocket messages queued for sending (a broadcast counts each recipient).",
              stats.messages_out)
    w.counter(f"{p}plugin_errors_total", "Plugin callbacks that raised (the connection is closed with 1011).",
              stats.plugin_errors)
    w.counter(f"{p}slow_consumers_dropped_total", "Connections dropped because they did not read what we sent.",
              stats.slow_consumers_dropped)
    w.family(f"{p}connections_closed_total", "counter", "WebSocket connections closed, by close code.",
             [((("code", str(code)),), n) for code, n in sorted(stats.close_codes.items())])
    w.family(f"{p}rate_limited_total", "counter", "Messages refused by the route's per-connection rate limit "
             "(dropped, or the one that closed the connection with 1008), by route.",
             [((("route", path),), n) for path, n in stats.rate_limited.items()])
    w.family(f"{p}rate_limit_closes_total", "counter", "Connections closed with 1008 for going over the route's "
             "rate limit (rate_limit_action = \"close\"), by route.",
             [((("route", path),), n) for path, n in stats.rate_limit_closes.items()])
    w.family(f"{p}recoveries_total", "counter", "Joins that asked for what they missed (a chat login with "
             "'since', ?since= on a broadcast route), by result: ok = every missed message replayed, lost = the "
             "epoch changed or messages were trimmed (the client must reload its state).",
             [((("result", result),), n) for result, n in sorted(stats.recoveries.items())])
    w.gauge(f"{p}presence_remote_members", "Members of this instance's groups on other instances (presence).",
            stats.remote_members)
    w.counter(f"{p}received_bytes_total", "Bytes read from client sockets.", stats.bytes_in)
    w.counter(f"{p}sent_bytes_total", "Bytes written to client sockets.", stats.bytes_out)

    w.family(f"{p}connections_open", "gauge", "Open WebSocket connections, by route.",
             [((("route", path),), n) for path, n in stats.open_by_route.items()])
    w.gauge(f"{p}sockets_open", "Client sockets open (WebSocket, in handshake or closing).", stats.sockets_open)
    w.gauge(f"{p}groups", "Broadcast groups with at least one member.", stats.groups)
    w.gauge(f"{p}write_buffer_bytes", "Bytes waiting in the write buffers of all connections.",
            stats.write_buffer_bytes)
    w.gauge(f"{p}write_buffer_budget_bytes", "The limit on write_buffer_bytes ([limits] max_buffered_total).",
            stats.write_buffer_budget)
    w.counter(f"{p}write_buffer_budget_dropped_total",
              "Connections dropped, most unsent bytes first, because all write buffers together passed "
              "max_buffered_total.", stats.budget_dropped)
    w.gauge(f"{p}draining", "1 while the server is shutting down, else 0.", 1 if stats.draining else 0)
    broker = stats.broker
    w.family(f"{p}broker_up", "gauge", "1 while group messages reach the other instances (always 1 in memory).",
             [((("broker", broker.kind),), 1 if broker.up else 0)])
    w.counter(f"{p}broker_dropped_total", "Group messages delivered locally only: the broker was down (or hung) "
              "or its write buffer full (or the connection was lost before Redis confirmed them).", broker.dropped)
    w.counter(f"{p}broker_reconnects_total", "Reconnections to the broker after a lost connection.",
              broker.reconnects)
    # Only brokers that count them (Redis): the in-memory broker has nothing to publish, receive or fail.
    for name, value, help_text in (
        ("published", broker.published, "Group messages published to the broker."),
        ("received", broker.received, "Group messages received from other instances through the broker."),
        ("errors", broker.errors, "Error replies from the broker and messages from it that could not be decoded."),
    ):
        if value is not None:
            w.counter(f"{p}broker_{name}_total", help_text, value)

    if stats.hooks:  # [[hooks]] (docs/webhooks.md), labelled by receiver URL without its query
        for name, kind, attr, help_text in (
            ("hook_events_sent_total", "counter", "sent", "Webhook events in batches the receiver answered 2xx."),
            ("hook_events_failed_total", "counter", "failed", "Webhook events in requests that failed after "
             "leaving (timeout, reset, non-2xx answer); never resent (at-most-once)."),
            ("hook_events_dropped_total", "counter", "dropped", "Webhook events dropped: the queue was full "
             "(max_queue)."),
            ("hook_requests_total", "counter", "requests", "Webhook requests (batches) started."),
            ("hook_request_failures_total", "counter", "request_failures", "Webhook requests that failed."),
            ("hook_queue_events", "gauge", "queued", "Webhook events queued or in flight."),
            ("hook_failing", "gauge", "failing", "1 while deliveries to the receiver fail (backing off), else 0."),
        ):
            w.family(f"{p}{name}", kind, help_text,
                     [((("url", hook.url),), int(getattr(hook, attr))) for hook in stats.hooks])
    w.gauge(f"{p}loop_lag_max_seconds", "Longest time one event-loop iteration took since start.", stats.loop_lag_max)
    w.counter(f"{p}loop_iterations_total", "Event-loop iterations.", stats.loop_iterations)
    w.gauge(f"{p}timers", "Live timers in the event loop (cancelled ones are not counted).",
            stats.timers)

    w.gauge(f"{p}process_start_time_seconds", "Start time of the server since the Unix epoch, in seconds.",
            stats.started_at)
    w.gauge(f"{p}uptime_seconds", "Seconds since the server started.", max(0.0, time.time() - stats.started_at))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    w.counter(f"{p}process_cpu_seconds_total", "User and system CPU time spent, in seconds.",
              usage.ru_utime + usage.ru_stime)
    w.gauge(f"{p}process_max_resident_memory_bytes", "Peak resident set size, in bytes.", usage.ru_maxrss * 1024)
    w.gauge(f"{p}process_max_fds", "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return w.render()


def metrics_handler(stats: Callable[[], ServerStats]) -> HttpHandler:
    """An HTTP handler (``Router.http``) answering with :func:`render_metrics` of a fresh snapshot."""

    def handle(request: Request) -> HttpResult:
        body = render_metrics(stats()).encode("utf-8")
        return 200, [("Content-Type", CONTENT_TYPE), ("Cache-Control", "no-store")], body

    return handle
