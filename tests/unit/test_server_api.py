"""The server API without sockets: the request handling of :class:`ServerApi` against a fake server, the body
read by the sans-I/O protocol (``ServerProtocol.expect_body``) and decided by ``answer_request`` /
``answer_body``, the API key reader of the application, and session ids across instances (in-process server)."""

from __future__ import annotations

import base64
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from selectws.app.api_key import read_api_key
from selectws.config import ConfigError, parse_config
from selectws.protocol.events import RequestBody
from selectws.protocol.handshake import ServerProtocol
from selectws.protocol.http11 import Headers, Request
from selectws.server.handshake import Admission, answer_body, answer_request
from selectws.server.history import HistoryPolicy, HistoryResult, MemoryHistory
from selectws.server.http_api import API_PREFIX, ServerApi
from selectws.server.presence import Member
from selectws.server.routing import Pending, Router
from selectws.server.stats import BrokerStats, ServerStats

KEY = "the-key"


@dataclass
class FakeSession:
    id: str
    path: str = "/broadcast/x"
    remote: tuple[str, int] = ("192.0.2.7", 4242)
    open: bool = True
    closed_with: tuple[int, str] | None = None

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.open = False


@dataclass
class FakeServer:
    instance_id: str = "0123456789ab"
    groups: dict[str, list[FakeSession]] = field(default_factory=dict)
    published: list[tuple[str, str | bytes]] = field(default_factory=list)
    remote: dict[str, list[Member]] = field(default_factory=dict)  # what the other instances have
    store: MemoryHistory = field(default_factory=lambda: MemoryHistory(lambda: 0.0))

    def broadcast(self, group: str, message: str | bytes) -> int:
        self.published.append((group, message))
        policy = self.history_policy(group)
        if policy is not None:
            self.store.append(group, policy, message)
        return len(self.groups.get(group, []))

    def presence(self, group: str) -> list[Member]:
        local = [Member(s.id, self.instance_id) for s in self.groups.get(group, [])]
        return local + (self.remote.get(group, []) if self.follows(group) else [])

    def follows(self, group: str) -> bool:
        return group in self.groups

    def presence_query(self, group: str, callback: Any) -> None:
        callback(self.remote.get(group, []))

    def history_policy(self, group: str) -> HistoryPolicy | None:
        return HistoryPolicy(3, 60.0) if group.startswith("h:") else None

    def history(self, group: str, since: int | None, limit: int, callback: Any) -> None:
        policy = self.history_policy(group)
        assert policy is not None
        callback(self.store.read(group, policy, since, limit))

    def get(self, session_id: str) -> Any:
        return next((s for members in self.groups.values() for s in members if s.id == session_id), None)

    def members(self, group: str) -> list[Any]:
        return list(self.groups.get(group, []))

    def stats(self) -> ServerStats:
        return ServerStats(
            started_at=0.0, draining=False, accepted=5, accept_errors=0, rejected={}, handshake_failures=0,
            messages_in=7, messages_out=9, plugin_errors=0, slow_consumers_dropped=0, close_codes={}, bytes_in=0,
            bytes_out=0, sockets_open=3, handshaking=0, open_by_route={"/broadcast/{channel}": 3}, groups=2,
            write_buffer_bytes=0, loop_iterations=0, loop_lag_max=0.0, timers=0,
            broker=BrokerStats(kind="memory", up=True, status=None, dropped=0, reconnects=0),
        )


def request(method: str = "publish", *, http_method: str = "POST", headers: list[tuple[str, str]] | None = None,
            body: bytes = b"") -> Request:
    fields = [("Host", "x"), *(headers if headers is not None else [("X-API-Key", KEY)])]
    if body and not any(k.lower() == "content-length" for k, _ in fields):
        fields.append(("Content-Length", str(len(body))))
    return Request(http_method, API_PREFIX + method, (1, 1), Headers(fields), path=API_PREFIX + method)


def call(api: ServerApi, method: str, params: Any, **kw: Any) -> tuple[int, Any]:
    body = params if isinstance(params, bytes) else json.dumps(params).encode()
    req = request(method, body=body, **kw)
    decided = api.prepare(req)
    if not isinstance(decided, int):
        return decided[0], json.loads(decided[2])
    assert decided == len(body)
    result = api.handle(req, body)
    if isinstance(result, Pending):
        answers: list[Any] = []
        result.then(answers.append)
        assert answers, "a Pending answer that never came"
        result = answers[0]
    status, headers, answer = result
    assert ("Content-Type", "application/json") in headers
    return status, json.loads(answer)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer(groups={"g": [FakeSession("0123456789ab.1"), FakeSession("0123456789ab.2", remote=("::1", 9))]})


@pytest.fixture
def api(server: FakeServer) -> ServerApi:
    return ServerApi(server, KEY, 1000)


