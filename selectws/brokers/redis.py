"""The Redis broker: groups shared by every instance (process, machine) connected to one Redis server.

Two more non-blocking sockets in the server's own selectors loop, no thread and no blocking client:

* a **publish** connection: each group message is sent once, ``PUBLISH <prefix><group> <payload>``;
* a **subscribe** connection: ``SUBSCRIBE <prefix><group>`` when the first local member joins a group,
  ``UNSUBSCRIBE`` when the last one leaves; every ``message`` push from another instance is delivered locally.

Two RESP2 connections rather than one RESP3 connection: a RESP2 connection in subscribed mode may only
(P|S)(UN)SUBSCRIBE, PING and QUIT, so it cannot PUBLISH; RESP3 lifts that (``HELLO 3``, push messages
interleaved with replies), but needs Redis >= 6 and matching every reply to a command while pushes arrive in
between. Two plain connections work with any Redis (and with Valkey, KeyDB, proxies that speak RESP2), keep
each one's reply stream trivial, and a flood of incoming messages never delays outgoing ones.

Replies are parsed by :class:`hiredis.Reader` (bytes in, replies out); commands are encoded here, all of them by
:func:`encode_command`.

Setting up a connection: TCP, then TLS for ``rediss://``, then ``AUTH`` when there is a password, ``SELECT
<db>`` when the URL names a database other than 0, and ``PING``; a connection is up once Redis answered them all
(within ``connect_timeout``). A completed TCP handshake proves nothing: the kernel completes it for a Redis that is
stopped (SIGSTOP), swapping or otherwise stuck, so "connected" means "Redis answered". The database
only chooses a keyspace: the broker stores no keys, and Redis pub/sub channels are global across databases (a
message published from db 3 reaches a subscriber on db 0), so ``/db`` does not separate groups --
``channel_prefix`` does. SELECT is still sent so that a database Redis refuses (out of range, not allowed to
this user, a cluster) shows up as a connection error instead of being silently ignored.

Ordering and echo: a message published here is delivered to local members at once (same as the in-memory
broker) and carries this instance's id, so when Redis hands it back on the subscription it is skipped. Redis
delivers the messages of one publishing connection in order, so every instance sees each publisher's messages
in publish order.

Health check: a Redis that stops answering without closing the connection (SIGSTOP, a stuck host, a partition
that drops packets) is noticed by the broker, not by TCP. Each connection notes when it last heard from Redis
(a reply, a message); one timer sends ``PING`` on a connection that has been silent for a third of
``health_timeout`` (at most one PING per third), and a connection silent for ``health_timeout`` is hung: one
warning (``broker unresponsive``), both connections are reset and reconnected with the usual backoff, and the
broker is down (``up`` false: the metric, ``/healthz``, ``/readyz``) until Redis answers again. A connection
that is busy (replies to publishes, incoming messages) needs no PING. The deadline is checked after the loop's
I/O of the iteration, and a connection about to be declared hung reads its socket once more first, so a loop that
was itself late does not blame Redis. See :func:`liveness`.

Faults: if Redis goes away or hangs, local delivery goes on; messages published meanwhile are counted in
``dropped`` (they reached local members only), and so are those not yet confirmed by Redis when the connection
was dropped; the broker reconnects with exponential backoff and re-subscribes every group still in use. Redis
pub/sub is at-most-once: what other instances published while the subscription was down is not replayed. A
message counted as dropped because Redis never confirmed it may still have reached Redis (a hung Redis that
resumes processes what its socket had already received), so the counter is an upper bound. A dropped connection
is reset (``SO_LINGER`` 0), so what was still in our kernel's send buffer is discarded, not delivered late. The
write buffer is bounded by ``max_buffer``; a message past it is dropped and counted.
"""

from __future__ import annotations

import enum
import errno
import os
import selectors
import socket
import ssl
import struct
from collections import deque
from typing import Any, Literal

from selectws.config import BrokerConfig, parse_redis_url
from selectws.server.broker import Deliver
from selectws.server.stats import BrokerStats
from selectws.transport.loop import EventLoop, Timer
from selectws.transport.tls import step_tls_handshake

# hiredis is optional (the "redis" extra): without it this module still imports, and RedisBroker() says what to
# install. This is the only reason for the try.
try:
    import hiredis
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None  # type: ignore[assignment]

__all__ = ["ConnectionState", "RedisBroker", "decode_payload", "encode_command", "encode_payload", "liveness"]

_VERSION = 1
_HEADER = struct.Struct("!B8sBI")  # version, instance id, opcode (1 text, 2 binary), number of excluded ids
_RECV = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {on, 0 seconds}: close() sends RST


