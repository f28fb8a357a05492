"""The server API: ``POST /api/<method>`` with a JSON body, for a backend that drives the daemon (docs/api.md).

It answers on the listener(s) of ``/healthz`` and ``/metrics`` (the WebSocket port, or ``[ops] listen`` alone when
that is set) and only once a key is configured (``[api] key_file`` / ``key_env``, read by the application). Every
request is decided in two steps (:class:`~selectws.server.routing.BodyHandler`): from the head -- 405 for a method
other than POST, 401 without the right key (compared in constant time), 404 for an unknown method name, 411 / 400
for a missing or malformed ``Content-Length``, 413 past ``[limits] max_message_size`` -- and then from the body,
read by the connection without blocking and within the handshake timeout. Answers are JSON: ``{"result": {...}}``
(200) or ``{"error": {"code": ..., "message": ..., "field": ...}}``.

Methods: ``publish`` and ``broadcast`` go through ``Server.broadcast``, so through the broker to every instance (and
into a group's history when its route keeps one); ``presence`` lists a group's members on every instance
(docs/presence.md); ``history`` reads a group's history (docs/history.md); ``disconnect`` sees this instance only;
``info`` describes this instance. ``presence`` of a group this instance has no member in, and ``history`` with the
Redis broker, wait for the broker (a second at most): the answer is sent when it comes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from selectws import __version__
from selectws.protocol.errors import is_valid_close_code
from selectws.protocol.http11 import Request
from selectws.server.api import Session
from selectws.server.history import HistoryPolicy, HistoryResult
from selectws.server.presence import Member
from selectws.server.routing import HttpResult, Pending
from selectws.server.stats import ServerStats

__all__ = ["API_PREFIX", "MAX_GROUPS", "ApiError", "ApiServer", "ServerApi"]

API_PREFIX = "/api/"
MAX_GROUPS = 100  # groups in one ``broadcast``
_MAX_REASON = 123  # bytes of a close reason (RFC 6455 section 5.5: a control frame payload is at most 125)
_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class ApiServer(Protocol):
    """What the API needs of the server (:class:`~selectws.server.server.Server` provides it)."""

    instance_id: str

    def broadcast(self, group: str, message: str | bytes) -> int: ...

    def get(self, session_id: str) -> Session | None: ...

    def members(self, group: str) -> list[Session]: ...

    def stats(self) -> ServerStats: ...

    def presence(self, group: str) -> list[Member]: ...

    def follows(self, group: str) -> bool:
        """Whether this instance has members in ``group`` (its presence view of it is then exact)."""
        ...

    def presence_query(self, group: str, callback: Callable[[list[Member]], None]) -> None: ...

    def history_policy(self, group: str) -> HistoryPolicy | None: ...

    def history(self, group: str, since: int | None, limit: int, callback: Callable[[HistoryResult], None]) -> None:
        ...


class ApiError(Exception):
    """An answer other than 200: ``status`` and the ``{"error": ...}`` object."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or []

    def result(self) -> HttpResult:
        error: dict[str, str] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return self.status, [*_HEADERS, *self.headers], _dump({"error": error})


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", f"field {field!r}: {message}", field)