def test_prepare_answers_from_the_head(api):
    assert api.prepare(request(http_method="GET"))[0] == 405  # type: ignore[index]
    assert ("Allow", "POST") in api.prepare(request(http_method="GET"))[1]  # type: ignore[index]
    assert api.prepare(request(headers=[]))[0] == 401  # type: ignore[index]
    assert api.prepare(request(headers=[("X-API-Key", "nope")]))[0] == 401  # type: ignore[index]
    assert api.prepare(request(headers=[("Authorization", f"Bearer {KEY}")]))[0] == 401  # type: ignore[index]
    assert api.prepare(request(headers=[("Authorization", f"apikey {KEY}")])) == 0
    assert api.prepare(request(headers=[("Authorization", "Bearer x"), ("X-API-Key", KEY)])) == 0
    assert api.prepare(request("nope"))[0] == 404  # type: ignore[index]
    assert api.prepare(request("nope", headers=[]))[0] == 401  # type: ignore[index]  # no method listing for strangers
    big = request(headers=[("X-API-Key", KEY), ("Content-Length", "1001")])
    assert api.prepare(big)[0] == 413  # type: ignore[index]
    assert api.prepare(request(headers=[("X-API-Key", KEY), ("Content-Length", "1000")])) == 1000
    for bad in ("-1", "1x", "1, 2", "١٢"):
        assert api.prepare(request(headers=[("X-API-Key", KEY), ("Content-Length", bad)]))[0] == 400, bad
    assert api.prepare(request(headers=[("X-API-Key", KEY), ("Content-Length", "5, 5")])) == 5
    assert api.prepare(request(headers=[("X-API-Key", KEY), ("Transfer-Encoding", "chunked")]))[0] == 411


def test_publish_and_broadcast_go_through_server_broadcast(api, server):
    assert call(api, "publish", {"group": "g", "data": "héllo"}) == (200, {"result": {"delivered_local": 2}})
    blob = bytes(range(10))
    assert call(api, "publish", {"group": "h", "data_b64": base64.b64encode(blob).decode()})[0] == 200
    status, answer = call(api, "broadcast", {"groups": ["g", "h", "g"], "data": "x"})
    assert (status, answer) == (200, {"result": {"delivered_local": 2, "groups": 2}})
    assert server.published == [("g", "héllo"), ("h", blob), ("g", "x"), ("h", "x")]


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("publish", {"data": "x"}, "group"),
        ("publish", {"group": ["g"], "data": "x"}, "group"),
        ("publish", {"group": "g"}, "data"),
        ("publish", {"group": "g", "data": None}, "data"),
        ("publish", {"group": "g", "data_b64": "@@@"}, "data_b64"),
        ("publish", {"group": "g", "data_b64": 12}, "data_b64"),
        ("publish", {"group": "\udc80", "data": "x"}, "group"),
        ("publish", {"group": "g", "data": "x", "extra": 1}, "extra"),
        ("broadcast", {"data": "x"}, "groups"),
        ("broadcast", {"groups": ["g"] * 101, "data": "x"}, "groups"),
        ("broadcast", {"groups": ["g", ""], "data": "x"}, "groups[1]"),
        ("disconnect", {"group": "g", "code": 999}, "code"),
        ("disconnect", {"group": "g", "code": 1006}, "code"),
        ("disconnect", {"group": "g", "reason": 5}, "reason"),
        ("disconnect", {"group": "g", "reason": "é" * 62}, "reason"),
        ("disconnect", {"session": 5}, "session"),
        ("presence", {"group": ""}, "group"),
        ("info", {"x": 1}, "x"),
    ],
)
def test_bad_fields_are_400_naming_the_field(api, server, method, params, field):
    status, answer = call(api, method, params)
    assert status == 400 and answer["error"]["code"] == "invalid_field" and answer["error"]["field"] == field
    assert repr(field) in answer["error"]["message"]
    assert server.published == []


@pytest.mark.parametrize("body", [b"{", b"[1]", b"null", b"\xff", b"1e400000", b"[" * 999])
def test_bad_json_is_400(api, body):
    status, answer = call(api, "info", body)
    assert status == 400 and answer["error"]["code"] == "bad_json"


def test_an_empty_body_is_an_empty_object(api):
    assert call(api, "info", b"")[0] == 200
    assert call(api, "info", b"  \n")[0] == 200


