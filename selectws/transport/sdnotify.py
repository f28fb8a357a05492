"""A tiny, dependency-free ``sd_notify(3)`` client.

systemd hands a ``Type=notify`` service the address of its notification socket in
``$NOTIFY_SOCKET``: either a filesystem path (``/run/systemd/notify``) or a name in the
Linux abstract namespace written with a leading ``@``.  A notification is one
``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE`` assignments.

The server runs one single-threaded ``selectors`` loop, so nothing here may block or
raise into it: every send is a non-blocking ``sendto(..., MSG_DONTWAIT)`` and any
``OSError`` (``EAGAIN`` when the manager's queue is full, ``ENOENT``/``ECONNREFUSED``
when the socket went away, ...) makes :meth:`Notifier.notify` return ``False``.  When
``$NOTIFY_SOCKET`` is unset or empty (not running under systemd) the notifier is
disabled and every method is a cheap no-op that returns ``False``.

Usage::

    notifier = Notifier.from_env()
    notifier.ready(status="listening on [::]:8000")
    interval = watchdog_interval()          # seconds between WATCHDOG=1 pings, or None
    ...
    notifier.watchdog()                     # from a loop timer every `interval` seconds
    notifier.reloading(); ...; notifier.ready()
    notifier.send("STOPPING=1", status="draining")
    notifier.close()
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]


def _address_from(value: str | None) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into a ``sendto`` address, or ``None`` if unusable.

    ``/path`` is used as is; ``@name`` becomes the abstract address ``"\\0name"``.  Anything
    else (empty, relative paths, ``vsock:`` addresses of newer systemd) is not supported and
    disables notifications, like ``sd_notify`` returning ``-EAFNOSUPPORT``.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _clean(value: object) -> str:
    """A field value on one line: a newline would start a new (forged) assignment."""
    return str(value).replace("\r", " ").replace("\n", " ")


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or ``None`` if the watchdog is not enabled.

    Reads ``$WATCHDOG_USEC`` (the timeout ``WatchdogSec=`` configured) and ``$WATCHDOG_PID``
    (if set, the watchdog is meant for that process only).  Following ``sd_watchdog_enabled(3)``
    the recommended ping period is half the timeout.
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 1_000_000 / 2


class Notifier:
    """Sends ``sd_notify`` datagrams to the service manager; never blocks, never raises.

    The socket is created lazily on the first send and kept until :meth:`close`.
    """

    __slots__ = ("_address", "_sock")

    def __init__(self, address: str | None) -> None:
        """``address`` is a ready ``sendto`` address (``"\\0name"`` for abstract), or ``None``."""
        self._address = address or None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; disabled when it is unset, empty or unsupported."""
        return cls(_address_from(environ.get("NOTIFY_SOCKET")))

    watchdog_interval = staticmethod(watchdog_interval)

    @property
    def enabled(self) -> bool:
        """Whether there is a notification socket to talk to."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """The ``sendto`` address (abstract names start with ``"\\0"``), or ``None``."""
        return self._address

    # -- sending -----------------------------------------------------------------------------

    def notify(self, message: str) -> bool:
        """Send ``message`` (``"KEY=VALUE\\n..."``) as one datagram.

        Returns ``True`` if the kernel accepted the datagram, ``False`` if disabled, the message
        is empty, or sending failed for any reason (the failure is swallowed on purpose).
        """
        if self._address is None or not message:
            return False
        try:
            sock = self._sock
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            sock.sendto(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT, self._address)
        except OSError:
            # EAGAIN (manager busy), ENOENT/ECONNREFUSED (socket gone), EMFILE, ...: a lost
            # notification must never take the event loop down with it.
            return False
        return True

    def send(self, message: str | None = None, /, **fields: object) -> bool:
        """Send a raw ``message`` and/or ``KEY=value`` keyword fields in one datagram.

        ``send(READY=1, STATUS="up")`` sends ``"READY=1\\nSTATUS=up"``; keys are upper-cased
        and values are kept on one line.
        """
        lines = [message] if message else []
        lines.extend(f"{key.upper()}={_clean(value)}" for key, value in fields.items())
        return self.notify("\n".join(lines))

    # -- helpers -----------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (start-up or reload finished), optionally with a ``STATUS=`` line."""
        if status is None:
            return self.notify("READY=1")
        return self.notify(f"READY=1\nSTATUS={_clean(status)}")

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` as ``Type=notify-reload`` (systemd >= 253) wants.

        Send :meth:`ready` when the reload is complete.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        """``STATUS=text``: free-form status shown by ``systemctl status``."""
        return self.notify(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive ping; see :func:`watchdog_interval`."""
        return self.notify("WATCHDOG=1")

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; a later send lazily opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"Notifier(address={self._address!r})"
