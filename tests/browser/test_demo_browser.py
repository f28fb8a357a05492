"""The browser chat demo in a real browser: Debian's Chromium driven by Playwright, against the real daemon.

Two pages chat through ``/chat``; the daemon is then killed and started again on the same port, and both pages
must notice (``reconnecting in N s``), come back by themselves (``online``), log in to the same room again and
keep chatting. A screenshot of the result goes to ``artifacts/demo-chat.png``.

Skipped, with the reason, when ``/usr/bin/chromium`` or the ``playwright`` package is missing (CI installs both:
``apt-get install chromium`` and ``pip install playwright``; never ``playwright install``, which downloads a
browser of its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from browsertools import CHROMIUM, CHROMIUM_ARGS, requirements

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "artifacts" / "demo-chat.png"
RECONNECTING_SHOT = REPO_ROOT / "artifacts" / "demo-reconnecting.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START_TIMEOUT = 15.0
UI_TIMEOUT_MS = 15_000  # a page event (message, member list)
RECONNECT_TIMEOUT_MS = 30_000  # back online after a restart: a few backoff steps at most


pytestmark = requirements()


# ------------------------------------------------------------------------------------------------ the daemon


class Daemon:
    """``python -m selectws serve`` on 127.0.0.1; the port comes from its JSON ``listening`` line on stderr."""

    def __init__(self, port: int = 0) -> None:
        env = dict(os.environ)
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selectws", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT,
        )
        self.records: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.port = 0
        if not self._listening.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"the daemon did not start listening (port {port}):\n" + "\n".join(self.lines[-20:]))
        listening = next(r for r in self.records if r.get("event") == "listening")
        self.port = int(str(listening["addresses"][0]).rsplit(":", 1)[1])

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                if record.get("event") == "listening":
                    self._listening.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the browsers can tell (no close frame, 1006)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self) -> int:
        """SIGTERM and wait: the graceful way (close 1001 to every client)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("level") in ("error", "critical")]


