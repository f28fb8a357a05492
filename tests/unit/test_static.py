"""Tests for selectws.server.static: files, index, types, traversal, symlinks, validators, 304s, the demo."""

from __future__ import annotations

import os
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from selectws.config import Config, StaticConfig
from selectws.protocol.http11 import Request, build_response, parse_request
from selectws.server import static
from selectws.server.static import BUILTIN_DIRECTORY, StaticFiles, content_type_for, static_handler

MTIME = 1_700_000_000  # a fixed mtime (2023-11-14) so Last-Modified is predictable


def request(target: str, method: str = "GET", headers: dict[str, str] | None = None) -> Request:
    """Parse a real request head, so the path is percent-decoded exactly as the server does it."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    parsed = parse_request(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    assert parsed is not None
    return parsed[0]


def header(result: tuple[int, list[tuple[str, str]], bytes], name: str) -> str | None:
    for key, value in result[1]:
        if key.lower() == name.lower():
            return value
    return None


def write(path: Path, data: bytes | str, mtime: int = MTIME) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    write(root / "index.html", "<h1>home</h1>")
    write(root / "app.js", "console.log(1)")
    write(root / "style.css", "body{}")
    write(root / "logo.svg", "<svg/>")
    write(root / "pic.png", b"\x89PNG\r\n\x1a\n")
    write(root / "data.json", "{}")
    write(root / "notes.txt", "plain")
    write(root / "blob.weirdext", b"\x00\x01")
    write(root / "sub" / "index.html", "<p>sub</p>")
    write(root / "empty" / "file.txt", "x")  # a folder without index.html
    write(root / ".env", "SECRET=1")
    write(root / ".git" / "config", "[core]")
    write(root / "name with space.txt", "spaced")
    write(tmp_path / "secret.txt", "outside the root")
    return root


# ------------------------------------------------------------------------------------------ serving files


def test_root_serves_index_html(site: Path) -> None:
    result = StaticFiles(site)(request("/"))
    assert result[0] == 200
    assert result[2] == b"<h1>home</h1>"
    assert header(result, "Content-Type") == "text/html; charset=utf-8"
    assert header(result, "Cache-Control") == "no-cache"
    assert header(result, "X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize(
    ("target", "ctype"),
    [
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/logo.svg", "image/svg+xml"),
        ("/pic.png", "image/png"),
        ("/data.json", "application/json"),
        ("/notes.txt", "text/plain; charset=utf-8"),
        ("/blob.weirdext", "application/octet-stream"),
    ],
)
def test_content_types(site: Path, target: str, ctype: str) -> None:
    result = StaticFiles(site)(request(target))
    assert result[0] == 200
    assert header(result, "Content-Type") == ctype


def test_content_type_table_ignores_case_and_compression_suffixes() -> None:
    assert content_type_for("APP.JS") == "text/javascript; charset=utf-8"
    assert content_type_for("archive.tar.gz") == "application/octet-stream"
    assert content_type_for("page.xml").startswith(("application/xml", "text/xml"))


def test_percent_encoded_name(site: Path) -> None:
    result = StaticFiles(site)(request("/name%20with%20space.txt"))
    assert (result[0], result[2]) == (200, b"spaced")


def test_folder_with_slash_serves_its_index(site: Path) -> None:
    result = StaticFiles(site)(request("/sub/"))
    assert (result[0], result[2]) == (200, b"<p>sub</p>")


def test_folder_without_slash_redirects(site: Path) -> None:
    result = StaticFiles(site)(request("/sub?x=1"))
    assert result[0] == 301
    assert header(result, "Location") == "/sub/?x=1"


@pytest.mark.parametrize("target", ["/missing.html", "/empty/", "/sub/missing", "/app.js/", "/app.js/x"])
def test_missing_is_404(site: Path, target: str) -> None:
    assert StaticFiles(site)(request(target))[0] == 404


def test_hidden_files_are_not_served(site: Path) -> None:
    handler = StaticFiles(site)
    assert handler(request("/.env"))[0] == 404
    assert handler(request("/.git/config"))[0] == 404
    assert handler(request("/%2egit/config"))[0] == 404


def test_only_get_and_head(site: Path) -> None:
    result = StaticFiles(site)(request("/", method="POST"))
    assert result[0] == 405
    assert header(result, "Allow") == "GET, HEAD"


def test_head_has_the_get_headers(site: Path) -> None:
    handler = StaticFiles(site)
    get = handler(request("/app.js"))
    head = handler(request("/app.js", method="HEAD"))
    assert head == get  # the same answer; a HEAD gets the head only (make_response(head_only=True))
    wire = build_response(*head, head_only=True)
    assert wire.endswith(b"\r\n\r\n")
    assert f"Content-Length: {len(get[2])}".encode() in wire


def test_files_are_reread_when_they_change(site: Path) -> None:
    handler = StaticFiles(site)
    first = handler(request("/app.js"))
    assert handler(request("/app.js")) == first  # cached: same body and validators
    write(site / "app.js", "console.log(2)", mtime=MTIME + 60)
    second = handler(request("/app.js"))
    assert second[2] == b"console.log(2)"
    assert header(second, "ETag") != header(first, "ETag")


def test_too_large_files_are_not_served(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static, "MAX_FILE_SIZE", 5)
    assert StaticFiles(site)(request("/app.js"))[0] == 404


def test_unreadable_file_is_403(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(static.os, "open", refuse)  # chmod 0 would not stop root, who runs CI
    assert StaticFiles(site)(request("/notes.txt"))[0] == 403


# ------------------------------------------------------------------------------------------ traversal


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",  # encoded: the parser already decoded it to ".."
        "/%2E%2E/secret.txt",
        "/sub/..%2f..%2fsecret.txt",  # encoded slashes: "sub/../../secret.txt" after decoding
        "/./index.html",
        "/..%5csecret.txt",  # backslash
        "/index.html%00.js",  # NUL
        "/%00",
    ],
)
def test_traversal_is_refused(site: Path, target: str) -> None:
    status, _, body = StaticFiles(site)(request(target))
    assert status == 400
    assert b"outside" not in body


def test_double_encoding_is_just_a_strange_name(site: Path) -> None:
    # "%252e%252e" decodes once to the literal "%2e%2e": a file name nobody has, never decoded twice.
    assert StaticFiles(site)(request("/%252e%252e/secret.txt"))[0] == 404


def test_symlink_out_of_the_root_is_404(site: Path, tmp_path: Path) -> None:
    (site / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (site / "escape_dir").symlink_to(tmp_path)
    handler = StaticFiles(site)
    assert handler(request("/escape.txt"))[0] == 404
    assert handler(request("/escape_dir/secret.txt"))[0] == 404
    assert handler(request("/escape_dir/"))[0] == 404


def test_symlink_inside_the_root_is_served(site: Path) -> None:
    (site / "alias.js").symlink_to(site / "app.js")
    result = StaticFiles(site)(request("/alias.js"))
    assert (result[0], result[2]) == (200, b"console.log(1)")
    assert header(result, "Content-Type") == "text/javascript; charset=utf-8"


def test_index_symlinked_out_of_the_root_is_404(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    write(tmp_path / "outside.html", "nope")
    (root / "d" / "index.html").symlink_to(tmp_path / "outside.html")
    assert StaticFiles(root)(request("/d/"))[0] == 404


def test_root_itself_may_be_a_symlink(site: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(site)
    assert StaticFiles(link)(request("/app.js"))[0] == 200


# ------------------------------------------------------------------------------------------ validators


def test_etag_and_last_modified(site: Path) -> None:
    result = StaticFiles(site)(request("/app.js"))
    etag = header(result, "ETag")
    assert etag is not None and etag.startswith('"') and etag.endswith('"')
    assert header(result, "Last-Modified") == formatdate(MTIME, usegmt=True)


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
def test_if_none_match_gives_304(site: Path, form: str) -> None:
    handler = StaticFiles(site)
    first = handler(request("/style.css"))
    etag = header(first, "ETag")
    assert etag is not None
    result = handler(request("/style.css", headers={"If-None-Match": form.format(etag=etag)}))
    assert result[0] == 304
    assert result[2] == b""
    assert header(result, "ETag") == etag
    assert header(result, "Content-Length") == str(len(first[2]))  # that of the 200 (RFC 9110 section 8.6)
    wire = build_response(*result)
    assert wire.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert wire.count(b"Content-Length") == 1


def test_if_none_match_other_etag_gives_200(site: Path) -> None:
    result = StaticFiles(site)(request("/style.css", headers={"If-None-Match": '"nope"'}))
    assert result[0] == 200


def test_changed_file_fails_the_old_etag(site: Path) -> None:
    handler = StaticFiles(site)
    etag = header(handler(request("/style.css")), "ETag")
    write(site / "style.css", "body{color:red}", mtime=MTIME + 1)
    assert handler(request("/style.css", headers={"If-None-Match": str(etag)}))[0] == 200


@pytest.mark.parametrize(
    ("since", "status"),
    [
        (MTIME, 304),
        (MTIME + 3600, 304),
        (MTIME - 1, 200),
    ],
)
def test_if_modified_since(site: Path, since: int, status: int) -> None:
    result = StaticFiles(site)(request("/app.js", headers={"If-Modified-Since": formatdate(since, usegmt=True)}))
    assert result[0] == status


@pytest.mark.parametrize("value", ["yesterday", "", "Mon, 99 Foo 2020 99:99:99 GMT"])
def test_bad_if_modified_since_is_ignored(site: Path, value: str) -> None:
    assert StaticFiles(site)(request("/app.js", headers={"If-Modified-Since": value}))[0] == 200


def test_if_none_match_wins_over_if_modified_since(site: Path) -> None:
    headers = {"If-None-Match": '"nope"', "If-Modified-Since": formatdate(MTIME + 3600, usegmt=True)}
    assert StaticFiles(site)(request("/app.js", headers=headers))[0] == 200


# ------------------------------------------------------------------------------------------ prefix, config


def test_url_prefix(site: Path) -> None:
    handler = StaticFiles(site, "/demo")
    assert handler(request("/demo/"))[2] == b"<h1>home</h1>"
    assert handler(request("/demo/app.js"))[0] == 200
    redirect = handler(request("/demo"))
    assert (redirect[0], header(redirect, "Location")) == (301, "/demo/")
    assert handler(request("/app.js"))[0] == 404
    assert handler(request("/demox/app.js"))[0] == 404
    assert handler(request("/demo/../app.js"))[0] == 400


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        StaticFiles(tmp_path / "nope")


def test_static_handler_from_config(site: Path, tmp_path: Path) -> None:
    warnings: list[tuple[str, dict[str, Any]]] = []

    def warn(event: str, **kw: Any) -> None:
        warnings.append((event, kw))

    assert static_handler(StaticConfig(enabled=False)) is None
    builtin = static_handler(StaticConfig())
    assert isinstance(builtin, StaticFiles) and builtin.root == BUILTIN_DIRECTORY
    relative = static_handler(StaticConfig(directory="site", url_prefix="/x/"), base=tmp_path)
    assert isinstance(relative, StaticFiles) and relative.root == site.resolve()
    assert relative.prefix == "/x/"
    assert static_handler(StaticConfig(directory="missing"), base=tmp_path, warn=warn) is None
    assert warnings and warnings[0][0] == "static files disabled"
    absolute = static_handler(StaticConfig(directory=str(site)), base="/somewhere/else")
    assert isinstance(absolute, StaticFiles) and absolute.root == site.resolve()


def test_builtin_demo_is_shipped() -> None:
    handler = StaticFiles()
    index = handler(request("/"))
    assert index[0] == 200
    assert b"<title>selectws chat</title>" in index[2]
    for name, ctype in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        result = handler(request(f"/{name}"))
        assert result[0] == 200, name
        assert header(result, "Content-Type") == ctype
    # No CDN, no framework: everything the page loads comes from this server.
    for name in ("index.html", "app.js", "style.css"):
        text = (BUILTIN_DIRECTORY / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, name


def test_server_installs_the_handler() -> None:
    from selectws.plugins.registry import find_plugin
    from selectws.server.server import Server

    server = Server(Config(), plugins=find_plugin)
    try:
        assert isinstance(server.router.fallback, StaticFiles)
        assert server.router.http_handler("/index.html") is server.router.fallback
        server.apply_config(replace(Config(), static=StaticConfig(enabled=False)))
        assert server.router.fallback is None
    finally:
        server.loop.close()
