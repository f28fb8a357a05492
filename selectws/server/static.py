"""Static files over plain HTTP on the WebSocket port: the built-in browser chat demo, or a folder of your own.

:class:`StaticFiles` is a :data:`selectws.server.routing.HttpHandler`; the server installs it as
``router.fallback`` when ``[static].enabled``, so it answers every plain ``GET``/``HEAD`` that no WebSocket route
and no exact HTTP path (``/healthz``, ``/metrics``) took. It is meant for a handful of small files:

* files are read whole on the loop's thread and kept in a small cache keyed by path, size and mtime, so an edited
  file is picked up on the next request and an unchanged one is not read again;
* every answer carries ``ETag`` (a hash of size and mtime) and ``Last-Modified``, and ``Cache-Control: no-cache``,
  so a browser revalidates each time and gets a body-less ``304`` while nothing changed;
* a request can only reach a regular file inside the root: the path (already percent-decoded by the HTTP parser,
  so ``%2e%2e`` arrives as ``..``) is refused if it has a NUL, a backslash or a ``.``/``..`` segment, hidden
  files (``.git``, ``.env``) are not served, and the resolved file (symlinks followed) must still be inside the
  resolved root, so a symlink pointing out of the folder is a 404 too.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

from selectws.protocol.http11 import Request
from selectws.server.routing import HttpHandler, HttpResult

__all__ = ["BUILTIN_DIRECTORY", "StaticFiles", "content_type_for", "static_handler"]

#: The chat demo shipped inside the package (``selectws/web``).
BUILTIN_DIRECTORY = Path(__file__).resolve().parent.parent / "web"

#: Files larger than this are refused (413 would be wrong for a response; 404 hides them): the loop reads a
#: file whole on its only thread, so a folder of videos is a job for a real web server.
MAX_FILE_SIZE = 8 << 20
_CACHE_ENTRIES = 64

# Explicit types for what the demo uses, so a machine with an odd /etc/mime.types cannot serve app.js as
# text/plain (browsers refuse to run a script served with the wrong type once nosniff is set).
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".wasm": "application/wasm",
}


def content_type_for(name: str) -> str:
    """The ``Content-Type`` for a file name: the explicit table, then :mod:`mimetypes`, then octet-stream."""
    suffix = os.path.splitext(name)[1].lower()
    explicit = _TYPES.get(suffix)
    if explicit is not None:
        return explicit
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed is None or encoding is not None:  # foo.tar.gz is not "application/x-tar" on the wire
        return "application/octet-stream"
    if guessed.startswith("text/") or guessed in ("application/javascript", "application/xml"):
        return f"{guessed}; charset=utf-8"
    return guessed


@dataclass(frozen=True, slots=True)
class _Entry:
    size: int
    mtime_ns: int
    etag: str
    last_modified: str
    mtime_s: int
    body: bytes


def _not_found() -> HttpResult:
    return 404, [("Cache-Control", "no-cache")], b"404 Not Found\n"


class StaticFiles:
    """Serve the files under ``directory`` at ``url_prefix``; ``/`` (and any folder) serves its ``index.html``."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, url_prefix: str = "/") -> None:
        root = Path(directory) if directory else BUILTIN_DIRECTORY
        self.root = root.resolve()
        if not self.root.is_dir():
            raise ValueError(f"static directory {str(root)!r} is not a folder")
        prefix = url_prefix if url_prefix.startswith("/") else "/" + url_prefix
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._cache: dict[Path, _Entry] = {}

    def __call__(self, request: Request) -> HttpResult:
        if request.method not in ("GET", "HEAD"):
            return 405, [("Allow", "GET, HEAD")], b"405 Method Not Allowed\n"
        path = request.path
        if path == self.prefix[:-1] and path:
            # "/demo" -> "/demo/": the page's relative URLs (app.js, style.css) need the trailing slash.
            location = self.prefix + (f"?{request.query_string}" if request.query_string else "")
            return 301, [("Location", location), ("Cache-Control", "no-cache")], b""
        if not path.startswith(self.prefix):
            return _not_found()
        rel = path[len(self.prefix) :]
        if "\x00" in rel or "\\" in rel:
            return 400, [], b"400 Bad Request: invalid path\n"
        parts = [p for p in rel.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return 400, [], b"400 Bad Request: invalid path\n"
        if any(p.startswith(".") for p in parts):
            return _not_found()
        want_dir = rel == "" or rel.endswith("/")
        target = self.root.joinpath(*parts)
        try:
            resolved = target.resolve(strict=True)
            if not resolved.is_relative_to(self.root):
                return _not_found()  # a symlink pointing out of the root
            if resolved.is_dir():
                if not want_dir:
                    location = path + "/" + (f"?{request.query_string}" if request.query_string else "")
                    return 301, [("Location", location), ("Cache-Control", "no-cache")], b""
                resolved = (resolved / "index.html").resolve(strict=True)
                if not resolved.is_relative_to(self.root):
                    return _not_found()
            elif want_dir:
                return _not_found()  # "/app.js/" is not a folder
            entry = self._load(resolved)
        except (FileNotFoundError, NotADirectoryError):
            return _not_found()
        except PermissionError:
            return 403, [], b"403 Forbidden\n"
        except OSError:
            return _not_found()
        if entry is None:
            return _not_found()
        headers = [
            ("Content-Type", content_type_for(resolved.name)),
            ("ETag", entry.etag),
            ("Last-Modified", entry.last_modified),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if _not_modified(request, entry):
            # A 304 carries the validators but no body; its Content-Length is that of the 200 (RFC 9110 8.6).
            return 304, [*headers, ("Content-Length", str(entry.size))], b""
        return 200, headers, entry.body

    def _load(self, path: Path) -> _Entry | None:
        """The file's bytes and validators, from the cache while its size and mtime have not changed."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_SIZE:
                return None
            cached = self._cache.get(path)
            if cached is not None and cached.size == st.st_size and cached.mtime_ns == st.st_mtime_ns:
                return cached
            chunks = []
            remaining = st.st_size
            while remaining > 0:
                chunk = os.read(fd, remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            body = b"".join(chunks)
        finally:
            os.close(fd)
        digest = hashlib.blake2b(f"{path}\0{len(body)}\0{st.st_mtime_ns}".encode(), digest_size=12).hexdigest()
        entry = _Entry(
            size=len(body),
            mtime_ns=st.st_mtime_ns,
            etag=f'"{digest}"',
            last_modified=formatdate(st.st_mtime, usegmt=True),
            mtime_s=int(st.st_mtime),
            body=body,
        )
        if len(self._cache) >= _CACHE_ENTRIES and path not in self._cache:
            self._cache.pop(next(iter(self._cache)))
        self._cache[path] = entry
        return entry


def _not_modified(request: Request, entry: _Entry) -> bool:
    """RFC 9110 section 13.2.2: ``If-None-Match`` (weak comparison) wins; ``If-Modified-Since`` only without it."""
    inm = request.headers.get_all("If-None-Match")
    if inm:
        tags = [t.strip() for value in inm for t in value.split(",")]
        if "*" in tags:
            return True
        mine = entry.etag
        return any((t[2:] if t.startswith("W/") else t) == mine for t in tags)
    ims = request.headers.get("If-Modified-Since")
    if ims is None:
        return False
    try:
        since = parsedate_to_datetime(ims)
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:
        return False  # not an HTTP date (those are always GMT)
    return entry.mtime_s <= int(since.timestamp())


def static_handler(
    config: Any, *, base: str | os.PathLike[str] | None = None, warn: Callable[..., Any] | None = None
) -> HttpHandler | None:
    """The fallback handler for a ``[static]`` config section, or ``None`` when disabled or unusable.

    A relative ``directory`` is taken from ``base`` (the folder of the configuration file). A folder that does
    not exist is logged through ``warn`` and disables static files instead of stopping the daemon: this also
    runs on reload, where an exception would take the running server down.
    """
    if not config.enabled:
        return None
    directory = config.directory
    if directory and base is not None and not os.path.isabs(directory):
        directory = os.path.join(base, directory)
    try:
        return StaticFiles(directory or None, config.url_prefix)
    except ValueError as exc:
        if warn is not None:
            warn("static files disabled", error=str(exc))
        return None