def encode_payload(instance: bytes, message: str | bytes, exclude: frozenset[int] = frozenset()) -> bytes:
    """One group message as published: header, excluded connection ids (meaningful only on ``instance``), data."""
    if isinstance(message, str):
        opcode, data = 1, message.encode("utf-8")
    else:
        opcode, data = 2, bytes(message)
    ids = sorted(exclude)
    return b"".join((_HEADER.pack(_VERSION, instance, opcode, len(ids)), struct.pack(f"!{len(ids)}Q", *ids), data))


def decode_payload(payload: bytes) -> tuple[bytes, str | bytes, frozenset[int]]:
    """``(instance id, message, exclude ids)``; :class:`ValueError` for anything not made by :func:`encode_payload`."""
    if len(payload) < _HEADER.size:
        raise ValueError("payload too short")
    version, instance, opcode, count = _HEADER.unpack_from(payload)
    if version != _VERSION or opcode not in (1, 2):
        raise ValueError(f"unknown payload version {version} or opcode {opcode}")
    start = _HEADER.size + 8 * count
    if len(payload) < start:
        raise ValueError("payload truncated")
    exclude = frozenset(struct.unpack_from(f"!{count}Q", payload, _HEADER.size))
    data = payload[start:]
    message: str | bytes = data.decode("utf-8") if opcode == 1 else data
    return instance, message, exclude