def test_disconnect_presence_info_history(api, server):
    one, two = server.groups["g"]
    assert call(api, "disconnect", {"session": one.id, "code": 4000, "reason": "bye"}) == (
        200, {"result": {"disconnected": 1, "scope": "local"}})
    assert one.closed_with == (4000, "bye") and two.closed_with is None
    assert call(api, "disconnect", {"group": "g"})[1]["result"]["disconnected"] == 1  # one was closing already
    assert two.closed_with == (1000, "")
    assert call(api, "disconnect", {"session": "ffffffffffff.1"})[1]["result"]["disconnected"] == 0
    server.remote["g"] = [Member("fedcba987654.3", "fedcba987654", "alice", {"name": "Alice"})]
    status, answer = call(api, "presence", {"group": "g"})
    assert status == 200 and answer["result"] == {
        "group": "g", "scope": "cluster", "instance": "0123456789ab", "count": 3,
        "members": [{"session": "0123456789ab.1", "instance": "0123456789ab", "user": None, "info": {},
                     "path": "/broadcast/x", "remote": "192.0.2.7:4242"},
                    {"session": "0123456789ab.2", "instance": "0123456789ab", "user": None, "info": {},
                     "path": "/broadcast/x", "remote": "[::1]:9"},
                    {"session": "fedcba987654.3", "instance": "fedcba987654", "user": "alice",
                     "info": {"name": "Alice"}}],
    }
    # A group this instance does not follow: the other instances are asked.
    server.remote["elsewhere"] = [Member("fedcba987654.4", "fedcba987654")]
    answer = call(api, "presence", {"group": "elsewhere"})[1]["result"]
    assert answer["count"] == 1 and answer["members"][0]["session"] == "fedcba987654.4"
    info = call(api, "info", {})[1]["result"]
    assert info["instance"] == "0123456789ab" and info["connections"] == 3 and info["groups"] == 2
    assert (info["messages_in"], info["messages_out"]) == (7, 9) and info["broker"] == {"kind": "memory", "up": True}
    status, answer = call(api, "history", {"group": "g"})  # no route keeps history for it
    assert status == 404 and answer["error"]["code"] == "no_history" and answer["error"]["field"] == "group"


def test_history_reads_since_an_offset_with_limit_epoch_and_trimming(api, server):
    first = call(api, "history", {"group": "h:1"})[1]["result"]
    assert first["offset"] == 0 and first["messages"] == [] and first["complete"] is True
    epoch = first["epoch"]
    for i in range(4):  # history_size 3: the first one is trimmed
        assert call(api, "publish", {"group": "h:1", "data": f"m{i}"})[0] == 200
    assert call(api, "publish", {"group": "h:1", "data_b64": "AAE="})[0] == 200
    result = call(api, "history", {"group": "h:1", "since": 2})[1]["result"]
    assert result["epoch"] == epoch and result["offset"] == 5 and result["complete"] is True
    assert result["messages"] == [{"offset": 3, "data": "m2"}, {"offset": 4, "data": "m3"},
                                  {"offset": 5, "data_b64": "AAE="}]
    cut = call(api, "history", {"group": "h:1", "since": 2, "limit": 1})[1]["result"]
    assert cut["messages"] == [{"offset": 3, "data": "m2"}] and cut["complete"] is False  # ask again from 3
    trimmed = call(api, "history", {"group": "h:1", "since": 0})[1]["result"]
    assert [m["offset"] for m in trimmed["messages"]] == [3, 4, 5] and trimmed["complete"] is False
    other = call(api, "history", {"group": "h:1", "since": {"epoch": "not-" + epoch, "offset": 2}})[1]["result"]
    assert other["messages"] == [] and other["complete"] is False and other["epoch"] == epoch
    same = call(api, "history", {"group": "h:1", "since": {"epoch": epoch, "offset": 4}})[1]["result"]
    assert same["messages"] == [{"offset": 5, "data_b64": "AAE="}] and same["complete"] is True
    for bad in ({"since": -1}, {"since": "3"}, {"since": {"epoch": epoch}}, {"limit": 0}, {"limit": 4},
                {"limit": True}):
        status, answer = call(api, "history", {"group": "h:1", **bad})
        assert status == 400 and answer["error"]["field"] in bad, (bad, answer)


def test_history_when_the_broker_cannot_read_it_is_503(api, server):
    server.history = lambda group, since, limit, callback: callback(HistoryResult("", 0, error="broker down"))
    status, answer = call(api, "history", {"group": "h:2"})
    assert status == 503 and answer["error"]["code"] == "broker_unavailable" and "broker down" in answer["error"][
        "message"]


# ------------------------------------------------------------------------------------ the body, sans-I/O
def _wire(body: bytes, extra: str = "") -> bytes:
    return (f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: {len(body)}\r\n{extra}"
            "\r\n").encode() + body


def _router(api: ServerApi) -> Router:
    router = Router([])
    router.body_handlers = {API_PREFIX: api}
    return router