class ServerApi:
    """The ``/api/`` endpoint of one server with one key (rebuilt on reload)."""

    def __init__(self, server: ApiServer, key: str, max_body: int, log: Any = None) -> None:
        self.server = server
        self._key = key.encode("utf-8")
        self.max_body = max_body
        self.log = log
        self.methods: dict[str, Callable[[dict[str, Any]], dict[str, Any] | Pending]] = {
            "publish": self._publish,
            "broadcast": self._broadcast,
            "disconnect": self._disconnect,
            "presence": self._presence,
            "info": self._info,
            "history": self._history,
        }

    # ------------------------------------------------------------------ BodyHandler
    def prepare(self, request: Request) -> HttpResult | int:
        """From the head: an answer now, or how many body bytes to read."""
        try:
            if request.method != "POST":
                raise ApiError(405, "method_not_allowed", f"use POST, not {request.method}", None, [("Allow", "POST")])
            self._authenticate(request)
            name = request.path[len(API_PREFIX):]
            if name not in self.methods:
                raise ApiError(404, "unknown_method",
                               f"no API method {name[:100]!r}; one of {', '.join(sorted(self.methods))}")
            return self._content_length(request)
        except ApiError as exc:
            return exc.result()

    def handle(self, request: Request, body: bytes) -> HttpResult | Pending:
        """With the body: run the method."""
        name = request.path[len(API_PREFIX):]
        try:
            params = self._params(body)
            result = self.methods[name](params)
        except ApiError as exc:
            return exc.result()
        if isinstance(result, Pending):
            return result
        return _ok(result)

    # ------------------------------------------------------------------ the head
    def _authenticate(self, request: Request) -> None:
        offered: list[str] = []
        for value in request.headers.get_all("Authorization"):
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "apikey":
                offered.append(credentials.strip())
        offered += [v.strip() for v in request.headers.get_all("X-API-Key")]
        challenge = [("WWW-Authenticate", 'apikey realm="selectws"')]
        if not offered:
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: apikey <key>' or "
                                                "'X-API-Key: <key>'", None, challenge)
        ok = False
        for candidate in offered:  # every candidate is compared, in constant time each
            ok |= hmac.compare_digest(candidate.encode("latin-1"), self._key)
        if not ok:
            raise ApiError(401, "unauthorized", "wrong API key", None, challenge)

    def _content_length(self, request: Request) -> int:
        values = request.headers.get_all("Content-Length")
        if not values:
            if request.headers.get("Transfer-Encoding") is not None:
                raise ApiError(411, "length_required", "send the body with Content-Length (chunked bodies are not "
                                                       "accepted)")
            return 0  # no body: an empty object
        text = {v.strip() for value in values for v in value.split(",")}
        if len(text) != 1:
            raise ApiError(400, "bad_request", "conflicting Content-Length values")
        raw = text.pop()
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            raise ApiError(400, "bad_request", f"malformed Content-Length {raw[:40]!r}")
        if request.headers.get("Transfer-Encoding") is not None:
            raise ApiError(400, "bad_request", "both Content-Length and Transfer-Encoding")
        size = int(raw)
        if size > self.max_body:
            raise ApiError(413, "too_large", f"the body is {size} bytes; at most {self.max_body} "
                                             "([limits] max_message_size)")
        return size

    # ------------------------------------------------------------------ the body
    @staticmethod
    def _params(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            params = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise ApiError(400, "bad_json", f"the body must be a JSON object, got {type(params).__name__}")
        return params

    @staticmethod
    def _only(params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for name in params:
            if name not in allowed:
                raise _bad(name, f"unknown field; expected {', '.join(allowed) or 'none'}")

    @staticmethod
    def _string(params: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
        value = params.get(name)
        if value is None:
            if required:
                raise _bad(name, "required")
            return None
        if not isinstance(value, str) or not value:
            raise _bad(name, "must be a non-empty string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(name, "not valid Unicode (a lone surrogate)") from None
        return value

    def _message(self, params: Mapping[str, Any]) -> str | bytes:
        """``data`` (a text message) or ``data_b64`` (a binary one): exactly one of them."""
        if ("data" in params) == ("data_b64" in params):
            raise _bad("data", "give 'data' (text) or 'data_b64' (binary), one of them")
        if "data" in params:
            data = params["data"]
            if not isinstance(data, str):
                raise _bad("data", f"must be a string, got {_kind(data)} (use data_b64 for binary)")
            try:
                data.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("data", "not valid Unicode (a lone surrogate)") from None
            return data
        raw = params["data_b64"]
        if not isinstance(raw, str):
            raise _bad("data_b64", f"must be a base64 string, got {_kind(raw)}")
        try:
            return base64.b64decode(raw.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise _bad("data_b64", "not valid base64") from None

    # ------------------------------------------------------------------ methods
    def _publish(self, params: dict[str, Any]) -> dict[str, Any]:
        self._only(params, ("group", "data", "data_b64"))
        group = self._string(params, "group")
        assert group is not None
        message = self._message(params)
        delivered = self.server.broadcast(group, message)
        self._debug("api publish", group=group, delivered_local=delivered)
        return {"delivered_local": delivered}

    def _broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        self._only(params, ("groups", "data", "data_b64"))
        groups = params.get("groups")
        if groups is None:
            raise _bad("groups", "required")
        if not isinstance(groups, list) or not groups:
            raise _bad("groups", "must be a non-empty array of group names")
        if len(groups) > MAX_GROUPS:
            raise _bad("groups", f"at most {MAX_GROUPS} groups, got {len(groups)}")
        names: dict[str, None] = {}  # in order, each once
        for i, group in enumerate(groups):
            names[self._string({f"groups[{i}]": group}, f"groups[{i}]") or ""] = None
        message = self._message(params)
        delivered = sum(self.server.broadcast(group, message) for group in names)
        self._debug("api broadcast", groups=len(names), delivered_local=delivered)
        return {"delivered_local": delivered, "groups": len(names)}

    def _disconnect(self, params: dict[str, Any]) -> dict[str, Any]:
        self._only(params, ("session", "group", "user", "code", "reason"))
        if sum(name in params for name in ("session", "group", "user")) != 1:
            raise _bad("session", "give 'session' (an id), 'group' or 'user', one of them")
        code = params.get("code", 1000)
        if isinstance(code, bool) or not isinstance(code, int) or not is_valid_close_code(code):
            raise _bad("code", f"must be a close code that may be sent (1000, 1001, 1008, 1011-1014, 3000-4999), "
                               f"got {code!r}")
        reason = params.get("reason", "")
        if not isinstance(reason, str):
            raise _bad("reason", f"must be a string, got {_kind(reason)}")
        try:
            if len(reason.encode("utf-8")) > _MAX_REASON:
                raise _bad("reason", f"at most {_MAX_REASON} bytes of UTF-8")
        except UnicodeEncodeError:
            raise _bad("reason", "not valid Unicode (a lone surrogate)") from None
        if "session" in params:
            session_id = self._string(params, "session")
            assert session_id is not None
            found = self.server.get(session_id)
            targets = [found] if found is not None else []
        elif "user" in params:  # every connection authenticated as this user (its group user:<sub>), here
            user = self._string(params, "user")
            targets = [s for s in self.server.members(f"user:{user}") if s.user == user]
        else:
            group = self._string(params, "group")
            assert group is not None
            targets = list(self.server.members(group))
        closed = 0
        for session in targets:
            if session.open:
                session.close(code, reason)
                closed += 1
        self._debug("api disconnect", disconnected=closed, code=code)
        return {"disconnected": closed, "scope": "local"}

    def _presence(self, params: dict[str, Any]) -> dict[str, Any] | Pending:
        """Every instance's members: this one's (with their path and address), then the others' (session, instance,
        user, info). A group this instance follows is answered from its view at once; another one after asking the
        instances that follow it (the broker; at most a second)."""
        self._only(params, ("group",))
        group = self._string(params, "group")
        assert group is not None
        server = self.server
        local = {s.id: s for s in server.members(group)}

        def answer(members: list[Member]) -> dict[str, Any]:
            out = []
            for m in members:
                item = m.as_dict()
                session = local.get(m.session)
                if session is not None:
                    item["path"] = session.path
                    item["remote"] = _address(session.remote)
                out.append(item)
            return {"group": group, "scope": "cluster", "instance": server.instance_id, "count": len(out),
                    "members": out}

        if server.follows(group):
            return answer(server.presence(group))
        pending = Pending()
        server.presence_query(group, lambda others: pending.resolve(_ok(answer(server.presence(group) + others))))
        return pending

    def _info(self, params: dict[str, Any]) -> dict[str, Any]:
        self._only(params, ())
        stats = self.server.stats()
        return {
            "instance": self.server.instance_id,
            "version": __version__,
            "uptime": round(max(0.0, time.time() - stats.started_at), 3),
            "draining": stats.draining,
            "connections": stats.connections_open,
            "groups": stats.groups,
            "messages_in": stats.messages_in,
            "messages_out": stats.messages_out,
            "broker": {"kind": stats.broker.kind, "up": stats.broker.up},
        }

    def _history(self, params: dict[str, Any]) -> Pending:
        """``{"group", "since"?, "limit"?}``: the group's epoch, its latest offset, and up to ``limit`` messages above
        ``since`` (oldest first; without ``since``, from the oldest kept). ``since`` is an offset, or
        ``{"epoch", "offset"}``: then a different epoch gives no messages. ``complete`` says whether the messages
        are every one above ``since`` (false: the epoch differs, some were trimmed, or ``limit`` cut the list --
        ask again from the last offset)."""
        self._only(params, ("group", "since", "limit"))
        group = self._string(params, "group")
        assert group is not None
        policy = self.server.history_policy(group)
        if policy is None:
            raise ApiError(404, "no_history", f"no route keeps history for group {group!r} (set history_size on the "
                                              "route that owns it)", "group")
        since, epoch = self._since(params.get("since"))
        limit = params.get("limit", policy.size)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= policy.size:
            raise _bad("limit", f"must be an integer from 1 to {policy.size} (the route's history_size)")
        pending = Pending()

        def done(result: HistoryResult) -> None:
            if result.error is not None:
                pending.resolve(ApiError(503, "broker_unavailable", f"history cannot be read: {result.error}",
                                         None, [("Retry-After", "1")]).result())
                return
            same = epoch is None or epoch == result.epoch
            messages = result.messages if same else []
            out = []
            for offset, message in messages:
                item: dict[str, Any] = {"offset": offset}
                if isinstance(message, str):
                    item["data"] = message
                else:
                    item["data_b64"] = base64.b64encode(message).decode("ascii")
                out.append(item)
            start = since if since is not None else (messages[0][0] - 1 if messages else result.offset)
            complete = same and HistoryResult(result.epoch, result.offset, messages).complete_since(start)
            pending.resolve(_ok({"group": group, "epoch": result.epoch, "offset": result.offset, "messages": out,
                                 "complete": complete}))

        self.server.history(group, since if since is not None else 0, limit, done)
        return pending

    @staticmethod
    def _since(value: Any) -> tuple[int | None, str | None]:
        if value is None:
            return None, None
        if isinstance(value, dict):
            if set(value) != {"epoch", "offset"} or not isinstance(value["epoch"], str):
                raise _bad("since", 'must be an offset, or {"epoch": "...", "offset": N}')
            epoch, value = value["epoch"], value["offset"]
        else:
            epoch = None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad("since", "the offset must be an integer >= 0")
        return value, epoch

    def _debug(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.debug(event, **fields)


def _ok(result: dict[str, Any]) -> HttpResult:
    return 200, list(_HEADERS), _dump({"result": result})


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
            str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _address(remote: tuple[str, int]) -> str:
    host, port = remote
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
