"""selectws.server.health / selectws.server.metrics, ``[ops]`` validation, and how the server registers the endpoints.

The servers here are constructed but never started: nothing listens, the counters are set by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from selectws.config import Config, ConfigError, OpsConfig, parse_config, split_host_port
from selectws.server.health import healthz_handler, ops_handlers
from selectws.server.metrics import CONTENT_TYPE, MetricsWriter, metrics_handler, render_metrics
from selectws.protocol.http11 import Headers, Request
from selectws.server.server import Server

REQUEST = Request("GET", "/", (1, 1), Headers(), path="/")


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Config())
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


def test_render_metrics_reads_the_server_counters(server: Server) -> None:
    server.accepted = 7
    server.messages_in, server.messages_out = 11, 13
    server.rejected = {404: 2, 400: 1}
    server.close_codes = {1000: 4, 1001: 1}
    server.closed_bytes_in, server.closed_bytes_out = 100, 200
    server.loop.max_lag = 0.5
    samples = _samples(render_metrics(server))
    assert samples[("selectws_connections_accepted_total", ())] == 7
    assert samples[("selectws_messages_received_total", ())] == 11
    assert samples[("selectws_messages_sent_total", ())] == 13
    assert samples[("selectws_http_rejected_total", (("status", "400"),))] == 1
    assert samples[("selectws_http_rejected_total", (("status", "404"),))] == 2
    assert samples[("selectws_connections_closed_total", (("code", "1000"),))] == 4
    assert samples[("selectws_received_bytes_total", ())] == 100
    assert samples[("selectws_sent_bytes_total", ())] == 200
    assert samples[("selectws_loop_lag_max_seconds", ())] == 0.5
    assert samples[("selectws_draining", ())] == 0
    # Every configured route has a series, even with nobody connected.
    for path in ("/echo", "/broadcast/{channel}", "/chat"):
        assert samples[("selectws_connections_open", (("route", path),))] == 0


def test_every_family_has_help_type_and_counters_end_in_total(server: Server) -> None:
    text = render_metrics(server)
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


def test_metrics_handler(server: Server) -> None:
    status, headers, body = metrics_handler(server)(REQUEST)
    assert status == 200
    assert ("Content-Type", CONTENT_TYPE) in headers
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert b"selectws_uptime_seconds" in body


# ---------------------------------------------------------------------------------------------- health
def test_healthz_follows_draining(server: Server) -> None:
    handler = healthz_handler(server)
    assert handler(REQUEST)[0] == 200
    assert handler(REQUEST)[2] == b"ok\n"
    server.draining = True
    status, headers, body = handler(REQUEST)
    assert (status, body) == (503, b"draining\n")
    assert ("Retry-After", "5") in headers


def test_ops_handlers_switches(server: Server) -> None:
    assert set(ops_handlers(server, OpsConfig())) == {"/healthz", "/metrics"}
    assert set(ops_handlers(server, OpsConfig(healthz=False))) == {"/metrics"}
    assert set(ops_handlers(server, OpsConfig(metrics=False, healthz_path="/up"))) == {"/up"}
    assert ops_handlers(server, OpsConfig(healthz=False, metrics=False)) == {}


# ---------------------------------------------------------------------------------------------- server wiring
def test_endpoints_on_the_websocket_router_by_default(server: Server) -> None:
    assert set(server.router.http) >= {"/healthz", "/metrics"}
    assert server.ops_router.http == {}


def test_endpoints_on_their_own_router_with_ops_listen() -> None:
    srv = Server(parse_config({"ops": {"listen": "127.0.0.1:0"}}))
    try:
        assert "/healthz" not in srv.router.http
        assert "/metrics" not in srv.router.http
        assert set(srv.ops_router.http) == {"/healthz", "/metrics"}
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
    # Valid for the configuration loader; the chat plugin's constructor is what refuses the option.
    broken = parse_config({"routes": [{"path": "/x", "plugin": "chat", "options": {"max_name_length": "many"}}]})
    with pytest.raises(ValueError):
        server.apply_config(broken)
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