def test_the_body_is_read_by_the_protocol_then_answered(api, server):
    body = json.dumps({"group": "g", "data": "hi"}).encode()
    ws = ServerProtocol()
    wire = _wire(body)
    head_end = wire.index(b"\r\n\r\n") + 4
    [req] = ws.receive_data(wire[: head_end + 3])  # the head and 3 bytes of the body
    outcome = answer_request(ws, req, ("192.0.2.1", 1), _router(api), Admission())
    assert outcome.endpoint is api and outcome.body_size == len(body)
    assert ws.expect_body(req, outcome.body_size) == [] and not ws.has_output  # no Expect: no 100 Continue
    assert ws.receive_data(wire[head_end + 3 : -1]) == []
    [event] = ws.receive_data(wire[-1:] + b"ignored trailing bytes")
    assert isinstance(event, RequestBody) and event.body == body and event.request is req
    answer = answer_body(req, ("192.0.2.1", 1), api, event.body)
    assert answer.response.status == 200 and json.loads(answer.response.body) == {"result": {"delivered_local": 2}}
    ws.send_response(answer.response)
    assert ws.data_to_send().startswith(b"HTTP/1.1 200 OK\r\n") and ws.close_transport


def test_expect_100_continue_and_a_body_already_in(api):
    body = b'{"group": "g", "data": "x"}'
    ws = ServerProtocol()
    head = _wire(b"", "Expect: 100-continue\r\n").replace(b"Length: 0", f"Length: {len(body)}".encode())
    [req] = ws.receive_data(head)
    assert ws.expect_body(req, len(body)) == []
    assert ws.data_to_send() == b"HTTP/1.1 100 Continue\r\n\r\n"
    [event] = ws.receive_data(body)
    assert event.body == body
    ws = ServerProtocol()
    [req] = ws.receive_data(_wire(body, "Expect: 100-continue\r\n"))
    [event] = ws.expect_body(req, len(body))  # all in already: at once, and no 100 Continue
    assert event.body == body and ws.data_to_send() == b""
    with pytest.raises(RuntimeError):  # no request head waiting for its answer
        ServerProtocol().expect_body(req, 1)


def test_a_refusal_from_the_head_is_an_ordinary_answer(api):
    ws = ServerProtocol()
    [req] = ws.receive_data(_wire(b"x" * 2000))
    outcome = answer_request(ws, req, ("192.0.2.1", 1), _router(api), Admission())
    assert outcome.endpoint is None and outcome.response.status == 413 and "at most 1000" in outcome.reason


# ------------------------------------------------------------------------------------ the key, the ids
def test_read_api_key(tmp_path, monkeypatch):
    assert read_api_key(parse_config({})) is None
    (tmp_path / "k").write_text("  secret\n")
    config = parse_config({"api": {"key_file": "k"}}, str(tmp_path / "c.toml"))
    assert read_api_key(config) == "secret"  # relative to the configuration file
    (tmp_path / "k").write_text("\n")
    with pytest.raises(ConfigError) as err:
        read_api_key(config)
    assert err.value.key == "api.key_file" and "empty" in err.value.reason
    (tmp_path / "k").unlink()
    with pytest.raises(ConfigError) as err:
        read_api_key(config)
    assert err.value.key == "api.key_file" and "cannot read" in err.value.reason
    monkeypatch.setenv("SELECTWS_UNIT_KEY", " k ")
    assert read_api_key(parse_config({"api": {"key_env": "SELECTWS_UNIT_KEY"}})) == "k"
    monkeypatch.delenv("SELECTWS_UNIT_KEY")
    with pytest.raises(ConfigError) as err:
        read_api_key(parse_config({"api": {"key_env": "SELECTWS_UNIT_KEY"}}))
    assert err.value.key == "api.key_env" and "not set" in err.value.reason


@pytest.mark.parametrize(("api_table", "key"), [
    ({"key_file": "a", "key_env": "B"}, "api.key_env"),
    ({"key_env": "NOT-A NAME"}, "api.key_env"),
    ({"key": "inline"}, "api.key"),
])
def test_api_config_errors(api_table, key):
    with pytest.raises(ConfigError) as err:
        parse_config({"api": api_table})
    assert err.value.key == key


def test_session_ids_carry_the_instance_and_get_finds_them():
    from harness import in_process_server

    with in_process_server() as a, in_process_server() as b:
        assert a.server.instance_id != b.server.instance_id and len(a.server.instance_id) == 12
        sock: socket.socket = a.connect("/echo")
        a.run_until(lambda: len(a.server.all_sessions()) == 1)
        [session] = a.server.all_sessions()
        assert isinstance(session.id, str) and session.id.startswith(a.server.instance_id + ".")
        assert a.server.get(session.id) is session
        assert b.server.get(session.id) is None
        for bad in ("", "x", session.id + "0", session.id.replace(".", ":"), session.id.rpartition(".")[2]):
            assert a.server.get(bad) is None, bad
        sock.close()
