"""systemd socket activation (``sd_listen_fds_with_names(3)``) without libsystemd.

When a ``.socket`` unit (or ``systemd-socket-activate``) starts the daemon it passes the
already-listening sockets as file descriptors ``3, 4, ...`` (``SD_LISTEN_FDS_START``) and
describes them in the environment:

* ``LISTEN_PID`` -- the pid the descriptors are meant for; anyone else must ignore them;
* ``LISTEN_FDS`` -- how many descriptors were passed;
* ``LISTEN_FDNAMES`` -- optional colon-separated names (``FileDescriptorName=`` in the unit).

:func:`inherited_sockets` turns them into non-blocking, close-on-exec ``socket.socket`` objects
that the ``selectors`` loop can register directly, and checks that each one really is a
listening stream socket.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "inherited_sockets"]

SD_LISTEN_FDS_START = 3

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The socket-activation environment or the passed descriptors are unusable."""


def _set_cloexec(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    if not flags & fcntl.FD_CLOEXEC:
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def _parse(environ: MutableMapping[str, str]) -> list[str | None]:
    """The names of the descriptors meant for this process (``None`` = unnamed); [] if none."""
    raw_pid = environ.get("LISTEN_PID")
    if not raw_pid:
        return []
    try:
        pid = int(raw_pid)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={raw_pid!r} is not a process id") from None
    if pid != os.getpid():
        # Inherited from a parent that was socket-activated: not for us.
        return []

    raw_fds = environ.get("LISTEN_FDS", "")
    try:
        count = int(raw_fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={raw_fds!r} is not a number") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={raw_fds!r} is negative")
    if count == 0:
        return []

    raw_names = environ.get("LISTEN_FDNAMES")
    if raw_names is None:
        return [None] * count
    names = raw_names.split(":")
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES={raw_names!r} has {len(names)} name(s) but LISTEN_FDS={count}")
    return [name or None for name in names]


def _adopt(fd: int, name: str | None) -> socket.socket:
    """Wrap, check and prepare one inherited descriptor."""
    label = f"inherited fd {fd}" + (f" ({name!r})" if name else "")
    try:
        # With only ``fileno`` given, CPython asks the kernel for family, type and protocol.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"{label} is not a usable socket: {exc.strerror or exc}") from exc
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(
                f"{label} is a {getattr(sock.type, 'name', sock.type)} socket; "
                "selectws needs SOCK_STREAM (ListenStream=)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"{label} is a stream socket but is not listening (the .socket unit needs Accept=no)")
        sock.setblocking(False)
        _set_cloexec(fd)
    except ActivationError:
        sock.detach()  # leave the descriptor alone; the caller decides what to do
        raise
    except OSError as exc:
        sock.detach()
        raise ActivationError(f"cannot prepare {label}: {exc.strerror or exc}") from exc
    return sock


def inherited_sockets(
    environ: MutableMapping[str, str] = os.environ, unset: bool = True
) -> list[tuple[str | None, socket.socket]]:
    """The listening sockets systemd passed to this process, as ``(name, socket)`` pairs.

    Returns ``[]`` when the process was not socket-activated (``LISTEN_PID`` absent or naming
    another process).  The sockets are non-blocking and close-on-exec; names come from
    ``LISTEN_FDNAMES`` (``None`` when absent or empty).

    With ``unset`` (the default) ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are
    removed from ``environ`` whatever the outcome, like ``sd_listen_fds(1)``, so child processes
    do not believe the descriptors are theirs.

    Raises :class:`ActivationError` when the variables are malformed or a descriptor is not a
    listening ``SOCK_STREAM`` socket.  On error no descriptor is closed.
    """
    try:
        names = _parse(environ)
    finally:
        if unset:
            for variable in _VARIABLES:
                environ.pop(variable, None)

    result: list[tuple[str | None, socket.socket]] = []
    try:
        for offset, name in enumerate(names):
            result.append((name, _adopt(SD_LISTEN_FDS_START + offset, name)))
    except ActivationError:
        for _, sock in result:
            sock.detach()
        raise
    return result
