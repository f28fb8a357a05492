"""A blocking client of the server API (``POST /api/<method>``), for ``selectws publish`` and scripts.

It runs outside the daemon, so blocking is fine: one :mod:`http.client` request per call (the server answers
with ``Connection: close``).
"""

from __future__ import annotations

import http.client
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ApiCallError", "call"]


class ApiCallError(Exception):
    """The call failed: the server's error message (with its status), or why the server could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def call(url: str, method: str, params: dict[str, Any], key: str, *, timeout: float = 10.0,
         context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """``POST <url>/api/<method>`` with ``params`` as JSON; the ``result`` object, or :class:`ApiCallError`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiCallError(f"expected an http:// or https:// URL, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ApiCallError(f"bad URL {url!r}: {exc}") from None
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    body = json.dumps(params, ensure_ascii=False).encode("utf-8")
    path = f"{parts.path.rstrip('/')}/api/{method}"
    try:
        conn.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "X-API-Key": key, "Connection": "close",
        })
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ApiCallError(f"cannot reach {parts.scheme}://{parts.netloc}: {exc}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if response.status == 200 and isinstance(answer, dict) and isinstance(answer.get("result"), dict):
        result: dict[str, Any] = answer["result"]
        return result
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and "message" in error:
        message = f"{response.status} {error.get('code', '')}: {error['message']}"
    else:
        text = raw.decode("utf-8", "replace").strip()[:300]
        message = f"{response.status} {response.reason}" + (f": {text}" if text else "")
    raise ApiCallError(message, response.status)