def encode_command(*args: bytes | str) -> bytes:
    """A RESP array of bulk strings, the form every Redis command takes."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode("utf-8") if isinstance(arg, str) else arg
        out.append(b"$%d\r\n" % len(raw))
        out.append(raw)
        out.append(b"\r\n")
    return b"".join(out)


class ConnectionState(enum.Enum):
    """Where one connection to Redis is: DOWN -> CONNECTING -> (TLS_HANDSHAKE ->) (SETUP ->) UP."""

    DOWN = "down"
    CONNECTING = "connecting"  # TCP connect in progress
    TLS_HANDSHAKE = "tls handshake"  # rediss://
    SETUP = "setup"  # AUTH and/or SELECT sent, waiting for Redis to accept them
    UP = "up"


_DOWN = ConnectionState.DOWN
_UP = ConnectionState.UP
_SETUP = ConnectionState.SETUP
_SETUP_TAGS = ("auth", "select", "setup ping")  # replies that complete SETUP
_PING = encode_command("PING")
#: Why a connection was dropped when Redis stopped answering (the same words for the health check and for a setup
#: that got no answer, so the retries of one episode log at info, after one warning).
NO_ANSWER = "Redis did not answer"


def liveness(now: float, last_heard: float, last_ping: float, timeout: float) -> tuple[Literal["ok", "ping", "hung"],
                                                                                      float]:
    """The health check of one connection that is up: what to do ``now`` and when to look again.

    ``last_heard``: when Redis last sent anything on it; ``last_ping``: when we last sent a PING on it. Silent for
    ``timeout``: ``"hung"``. Silent for a third of it, and no PING sent for a third of it: ``"ping"`` (the caller
    sends one now). Otherwise ``"ok"``. The second value is the next moment something can change: the deadline, or
    when the next PING would be due.
    """
    interval = timeout / 3
    deadline = last_heard + timeout
    if now >= deadline:
        return "hung", now
    ping_due = max(last_heard, last_ping) + interval  # the same sums as the times returned: a timer armed for
    if now >= ping_due:  # one of them finds it due when it fires
        return "ping", min(deadline, now + interval)
    return "ok", min(deadline, ping_due)


class _Connection:
    """One non-blocking socket to Redis, registered with the loop; replies go to ``on_reply``."""

    def __init__(self, broker: RedisBroker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.state = _DOWN
        self.wbuf = bytearray()
        self.reader: Any = None
        self.events = 0
        # What each expected reply answers: "auth", "select", "setup ping", "publish", "sub", "ping".
        self.pending: deque[str] = deque()
        self.last_heard = 0.0  # loop time Redis last sent anything on this connection
        self.last_ping = 0.0  # loop time we last sent a health-check PING

    # -------------------------------------------------------------- connecting
    def connect(self, addr: Any, family: int) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # An idle subscription must still notice a Redis that vanished without a FIN (host down, partition).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        except (OSError, AttributeError):
            pass
        self.sock = sock
        self.reader = hiredis.Reader()
        self.wbuf.clear()
        self.pending.clear()
        self.last_ping = 0.0
        self.state = ConnectionState.CONNECTING
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.fail(os.strerror(err))
            return
        self._set_events(selectors.EVENT_WRITE)

    def _set_events(self, events: int) -> None:
        if events == self.events or self.sock is None:
            return
        loop = self.broker.loop
        if self.events == 0:
            loop.register(self.sock, events, self)
        elif events == 0:
            loop.unregister(self.sock)
        else:
            loop.modify(self.sock, events, self)
        self.events = events

    def _connected(self) -> None:
        assert self.sock is not None
        if self.broker.tls:
            self._set_events(0)  # the SSLSocket takes over the descriptor: register it afresh
            try:
                self.sock = self.broker.ssl_context().wrap_socket(
                    self.sock, server_hostname=self.broker.host, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                self.fail(f"TLS: {exc}")
                return
            self.state = ConnectionState.TLS_HANDSHAKE
            self._handshake()
            return
        self._up()

    def _handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            waiting_for = step_tls_handshake(sock)
        except OSError as exc:
            self.fail(f"TLS handshake: {exc}")
            return
        if waiting_for:
            self._set_events(waiting_for)
            return
        self._up()

    def _up(self) -> None:
        """Connected (and TLS done): AUTH and SELECT if needed, and PING; up once Redis answered them all.

        The PING is what makes "up" mean "Redis answered" rather than "the kernel completed a TCP handshake", which
        it does for a stopped Redis too."""
        broker = self.broker
        setup: list[tuple[str, bytes]] = []
        if broker.password:
            setup.append(("auth", encode_command("AUTH", broker.password)))
        if broker.db:  # 0 is every connection's default: no round trip (and works where SELECT is refused)
            setup.append(("select", encode_command("SELECT", str(broker.db))))
        setup.append(("setup ping", _PING))
        self.state = _SETUP
        self.pending.extendleft(tag for tag, _ in reversed(setup))
        self.wbuf[:0] = b"".join(command for _, command in setup)
        self._set_events(selectors.EVENT_READ | selectors.EVENT_WRITE)

    def setup_reply(self) -> None:
        """Redis accepted an AUTH or SELECT, or answered the PING: up when it was the last one."""
        if not (self.pending and self.pending[0] in _SETUP_TAGS):
            self.ready()

    def ready(self) -> None:
        self.state = _UP
        self._set_events(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.wbuf else 0))
        self.broker._connection_up(self)

    def fail(self, reason: str, **detail: Any) -> None:
        """Close and tell the broker (which reconnects both connections after a backoff)."""
        if self.state is _DOWN:
            return
        self.close(abort=True)
        self.broker._connection_lost(self, reason, **detail)

    def close(self, abort: bool = False) -> None:
        """``abort``: reset (SO_LINGER 0), discarding what the kernel still holds for a Redis that may be hung, so
        that it cannot deliver it late (those messages are already counted as dropped)."""
        if self.sock is not None:
            self._set_events(0)
            try:
                if abort:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.events = 0
        self.state = _DOWN
        self.wbuf.clear()

    # -------------------------------------------------------------- I/O
    def write(self, data: bytes, tag: str) -> None:
        self.pending.append(tag)
        self.wbuf += data
        if self.state is _UP:
            self.broker._dirty.add(self)

    def flush(self) -> None:
        if (self.state is not _UP and self.state is not _SETUP) or self.sock is None or not self.wbuf:
            return
        try:
            sent = self.sock.send(self.wbuf)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as exc:
            self.fail(str(exc))
            return
        del self.wbuf[:sent]
        self._set_events(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.wbuf else 0))

    def handle_event(self, mask: int) -> None:
        state = self.state
        if state is ConnectionState.CONNECTING:
            assert self.sock is not None
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(os.strerror(err))
                return
            self._connected()
            return
        if state is ConnectionState.TLS_HANDSHAKE:
            self._handshake()
            return
        if state is not _UP and state is not _SETUP:
            return
        if mask & selectors.EVENT_READ:
            self._read()
        if (self.state is _UP or self.state is _SETUP) and mask & selectors.EVENT_WRITE:
            self.flush()

    def _read(self) -> None:
        sock = self.sock
        assert sock is not None
        reader = self.reader
        while True:
            try:
                data = sock.recv(_RECV)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                self.fail(str(exc))
                return
            if not data:
                self.fail("connection closed by Redis")
                return
            self.last_heard = self.broker.loop.now
            reader.feed(data)
            if len(data) < _RECV and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        on_reply = self.broker._on_reply
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(f"protocol error: {exc}")
                return
            if reply is False:
                return
            on_reply(self, reply)
            if self.state is not _UP and self.state is not _SETUP:
                return


class RedisBroker:
    """Publishes group messages to Redis and delivers what other instances publish (see the module docstring)."""

    kind = "redis"

    def __init__(self, loop: EventLoop, deliver: Deliver, config: BrokerConfig, log: Any) -> None:
        if hiredis is None:
            raise RuntimeError("[broker] url needs the hiredis package: pip install 'selectws[redis]'")
        self.loop = loop
        self._deliver = deliver
        self.log = log
        self.config = config
        # db: sent as SELECT on connect (see the module docstring: it does not separate pub/sub channels).
        self.host, self.port, self.db, self.tls, url_password = parse_redis_url("broker.url", config.url)
        self.password = config.password or url_password
        self.prefix = config.channel_prefix.encode("utf-8")
        self.instance = os.urandom(8)
        self.groups: set[str] = set()  # groups with local members: subscribed whenever the connection is up
        self._channels: dict[str, bytes] = {}
        self.pub = _Connection(self, "publish")
        self.sub = _Connection(self, "subscribe")
        self._dirty: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._backoff = config.reconnect_min
        self._timer: Timer | None = None
        self._connect_timer: Timer | None = None
        self._health_timer: Timer | None = None
        self._closed = False
        self._ever_up = False
        self.last_error = ""
        # counters, read by /metrics through stats()
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.reconnects = 0
        self.errors = 0
        loop.end_of_iteration.append(self._flush)

    # -------------------------------------------------------------- state
    @property
    def up(self) -> bool:
        return self.pub.state is _UP and self.sub.state is _UP

    def status(self) -> str:
        """One line for /healthz."""
        where = f"{self.host}:{self.port}"
        if self.up:
            return f"broker redis {where}: up"
        return f"broker redis {where}: down ({self.last_error or 'connecting'}); local delivery only"

    def stats(self) -> BrokerStats:
        return BrokerStats(kind=self.kind, up=self.up, status=self.status(), dropped=self.dropped,
                           reconnects=self.reconnects, published=self.published, received=self.received,
                           errors=self.errors)

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._connect()

    def close(self) -> None:
        self._closed = True
        for timer in (self._timer, self._connect_timer, self._health_timer):
            if timer is not None:
                timer.cancel()
        self.pub.close()
        self.sub.close()

    def _connect(self) -> None:
        self._timer = None
        if self._closed:
            return
        try:
            # Resolved on each attempt; an IP address (or /etc/hosts name) resolves without blocking the loop.
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._connection_lost(self.pub, f"resolve {self.host}: {exc}")
            return
        family, _, _, _, addr = infos[0]
        self.pub.connect(addr, family)
        if self.pub.state is not _DOWN:
            self.sub.connect(addr, family)
        if self.pub.state is not _DOWN and self.sub.state is not _DOWN:
            self._connect_timer = self.loop.call_later(self.config.connect_timeout, self._connect_timeout)

    def _connect_timeout(self) -> None:
        self._connect_timer = None
        if not self.up:
            for conn in (self.pub, self.sub):
                if conn.state is not _UP:
                    # SETUP: connected, but Redis did not answer (stopped, or hung): the health check's words.
                    conn.fail(NO_ANSWER if conn.state is _SETUP else "connect timeout",
                              timeout=self.config.connect_timeout)
                    return

    def _check_health(self) -> None:
        """The health timer: PING what has been silent, drop what has been silent too long (see :func:`liveness`)."""
        self._health_timer = None
        if not self.up or self._closed:
            return
        now = self.loop.now
        timeout = self.config.health_timeout
        wake = now + timeout
        for conn in (self.pub, self.sub):
            verdict, when = liveness(now, conn.last_heard, conn.last_ping, timeout)
            if verdict == "hung" and conn.sock is not None:
                conn.handle_event(selectors.EVENT_READ)  # what already arrived counts (if the loop itself was late)
                if not self.up:
                    return
                verdict, when = liveness(now, conn.last_heard, conn.last_ping, timeout)
            if verdict == "hung":
                conn.fail(NO_ANSWER, silent=round(now - conn.last_heard, 3), timeout=timeout)
                return
            if verdict == "ping":
                conn.write(_PING, "ping")
                conn.last_ping = now
            wake = min(wake, when)
        self._health_timer = self.loop.call_at(wake, self._check_health)

    def _connection_up(self, conn: _Connection) -> None:
        if conn is self.sub and self.groups:
            channels = [self._channel(g) for g in sorted(self.groups)]
            for i in range(0, len(channels), 1000):
                chunk = channels[i:i + 1000]
                for _ in chunk:
                    conn.pending.append("sub")
                conn.wbuf += encode_command("SUBSCRIBE", *chunk)
            self._dirty.add(conn)
        elif conn.wbuf:
            self._dirty.add(conn)
        if self.up:
            if self._connect_timer is not None:
                self._connect_timer.cancel()
                self._connect_timer = None
            self._backoff = self.config.reconnect_min
            if self._ever_up:
                self.reconnects += 1
            self._ever_up = True
            self.last_error = ""
            if self._health_timer is None:
                self._health_timer = self.loop.call_at(self.loop.now, self._check_health)
            self.log.info("broker connected", broker="redis", host=self.host, port=self.port,
                          groups=len(self.groups), reconnects=self.reconnects)

    def _connection_lost(self, conn: _Connection, reason: str, **detail: Any) -> None:
        """Either connection failed: drop both, count what was unconfirmed, retry after a backoff."""
        was_up = self.pub.state is _UP or self.sub.state is _UP
        unconfirmed = sum(1 for tag in self.pub.pending if tag == "publish")
        self.dropped += unconfirmed
        for other in (self.pub, self.sub):
            other.close(abort=True)
            other.pending.clear()
        self._dirty.clear()
        for timer in (self._connect_timer, self._health_timer):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._health_timer = None
        if self._closed or self._timer is not None:
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.config.reconnect_max)
        # A warning when a working connection breaks or the failure is a new one; retries of it are info. So a
        # Redis that hangs for a minute is one warning ("broker unresponsive"), then a retry line at info each time.
        log = self.log.warning if was_up or reason != self.last_error else self.log.info
        if was_up:
            event = "broker unresponsive" if reason == NO_ANSWER else "broker connection lost"
        else:
            event = "broker unavailable"
        log(event, broker="redis", host=self.host, port=self.port, connection=conn.name, error=reason,
            retry_in=round(delay, 3), unconfirmed=unconfirmed, **detail)
        self.last_error = reason
        self._timer = self.loop.call_later(delay, self._connect)

    # -------------------------------------------------------------- the Broker interface
    def _channel(self, group: str) -> bytes:
        channel = self._channels.get(group)
        if channel is None:
            channel = self._channels[group] = self.prefix + group.encode("utf-8")
        return channel

    def subscribe(self, group: str) -> None:
        self.groups.add(group)
        if self.sub.state is _UP:
            self.sub.write(encode_command("SUBSCRIBE", self._channel(group)), "sub")

    def unsubscribe(self, group: str) -> None:
        self.groups.discard(group)
        channel = self._channel(group)
        del self._channels[group]
        if self.sub.state is _UP:
            self.sub.write(encode_command("UNSUBSCRIBE", channel), "sub")

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        count = self._deliver(group, message, exclude)
        pub = self.pub
        if pub.state is not _UP:
            self.dropped += 1
            return count
        payload = encode_payload(self.instance, message, exclude)
        channel = self._channels.get(group) or self.prefix + group.encode("utf-8")  # cached only while subscribed
        if len(pub.wbuf) + len(payload) > self.config.max_buffer:
            self.dropped += 1
            return count
        pub.write(encode_command(b"PUBLISH", channel, payload), "publish")
        self.published += 1
        return count

    # -------------------------------------------------------------- replies
    def _flush(self) -> None:
        if self._dirty:
            dirty = list(self._dirty)
            self._dirty.clear()
            for conn in dirty:
                conn.flush()

    def _on_reply(self, conn: _Connection, reply: Any) -> None:
        if conn is self.sub and isinstance(reply, list) and reply and reply[0] == b"message" and len(reply) == 3:
            self._on_message(reply[1], reply[2])
            return
        tag = conn.pending.popleft() if conn.pending else "?"
        if tag in _SETUP_TAGS:
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
                conn.fail(f"AUTH refused: {reply}" if tag == "auth" else f"SELECT {self.db} refused: {reply}"
                          if tag == "select" else f"PING refused: {reply}")
            else:
                conn.setup_reply()
            return
        if isinstance(reply, hiredis.ReplyError):
            self.errors += 1
            if tag == "publish":
                self.dropped += 1
            self.log.warning("broker error reply", broker="redis", connection=conn.name, command=tag,
                             error=str(reply))

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        if not channel.startswith(self.prefix):
            return
        try:
            instance, message, _exclude = decode_payload(payload)
        except ValueError as exc:
            self.errors += 1
            self.log.warning("broker message ignored", broker="redis", error=str(exc), size=len(payload))
            return
        if instance == self.instance:
            return  # ours: delivered locally when published
        self.received += 1
        group = channel[len(self.prefix):].decode("utf-8", "replace")
        # Excluded ids are connection ids of the publishing instance: none of them are here.
        self._deliver(group, message, frozenset())
