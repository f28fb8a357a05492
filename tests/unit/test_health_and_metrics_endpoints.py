"""selectws.server.health / selectws.server.metrics, ``[ops]`` validation, and how the server registers the endpoints.

The endpoints read a :class:`ServerStats` snapshot: the tests build one by hand, no server needed. The server
wiring tests construct servers that are never started: nothing listens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from selectws.config import Config, ConfigError, OpsConfig, parse_config, split_host_port
from selectws.plugins.registry import find_plugin
from selectws.protocol.http11 import Headers, Request
from selectws.server.health import healthz_handler, ops_handlers
from selectws.server.metrics import CONTENT_TYPE, MetricsWriter, metrics_handler, render_metrics
from selectws.server.server import Server
from selectws.server.stats import BrokerStats, ServerStats

REQUEST = Request("GET", "/", (1, 1), Headers(), path="/")

MEMORY = BrokerStats(kind="memory", up=True, status=None, dropped=0, reconnects=0)


def _stats(**changes: Any) -> ServerStats:
    """A snapshot of an idle server with the default routes, with ``changes`` applied."""
    idle = ServerStats(
        started_at=1_700_000_000.0, draining=False, accepted=0, accept_errors=0, rejected={}, handshake_failures=0,
        messages_in=0, messages_out=0, plugin_errors=0, slow_consumers_dropped=0, close_codes={}, bytes_in=0,
        bytes_out=0, sockets_open=0, handshaking=0, open_by_route={"/echo": 0, "/broadcast/{channel}": 0, "/chat": 0},
        groups=0, write_buffer_bytes=0, loop_iterations=0, loop_lag_max=0.0, timers=0, broker=MEMORY,
    )
    return replace(idle, **changes)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Config(), plugins=find_plugin)
    yield srv
    srv.loop.close()


def _families(text: str) -> list[Any]:
    """Parsed by prometheus_client: an optional test dependency (the "test" extra); skipped without it."""
    parser = pytest.importorskip("prometheus_client.parser")
    return list(parser.text_string_to_metric_families(text))


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in _families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ---------------------------------------------------------------------------------------------- formatter
def test_writer_escapes_label_values_and_help() -> None:
    w = MetricsWriter()
    w.family("x_total", "counter", 'a "help"\\ with\nnewline', [((("route", 'we"ird\\pa\nth'),), 3)])
    w.gauge("y", "float", 0.25)
    w.gauge("z", "inf", float("inf"))
    text = w.render()
    assert text.endswith("\n")
    assert 'x_total{route="we\\"ird\\\\pa\\nth"} 3' in text
    assert "# HELP x_total a \"help\"\\\\ with\\nnewline" in text
    families = {f.name: f for f in _families(text)}
    assert families["x"].samples[0].labels == {"route": 'we"ird\\pa\nth'}
    assert families["y"].samples[0].value == 0.25
    assert families["z"].samples[0].value == float("inf")


def test_render_metrics_reads_the_snapshot() -> None:
    stats = _stats(
        accepted=7, accept_errors=1, messages_in=11, messages_out=13, rejected={404: 2, 400: 1},
        close_codes={1000: 4, 1001: 1}, bytes_in=100, bytes_out=200, loop_lag_max=0.5, loop_iterations=9,
        timers=5, sockets_open=4, groups=2, write_buffer_bytes=300, plugin_errors=3, slow_consumers_dropped=6,
        handshake_failures=8, handshake_failure_reasons={"no_route": 2, "bad_request": 5},
        open_by_route={"/echo": 2, "/chat": 1},
    )
    samples = _samples(render_metrics(stats))
    assert samples[("selectws_connections_accepted_total", ())] == 7
    assert samples[("selectws_accept_errors_total", ())] == 1
    assert samples[("selectws_messages_received_total", ())] == 11
    assert samples[("selectws_messages_sent_total", ())] == 13
    assert samples[("selectws_http_rejected_total", (("status", "400"),))] == 1
    assert samples[("selectws_http_rejected_total", (("status", "404"),))] == 2
    assert samples[("selectws_connections_closed_total", (("code", "1000"),))] == 4
    assert samples[("selectws_connections_closed_total", (("code", "1001"),))] == 1
    assert samples[("selectws_received_bytes_total", ())] == 100
    assert samples[("selectws_sent_bytes_total", ())] == 200
    assert samples[("selectws_loop_lag_max_seconds", ())] == 0.5
    assert samples[("selectws_loop_iterations_total", ())] == 9
    assert samples[("selectws_timers", ())] == 5
    assert samples[("selectws_sockets_open", ())] == 4
    assert samples[("selectws_groups", ())] == 2
    assert samples[("selectws_write_buffer_bytes", ())] == 300
    assert samples[("selectws_plugin_errors_total", ())] == 3
    assert samples[("selectws_slow_consumers_dropped_total", ())] == 6
    # by reason; every known reason is there from the start, and what the reasons lack is "other"
    assert samples[("selectws_handshake_failures_total", (("reason", "no_route"),))] == 2
    assert samples[("selectws_handshake_failures_total", (("reason", "bad_request"),))] == 5
    assert samples[("selectws_handshake_failures_total", (("reason", "tls"),))] == 0
    assert samples[("selectws_handshake_failures_total", (("reason", "other"),))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "selectws_handshake_failures_total") == 8
    assert samples[("selectws_connections_open", (("route", "/echo"),))] == 2
    assert samples[("selectws_connections_open", (("route", "/chat"),))] == 1
    assert samples[("selectws_draining", ())] == 0
    assert samples[("selectws_process_start_time_seconds", ())] == 1_700_000_000.0
    assert samples[("selectws_broker_up", (("broker", "memory"),))] == 1
    # The in-memory broker counts nothing of its own: no published/received/errors series.
    assert not {name for name, _ in samples} & {
        "selectws_broker_published_total", "selectws_broker_received_total", "selectws_broker_errors_total"}
    assert _samples(render_metrics(_stats(draining=True)))[("selectws_draining", ())] == 1


def test_redis_broker_counters_are_exported() -> None:
    broker = BrokerStats(kind="redis", up=False, status="broker redis h:1: down (x); local delivery only",
                         dropped=3, reconnects=2, published=10, received=20, errors=4)
    samples = _samples(render_metrics(_stats(broker=broker)))
    assert samples[("selectws_broker_up", (("broker", "redis"),))] == 0
    assert samples[("selectws_broker_dropped_total", ())] == 3
    assert samples[("selectws_broker_reconnects_total", ())] == 2
    assert samples[("selectws_broker_published_total", ())] == 10
    assert samples[("selectws_broker_received_total", ())] == 20
    assert samples[("selectws_broker_errors_total", ())] == 4


def test_every_family_has_help_type_and_counters_end_in_total() -> None:
    redis = BrokerStats(kind="redis", up=True, status="up", dropped=0, reconnects=0, published=0, received=0, errors=0)
    for stats in (_stats(), _stats(broker=redis, rejected={400: 1}, close_codes={1000: 1})):
        text = render_metrics(stats)
        names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
        helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
        assert names == helps
        assert len(names) == len(set(names))
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                assert name.startswith("selectws_")
                assert kind in ("counter", "gauge")
                assert name.endswith("_total") == (kind == "counter"), line


def test_metrics_handler_takes_a_snapshot_per_request() -> None:
    snapshots = iter([_stats(accepted=1), _stats(accepted=2)])
    handler = metrics_handler(lambda: next(snapshots))
    for expected in (1, 2):
        status, headers, body = handler(REQUEST)
        assert status == 200
        assert ("Content-Type", CONTENT_TYPE) in headers
        assert ("Cache-Control", "no-store") in headers
        assert f"selectws_connections_accepted_total {expected}\n".encode() in body
        assert b"selectws_uptime_seconds" in body
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------------------------------------- health
def test_healthz_follows_draining() -> None:
    current = [_stats()]
    handler = healthz_handler(lambda: current[0])
    assert handler(REQUEST)[0] == 200
    assert handler(REQUEST)[2] == b"ok\n"
    current[0] = _stats(draining=True)
    status, headers, body = handler(REQUEST)
    assert (status, body) == (503, b"draining\n")
    assert ("Retry-After", "5") in headers


def test_healthz_reports_the_broker() -> None:
    up = BrokerStats(kind="redis", up=True, status="broker redis h:1: up", dropped=0, reconnects=0)
    down = replace(up, up=False, status="broker redis h:1: down (refused); local delivery only")
    status, headers, body = healthz_handler(lambda: _stats(broker=up))(REQUEST)
    assert (status, body) == (200, b"ok\nbroker redis h:1: up\n")
    assert ("X-Broker", "up") in headers
    status, headers, body = healthz_handler(lambda: _stats(broker=down))(REQUEST)
    assert status == 200 and body.startswith(b"ok\n") and b"down (refused)" in body  # degraded, still serving
    assert ("X-Broker", "down") in headers
    status, headers, body = healthz_handler(lambda: _stats(broker=down, draining=True))(REQUEST)
    assert status == 503 and body.startswith(b"draining\n") and b"down" in body


def test_ops_handlers_switches() -> None:
    assert set(ops_handlers(_stats, OpsConfig())) == {"/healthz", "/readyz", "/metrics"}
    assert set(ops_handlers(_stats, OpsConfig(healthz=False))) == {"/readyz", "/metrics"}
    assert set(ops_handlers(_stats, OpsConfig(metrics=False, readyz=False, healthz_path="/up"))) == {"/up"}
    assert ops_handlers(_stats, OpsConfig(healthz=False, readyz=False, metrics=False)) == {}


# ---------------------------------------------------------------------------------------------- server wiring
def test_endpoints_on_the_websocket_router_by_default(server: Server) -> None:
    assert set(server.router.http) >= {"/healthz", "/metrics"}
    assert server.ops_router.http == {}


def test_the_server_snapshot_renders(server: Server) -> None:
    samples = _samples(render_metrics(server.stats()))
    assert samples[("selectws_connections_accepted_total", ())] == 0
    # Every configured route has a series, even with nobody connected.
    for path in ("/echo", "/broadcast/{channel}", "/chat"):
        assert samples[("selectws_connections_open", (("route", path),))] == 0
    status, _, body = server.router.http["/metrics"](REQUEST)
    assert status == 200 and b"selectws_timers " in body
    assert server.router.http["/healthz"](REQUEST)[:3:2] == (200, b"ok\n")


def test_endpoints_on_their_own_router_with_ops_listen() -> None:
    srv = Server(parse_config({"ops": {"listen": "127.0.0.1:0"}}), plugins=find_plugin)
    try:
        assert "/healthz" not in srv.router.http
        assert "/metrics" not in srv.router.http
        assert set(srv.ops_router.http) == {"/healthz", "/readyz", "/metrics"}
        assert srv.ops_router.routes == []
    finally:
        srv.loop.close()


def test_reload_moves_and_removes_endpoints(server: Server) -> None:
    config = server.config
    server.apply_config(replace(config, ops=OpsConfig(healthz_path="/live", metrics=False)))
    assert "/live" in server.router.http
    assert "/healthz" not in server.router.http
    assert "/metrics" not in server.router.http
    server.apply_config(config)
    assert {"/healthz", "/metrics"} <= set(server.router.http)
    assert "/live" not in server.router.http


def test_reload_with_a_failing_plugin_keeps_the_running_config(server: Server) -> None:
    before_router, before_config = server.router, server.config
    # Loaded without the plugin resolver, so the loader did not check the options: the chat plugin refuses them.
    broken = parse_config({"routes": [{"path": "/x", "plugin": "chat", "options": {"max_name_length": "many"}}]})
    with pytest.raises(ConfigError) as info:
        server.apply_config(broken)
    assert info.value.key == "routes[0] (/x).options.max_name_length"
    assert server.router is before_router
    assert server.config is before_config


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:0", ("::1", 0)), ("localhost:65535", ("localhost", 65535))],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port("ops.listen", value) == expected


@pytest.mark.parametrize("value", ["9100", ":9100", "host:", "host:99999", "::1:9100", "host:port", "host:٣"])
def test_ops_listen_is_validated(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"ops": {"listen": value}})
    assert info.value.key == "ops.listen"


@pytest.mark.parametrize("key", ["healthz_path", "metrics_path"])
def test_ops_paths_must_be_absolute(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"ops": {key: "healthz"}})
    assert info.value.key == f"ops.{key}"