def start_daemon_on(port: int, deadline: float = 10.0) -> Daemon:
    """Bind ``port`` again; retried briefly, since a browser retrying meanwhile cannot hold it but the OS may."""
    end = time.monotonic() + deadline
    while True:
        try:
            return Daemon(port)
        except RuntimeError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page plus the uncaught script errors it raised (a broken app.js must fail the test)."""

    def __init__(self, browser: Browser, url: str | None) -> None:
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        if url is not None:
            self.page.goto(url)

    def close(self) -> None:
        self.context.close()


def open_page(browser: Browser, url: str | None, opened: list[Watched]) -> Page:
    w = Watched(browser, url)
    opened.append(w)
    return w.page


@pytest.fixture
def pages(browser: Browser) -> Iterator[list[Watched]]:
    opened: list[Watched] = []
    yield opened
    errors = [e for w in opened for e in w.errors]
    for w in opened:
        w.close()
    assert not errors, f"uncaught script errors in the page: {errors}"


# ------------------------------------------------------------------------------------------------ helpers


def say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def expect_online(page: Page, timeout: float = UI_TIMEOUT_MS) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_have_attribute("data-state", "online", timeout=timeout)
    expect(page.locator("#status")).to_have_text("online")
    expect(page.locator("#text")).to_be_enabled()


def expect_message(page: Page, sender: str, text: str) -> None:
    from playwright.sync_api import expect

    line = page.locator("#log li.msg").filter(has_text=text)
    expect(line).to_have_count(1)
    expect(line.locator(".from")).to_have_text(sender)


def expect_members(page: Page, *names: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#members li")).to_have_count(len(names))
    for name in names:
        expect(page.locator("#members li").filter(has_text=name)).to_have_count(1)
    expect(page.locator("#member-count")).to_have_text(str(len(names)))


# ------------------------------------------------------------------------------------------------ tests


def test_two_browsers_chat_and_survive_a_daemon_restart(browser: Browser, pages: list[Watched]) -> None:
    from playwright.sync_api import expect

    daemon = Daemon()
    try:
        port = daemon.port
        alice = open_page(browser, f"{daemon.url}/?name=alice&room=lobby", pages)
        expect_online(alice)
        bob = open_page(browser, f"{daemon.url}/?name=bob&room=lobby", pages)
        expect_online(bob)

        # Each sees both members: bob from his welcome, alice from the "joined" that followed.
        expect_members(alice, "alice", "bob")
        expect_members(bob, "alice", "bob")
        expect(alice.locator("#members li.me")).to_contain_text("alice")
        expect(alice.locator("#log li.joined .text")).to_have_text(["bob joined"])
        expect(alice.locator("#room-title")).to_contain_text("#lobby")

        say(alice, "hello from alice")
        expect_message(bob, "alice", "hello from alice")
        expect_message(alice, "alice", "hello from alice")  # the room includes the sender
        say(bob, "hi alice, bob here")
        expect_message(alice, "bob", "hi alice, bob here")
        expect(alice.locator("#log li.msg.mine")).to_have_count(1)

        # Crash the daemon: both pages notice and count down to their next attempt.
        daemon.kill()
        for page in (alice, bob):
            expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
            expect(page.locator("#status")).to_have_text(re.compile(r"^reconnecting in \d+ s$"))
            expect(page.locator("#text")).to_be_disabled()
            expect(page.locator("#log li.system").filter(has_text="connection lost")).to_have_count(1)
        RECONNECTING_SHOT.parent.mkdir(parents=True, exist_ok=True)
        bob.screenshot(path=str(RECONNECTING_SHOT))

        # The same port again: the pages find it by themselves and log back in to the same room.
        daemon = start_daemon_on(port)
        assert daemon.port == port
        for page in (alice, bob):
            expect_online(page, timeout=RECONNECT_TIMEOUT_MS)
        for page in (alice, bob):
            expect_members(page, "alice", "bob")
            expect(page.locator("#log li.system").filter(has_text="back in lobby")).to_have_count(1)

        say(bob, "still here after the restart?")
        expect_message(alice, "bob", "still here after the restart?")
        say(alice, "yes, reconnected on my own")
        expect_message(bob, "alice", "yes, reconnected on my own")
        assert alice.url.endswith("/?name=alice&room=lobby")

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        alice.screenshot(path=str(SCREENSHOT))
        assert SCREENSHOT.is_file()
        data = SCREENSHOT.read_bytes()
        assert data.startswith(PNG_MAGIC), "the screenshot is not a PNG"
        assert len(data) > 5000
    finally:
        assert daemon.stop() == 0
    assert not daemon.errors(), daemon.errors()


def test_login_form_errors_and_leave(browser: Browser, pages: list[Watched], daemon: Daemon) -> None:
    from playwright.sync_api import expect

    # Without ?name= the page asks for one.
    carol = open_page(browser, f"{daemon.url}/?room=garden", pages)
    expect(carol.locator("#login-view")).to_be_visible()
    expect(carol.locator("#chat-view")).to_be_hidden()
    expect(carol.locator("#room")).to_have_value("garden")
    expect(carol.locator("#status")).to_have_attribute("data-state", "offline")
    carol.fill("#name", "carol")
    carol.click("#join")
    expect_online(carol)
    expect_members(carol, "carol")
    assert carol.url.endswith("/?name=carol&room=garden")  # a reload joins the same room again

    # The same name in the same room is refused: the error is shown on the form, and nothing reconnects.
    impostor = open_page(browser, f"{daemon.url}/?name=carol&room=garden", pages)
    expect(impostor.locator("#login-error")).to_be_visible()
    expect(impostor.locator("#login-error")).to_contain_text("already taken")
    expect(impostor.locator("#status")).to_have_attribute("data-state", "offline")
    impostor.fill("#name", "dave")
    impostor.click("#join")
    expect_online(impostor)
    expect_members(impostor, "carol", "dave")
    expect_members(carol, "carol", "dave")

    # Markup in a message is text, not HTML.
    say(impostor, "<b>bold?</b>")
    expect_message(carol, "dave", "<b>bold?</b>")
    expect(carol.locator("#log b")).to_have_count(0)

    # Leaving closes the socket for good: the others see "left", the page goes back to the form.
    impostor.click("#leave")
    expect(impostor.locator("#login-view")).to_be_visible()
    expect(impostor.locator("#status")).to_have_attribute("data-state", "offline")
    expect_members(carol, "carol")
    expect(carol.locator("#log li.left")).to_contain_text("dave left")
    time.sleep(1.5)  # longer than the first backoff step: a page that left must not come back
    expect(impostor.locator("#status")).to_have_attribute("data-state", "offline")
    expect_members(carol, "carol")


def test_page_is_served_with_its_assets(browser: Browser, pages: list[Watched], daemon: Daemon) -> None:
    page = open_page(browser, None, pages)
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(f"{req.url}: {req.failure}"))
    response = page.goto(f"{daemon.url}/?name=erin")
    assert response is not None and response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    expect_online(page)
    assert page.title() == "selectws chat"
    assert page.locator("#endpoint").inner_text() == f"ws://127.0.0.1:{daemon.port}/chat"
    # The stylesheet applied (a hidden login form, a flex top bar) and nothing failed to load.
    assert page.evaluate("getComputedStyle(document.querySelector('.topbar')).display") == "flex"
    assert not failed
    # A reload revalidates: same page, answered from cache after a 304.
    again = page.reload()
    assert again is not None and again.status in (200, 304)
    expect_online(page)
