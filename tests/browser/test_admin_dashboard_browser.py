"""The admin dashboard in a real browser, live, under load: Debian's Chromium driven by Playwright.

The daemon runs as ``selectws serve --workers 2`` with a real Redis, ``[ops] admin = true`` and an API key. The
page is opened on the operator listener: it first answers 401 with the login form; the key is typed in; the
dashboard then follows its feed (``/admin/ws``) while six echo clients send traffic for a few seconds (bounded).
The test asserts that the page shows live figures that move -- messages per second above 0 and changing, the
open connections of ``/echo`` equal to the six clients, a row per worker, charts that grow -- and takes the
screenshot ``artifacts/admin-dashboard.png`` (the one in docs/images/ is a copy of a good run).

Skipped, with the reason, without ``/usr/bin/chromium``, ``playwright`` or ``redis-server`` (failed under CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from browsertools import CHROMIUM, CHROMIUM_ARGS, redis_server, requirements

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "artifacts" / "admin-dashboard.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY = "browser-admin-key-2b6d8e41"
CLIENTS = 6
GROUPS = {"lobby": 3, "news": 2}  # idle members of /broadcast/{channel}
LOAD_SECONDS = 10.0  # the load stops by itself after this, whatever happens to the test
UI_TIMEOUT_MS = 15_000


pytestmark = requirements(redis=True)




@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


class Daemon:
    """``selectws serve --workers 2`` with the admin page on; ports from its JSON log lines."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        (tmp / "api.key").write_text(KEY + "\n")
        config = tmp / "selectws.toml"
        config.write_text(f"""
[ops]
listen = "127.0.0.1:0"
admin = true

[api]
key_file = "api.key"

[broker]
url = "{redis_url}"

[[routes]]
path = "/echo"
plugin = "echo"

[[routes]]
path = "/chat"
plugin = "chat"

[[routes]]
path = "/broadcast/{{channel}}"
plugin = "broadcast"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
             "--config", str(config), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp,
        )
        self.records: list[dict[str, Any]] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(20):
            self.stop()
            raise RuntimeError("the daemon's workers did not get ready:\n" + "\n".join(map(str, self.records[-20:])))
        listening = next(r for r in self.records if r.get("event") == "listening")
        self.port = int(listening["addresses"][0].rpartition(":")[2])
        self.ops_port = int(listening["ops_addresses"][0].rpartition(":")[2])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                if record.get("event") == "workers ready":
                    self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _load(url: str, stop: threading.Event, counts: list[int], me: int) -> None:
    """One echo client: a message every 10 ms until ``stop`` (or :data:`LOAD_SECONDS`), each echo awaited."""
    from websockets.sync.client import connect

    ends = time.monotonic() + LOAD_SECONDS
    with connect(url, open_timeout=5, close_timeout=5, ping_interval=None, proxy=None) as ws:
        i = 0
        while not stop.is_set() and time.monotonic() < ends:
            ws.send(f"load {i}")
            ws.recv(timeout=5)
            i += 1
            counts[me] = i
            time.sleep(0.01)


def _number(text: str) -> float:
    return float(text.replace(",", "")) if text.strip() not in ("", "\u2013") else -1.0  # an en dash: no figure


def test_the_dashboard_is_live_under_load(tmp_path: Path, redis_url: str) -> None:
    from playwright.sync_api import sync_playwright

    daemon = Daemon(tmp_path, redis_url)
    stop = threading.Event()
    counts = [0] * CLIENTS
    threads: list[threading.Thread] = []
    members = ExitStack()
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 720})
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            admin = f"http://127.0.0.1:{daemon.ops_port}/admin"

            first = page.goto(admin)
            assert first is not None and first.status == 401  # no session: the login form
            page.fill("#key", KEY)
            with page.expect_navigation():
                page.click("#login")
            assert page.url == admin, page.content()[:1500]
            # From here on any console error counts (a CSP violation, a failed load); the 401 above was expected.
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            # Function-form predicates: the page's CSP (script-src 'self') forbids evaluating strings in it.
            page.wait_for_function("() => document.getElementById('status').textContent === 'live'")
            page.wait_for_function("() => document.querySelectorAll('#workers tbody tr').length === 2")

            # Members of two groups (idle), and echo traffic from six clients.
            from websockets.sync.client import connect

            for channel, n in GROUPS.items():
                for _ in range(n):
                    members.enter_context(connect(f"ws://127.0.0.1:{daemon.port}/broadcast/{channel}",
                                                  open_timeout=5, close_timeout=5, ping_interval=None, proxy=None))
            url = f"ws://127.0.0.1:{daemon.port}/echo"
            threads = [threading.Thread(target=_load, args=(url, stop, counts, n), daemon=True) for n in range(CLIENTS)]
            for t in threads:
                t.start()
            page.wait_for_function(
                "() => { const r = document.querySelector('#routes tr[data-route=\"/echo\"] .count');"
                f" return r && r.textContent === '{CLIENTS}'; }}")
            page.wait_for_function("() => Number(document.getElementById('in-rate').textContent.replace(/,/g, '')) > 0")
            rates, snapshots, points = [], [], []
            for _ in range(6):  # six snapshots, a second apart: the numbers move
                seen = int(page.evaluate("() => document.body.dataset.snapshots"))
                page.wait_for_function(f"() => Number(document.body.dataset.snapshots) > {seen}")
                rates.append(_number(page.text_content("#in-rate") or ""))
                snapshots.append(int(page.evaluate("() => document.body.dataset.snapshots")))
                points.append(int(page.get_attribute("#chart-rates polyline.in", "data-points") or 0))
            assert all(r > 0 for r in rates), rates
            assert len(set(rates)) > 1, f"messages/s did not move: {rates}"
            assert snapshots == sorted(snapshots) and snapshots[-1] >= snapshots[0] + 3, snapshots
            assert points[-1] > points[0] >= 1, points
            assert _number(page.text_content("#connections") or "") == CLIENTS + sum(GROUPS.values())
            per_worker = [int(c) for c in page.eval_on_selector_all(
                "#workers tbody tr td.count", "cells => cells.map(c => c.textContent)")]
            assert sum(per_worker) == CLIENTS + sum(GROUPS.values()), per_worker
            assert page.text_content("#broker") == "redis: up"
            assert page.text_content("#ready") == "ready"
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            groups = dict(zip(page.eval_on_selector_all("#groups tbody td.name", "c => c.map(x => x.textContent)"),
                              map(int, page.eval_on_selector_all("#groups tbody td.count",
                                                                 "c => c.map(x => x.textContent)")), strict=True))
            assert groups == {f"broadcast:{channel}": n for channel, n in GROUPS.items()}, groups
            assert page.text_content("#groups-count") == f"{len(GROUPS)} groups in all"  # not one per worker
            broadcast = page.text_content('#routes tr[data-route="/broadcast/{channel}"] .count')
            assert broadcast == str(sum(GROUPS.values())), broadcast
            print(f"in/s over six snapshots: {rates}; chart points: {points}; per worker: {per_worker}; "
                  f"groups: {groups}")
            stop.set()
            for t in threads:
                t.join(10)
            page.wait_for_function(
                "() => { const r = document.querySelector('#routes tr[data-route=\"/echo\"] .count');"
                " return r && r.textContent === '0'; }")
            context.close()
            browser.close()
    finally:
        members.close()
        stop.set()
        for t in threads:
            t.join(10)
        rc = daemon.stop()
    assert not errors, errors
    assert all(n > 0 for n in counts), counts
    assert SCREENSHOT.read_bytes().startswith(PNG_MAGIC)
    assert rc == 0
    assert not [r for r in daemon.records if r.get("level") in ("error", "critical")]
