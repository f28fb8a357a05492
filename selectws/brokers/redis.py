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

History (docs/history.md): a message to a group with history goes through one Lua script (``EVALSHA``): it takes
the group's next offset from a hash ``<prefix>meta:<group>`` (fields ``e`` epoch, ``o`` offset), appends to the
stream ``<prefix>history:<group>`` (``XADD MAXLEN ~ <history_size>``, the entry id is the offset), sets both
keys to expire after ``history_ttl``, and PUBLISHes it with its offset and epoch -- atomically, so every instance
sees the group's messages in offset order. Local delivery waits for the script's answer (one round trip), since
the offset comes from Redis. A read (recovery, the API's ``history``) is another script: the position and
``XRANGE`` from the offset asked for. A history whose stream is gone while its offset says it had messages (evicted,
flushed) gets a new epoch, so clients learn that it was lost. A join that recovers waits until the group's
``SUBSCRIBE`` is confirmed before reading, so that every message is either in the read or arrives live.

Presence (docs/presence.md): join and leave deltas go on the group's channel (the instances that follow the group
hear them); an instance that starts following a group asks the others for a snapshot on that channel, and they
answer on its own channel (``<prefix>``, a NUL byte, ``i:<instance>``; no group name has a NUL); every instance
says it is alive on ``<prefix>`` NUL ``instances`` each ``presence_heartbeat`` seconds, and one not heard for three
of them is gone (its members leave every group). While Redis is down nobody is expired (the view is frozen), and
when it is back every instance sends its members again and asks for the others'. The server API asks the
instances that follow a group it does not follow itself (``PUBSUB NUMSUB`` says how many answers to wait for; at
most one second).

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
import hashlib
import json
import os
import selectors
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from selectws.config import BrokerConfig, parse_redis_url
from selectws.server.broker import BrokerHost, Deliver, HistoryCallback
from selectws.server.history import HistoryPolicy, HistoryResult, new_epoch
from selectws.server.presence import Member
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
# version, instance id, opcode, number of excluded ids. Opcodes: 1 text, 2 binary, 3 a message with its place in the
# group's history (offset, epoch, then 't'/'b' and the data; 3: its publisher delivered it locally already, 4: its
# publisher delivers it too when it comes back on the subscription), 5 presence join, 6 leave, 7 snapshot request,
# 8 snapshot, 9 heartbeat, 10 goodbye (5-10: a JSON body).
_HEADER = struct.Struct("!B8sBI")
_POSITIONED, _POSITIONED_ALL, _JOIN, _LEAVE, _ASK, _SNAPSHOT, _BEAT, _BYE = 3, 4, 5, 6, 7, 8, 9, 10
_QUERY_TIMEOUT = 1.0  # seconds the server API waits for the other instances' presence

# The history scripts (module docstring). KEYS: meta hash, stream[, channel]; ARGV[2] the TTL, ARGV[3] a fresh
# epoch. Both start by finding the group's position: a history that was lost (its meta expired or evicted; or its
# stream gone while the offset says it had messages) starts again with the fresh epoch.
_POSITION = b"""
local e = redis.call('HGET', KEYS[1], 'e')
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
if not e then
  e = ARGV[3]
  o = 0
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
elseif o > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  e = ARGV[3]
  o = 0
  redis.call('HSET', KEYS[1], 'e', e, 'o', 0)
end
"""
# ARGV: MAXLEN, TTL, epoch, the data, the payload header. Returns {offset, epoch}.
_PUBLISH_SCRIPT = _POSITION + b"""
o = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], o .. '-0', 'd', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[5] .. o .. '\\n' .. e .. '\\n' .. ARGV[4])
return {o, e}
"""
# ARGV: since (-1: none), TTL, epoch, COUNT. Returns {epoch, offset, entries above since}.
_READ_SCRIPT = _POSITION + b"""
local since = tonumber(ARGV[1])
local entries = {}
if since >= 0 and since < o then
  entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', ARGV[4])
end
return {e, o, entries}
"""
_PUBLISH_SHA = hashlib.sha1(_PUBLISH_SCRIPT).hexdigest().encode("ascii")
_READ_SHA = hashlib.sha1(_READ_SCRIPT).hexdigest().encode("ascii")
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


def _typed(message: str | bytes) -> bytes:
    """A message as kept in a history stream: ``t`` + UTF-8 text, or ``b`` + bytes."""
    return b"t" + message.encode("utf-8") if isinstance(message, str) else b"b" + bytes(message)


def _untyped(data: bytes) -> str | bytes:
    if data[:1] == b"t":
        return data[1:].decode("utf-8")
    if data[:1] == b"b":
        return data[1:]
    raise ValueError("history entry of unknown type")


def _control(instance: bytes, opcode: int, body: Any) -> bytes:
    """A presence or heartbeat message: header and a JSON body."""
    return _HEADER.pack(_VERSION, instance, opcode, 0) + json.dumps(body, separators=(",", ":")).encode("utf-8")


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
_SETUP_TAGS = ("auth", "select", "script", "setup ping")  # replies that complete SETUP
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
        if self is broker.pub:  # the history scripts, so that EVALSHA finds them (docs/history.md)
            setup.append(("script", encode_command("SCRIPT", "LOAD", _PUBLISH_SCRIPT)))
            setup.append(("script", encode_command("SCRIPT", "LOAD", _READ_SCRIPT)))
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
        # History: what waits for an answer on the publish connection, in the order of its replies.
        # "hpublish": the message, and whether it comes back on the subscription (else: deliver with the answer)
        self._hpub: deque[tuple[str, str | bytes, frozenset[int], bool]] = deque()
        self._hread: deque[Callable[[Any], None]] = deque()  # "hread": a history read
        self._numsub: deque[_Query] = deque()  # "numsub": how many instances a presence query waits for
        self._confirmed: set[bytes] = set()  # channels whose SUBSCRIBE Redis confirmed
        self._awaiting: dict[str, list[Callable[[], None]]] = {}  # reads waiting for their group's SUBSCRIBE
        # Presence (attach() sets the host; without one, as in unit tests of pub/sub alone, there is none).
        self.owner: BrokerHost | None = None
        self._ctl = self.prefix + b"\x00instances"
        self._inbox = b""
        self._queries: dict[str, list[_Query]] = {}
        self._beat_timer: Timer | None = None
        self._last_tick = 0.0
        self._last_beat = float("-inf")
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

    def attach(self, host: BrokerHost) -> None:
        self.owner = host
        self._inbox = self.prefix + b"\x00i:" + host.instance_id.encode("ascii")

    def close(self) -> None:
        """Stop: say goodbye (best effort, without blocking) so the others drop our members at once."""
        if self.owner is not None and self.pub.state is _UP and not self._closed:
            self._publish_control(self._ctl, _BYE, {"i": self.owner.instance_id})
            self.pub.flush()
        self._closed = True
        for timer in (self._timer, self._connect_timer, self._health_timer, self._beat_timer):
            if timer is not None:
                timer.cancel()
        self.pub.close()
        self.sub.close()
        self._fail_waiting("broker closed")

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
        control = [self._ctl, self._inbox] if self.owner is not None else []
        if conn is self.sub and (self.groups or control):
            channels = control + [self._channel(g) for g in sorted(self.groups)]
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
            if self.owner is not None:  # the others may have dropped us, or missed deltas: our members again
                self.owner.cluster.refresh(self.loop.now)
                self._announce()
                if self._beat_timer is None:
                    self._last_tick = self.loop.now
                    self._beat_timer = self.loop.call_later(self._tick_interval, self._tick)
            self.log.info("broker connected", broker="redis", host=self.host, port=self.port,
                          groups=len(self.groups), reconnects=self.reconnects)

    def _connection_lost(self, conn: _Connection, reason: str, **detail: Any) -> None:
        """Either connection failed: drop both, count what was unconfirmed, retry after a backoff."""
        was_up = self.pub.state is _UP or self.sub.state is _UP
        unconfirmed = sum(1 for tag in self.pub.pending if tag == "publish" or tag == "hpublish")
        self.dropped += unconfirmed
        for other in (self.pub, self.sub):
            other.close(abort=True)
            other.pending.clear()
        self._dirty.clear()
        self._confirmed.clear()
        self._fail_waiting(reason)
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
        for read in self._awaiting.pop(group, ()):  # their member left meanwhile: settle them anyway
            read()
        channel = self._channel(group)
        del self._channels[group]
        if self.sub.state is _UP:
            self.sub.write(encode_command("UNSUBSCRIBE", channel), "sub")

    def publish(self, group: str, message: str | bytes, exclude: frozenset[int],
                history: HistoryPolicy | None = None) -> int:
        if history is not None:
            return self._publish_history(group, message, exclude, history)
        count = self._deliver(group, message, exclude)
        pub = self.pub
        if pub.state is not _UP:
            self.dropped += 1
            return count
        payload = encode_payload(self.instance, message, exclude)
        channel = self._channel_for(group)
        if len(pub.wbuf) + len(payload) > self.config.max_buffer:
            self.dropped += 1
            return count
        pub.write(encode_command(b"PUBLISH", channel, payload), "publish")
        self.published += 1
        return count

    def _publish_history(self, group: str, message: str | bytes, exclude: frozenset[int],
                         policy: HistoryPolicy) -> int:
        """Through the history script: delivered locally (with its offset) when Redis answers. If Redis cannot
        take it, it still reaches the local members, without an offset and outside the history (counted)."""
        pub = self.pub
        data = _typed(message)
        if pub.state is not _UP or len(pub.wbuf) + 2 * len(data) > self.config.max_buffer:
            self.dropped += 1
            return self._deliver(group, message, exclude)
        ids = sorted(exclude)
        # Our members get it from the subscription, like everyone else's messages, so that they see the group's
        # messages in offset order -- when the group's SUBSCRIBE is confirmed (Redis runs the script after it);
        # else from the script's answer.
        via_sub = group in self.groups and self._channel_for(group) in self._confirmed
        opcode = _POSITIONED_ALL if via_sub else _POSITIONED
        header = _HEADER.pack(_VERSION, self.instance, opcode, len(ids)) + struct.pack(f"!{len(ids)}Q", *ids)
        meta, stream, ttl = self._history_keys(group, policy)
        pub.write(encode_command(b"EVALSHA", _PUBLISH_SHA, b"3", meta, stream, self._channel_for(group),
                                 str(policy.size), ttl, new_epoch(), data, header), "hpublish")
        self._hpub.append((group, message, exclude, via_sub))
        self.published += 1
        return self.owner.local_count(group, exclude) if self.owner is not None else 0

    def history(self, group: str, policy: HistoryPolicy, since: int | None, limit: int,
                callback: HistoryCallback) -> None:
        if self.pub.state is not _UP:
            callback(HistoryResult("", 0, error=f"broker down ({self.last_error or 'connecting'})"))
            return

        def read() -> None:
            if self.pub.state is not _UP:
                callback(HistoryResult("", 0, error=f"broker down ({self.last_error or 'connecting'})"))
                return
            meta, stream, ttl = self._history_keys(group, policy)
            self.pub.write(encode_command(b"EVALSHA", _READ_SHA, b"2", meta, stream,
                                          str(-1 if since is None else since), ttl, new_epoch(), str(max(1, limit))),
                           "hread")
            self._hread.append(lambda reply: callback(_history_result(reply)))

        # A member that joins a group we are only now subscribing to: read once Redis confirmed the SUBSCRIBE, so
        # that whatever is published after the read reaches us live.
        if group in self.groups and (self._channel(group) not in self._confirmed or group in self._awaiting):
            self._awaiting.setdefault(group, []).append(read)
            return
        read()

    def _fail_waiting(self, reason: str) -> None:
        """The publish connection is gone: what waited for its answers is settled here (after the state changed,
        so that what the callbacks do finds the broker down)."""
        hpub, hread, numsub = list(self._hpub), list(self._hread), list(self._numsub)
        awaiting = [read for reads in self._awaiting.values() for read in reads]
        self._hpub.clear()
        self._hread.clear()
        self._numsub.clear()
        self._awaiting.clear()
        for group, message, exclude, _via_sub in hpub:  # accepted: it reaches the local members, outside the history
            self._deliver(group, message, exclude)
        for done in hread:
            done(None)
        for read in awaiting:
            read()
        for query in numsub:
            query.finish()

    # -------------------------------------------------------------- presence
    @property
    def _tick_interval(self) -> float:
        return self.config.presence_heartbeat / 2

    def _channel_for(self, group: str) -> bytes:
        """The group's channel (cached only while subscribed)."""
        return self._channels.get(group) or self.prefix + group.encode("utf-8")

    def _history_keys(self, group: str, policy: HistoryPolicy) -> tuple[bytes, bytes, str]:
        """The history scripts' keys (meta hash, stream) and TTL argument (whole seconds, rounded up)."""
        g = group.encode("utf-8")
        return self.prefix + b"meta:" + g, self.prefix + b"history:" + g, str(max(1, int(policy.ttl + 0.999)))

    def _publish_control(self, channel: bytes, opcode: int, body: Any) -> None:
        pub = self.pub
        if pub.state is not _UP or self.owner is None:
            return
        payload = _control(self.instance, opcode, body)
        if len(pub.wbuf) + len(payload) > self.config.max_buffer:
            return
        pub.write(encode_command(b"PUBLISH", channel, payload), "control")

    def presence_join(self, group: str, member: Member) -> None:
        self._publish_control(self._channel_for(group), _JOIN, {"i": member.instance, "m": member.wire()})

    def presence_leave(self, group: str, member: Member) -> None:
        self._publish_control(self._channel_for(group), _LEAVE, {"i": member.instance, "s": member.session})

    def presence_query(self, group: str, callback: Callable[[list[Member]], None]) -> None:
        if self.owner is None or not self.up:
            callback([])
            return
        query = _Query(self, group, callback)
        self._queries.setdefault(group, []).append(query)
        query.timer = self.loop.call_later(_QUERY_TIMEOUT, query.finish)
        self.pub.write(encode_command(b"PUBSUB", b"NUMSUB", self._channel_for(group)), "numsub")
        self._numsub.append(query)
        self._publish_control(self._channel_for(group), _ASK, {"i": self.owner.instance_id})

    def _announce(self) -> None:
        """Our members of every group we follow, to whoever follows it (after a reconnect or a stall)."""
        host = self.owner
        if host is None:
            return
        for group in host.local_groups():
            self._send_snapshot(self._channel_for(group), group)

    def _send_snapshot(self, channel: bytes, group: str) -> None:
        host = self.owner
        assert host is not None
        members = [m.wire() for m in host.local_presence(group)]
        self._publish_control(channel, _SNAPSHOT, {"i": host.instance_id, "g": group, "m": members})

    def _tick(self) -> None:
        """Every half heartbeat: say we are alive (once per heartbeat), and drop the instances that are not."""
        self._beat_timer = None
        host = self.owner
        if host is None or self._closed:
            return
        now = self.loop.now
        interval = self.config.presence_heartbeat
        stalled = now - self._last_tick > 2 * interval  # our own loop (or process) stood still
        self._last_tick = now
        if self.up:
            if now - self._last_beat >= interval * 0.9:
                self._last_beat = now
                self._publish_control(self._ctl, _BEAT, {"i": host.instance_id})
            if stalled:  # we heard nobody meanwhile, and they may have dropped us: start afresh
                host.cluster.refresh(now)
                self._announce()
            else:
                for group, gone in host.cluster.expire(now, 3 * interval).items():
                    self.log.info("presence: instance gone", broker="redis", group=group,
                                  instances=sorted({m.instance for m in gone}), members=len(gone))
                    host.presence_gone(group, gone)
        self._beat_timer = self.loop.call_later(self._tick_interval, self._tick)

    def _on_control(self, channel: bytes, opcode: int, body: bytes) -> None:
        host = self.owner
        if host is None:
            return
        try:
            data = json.loads(body)
            instance = data["i"]
            if not isinstance(instance, str):
                raise ValueError("instance")
            now = self.loop.now
            cluster = host.cluster
            cluster.heard(instance, now)
            if opcode == _BEAT:
                return
            if opcode == _BYE:
                for group, gone in cluster.drop_instance(instance).items():
                    host.presence_gone(group, gone)
                return
            if opcode == _SNAPSHOT:
                group = data["g"]
                members = [Member.from_wire(instance, item) for item in data["m"]]
                if group in self.groups:
                    gone = cluster.snapshot(group, instance, members, now)
                    if gone:
                        host.presence_gone(group, gone)
                if channel == self._inbox:
                    for query in list(self._queries.get(group, ())):
                        query.answer(members)
                return
            group = channel[len(self.prefix):].decode("utf-8")
            if opcode == _ASK:  # someone starts following this group, or the API asks: our members, to it
                self._send_snapshot(self.prefix + b"\x00i:" + instance.encode("ascii"), group)
            elif opcode == _JOIN and group in self.groups:
                cluster.join(group, Member.from_wire(instance, data["m"]), now)
            elif opcode == _LEAVE and group in self.groups:
                cluster.leave(group, str(data["s"]))
        except (ValueError, KeyError, TypeError, UnicodeError) as exc:
            self.errors += 1
            self.log.warning("broker presence message ignored", broker="redis", error=repr(exc), size=len(body))

    def _subscribed(self, channel: bytes) -> None:
        """Redis confirmed a SUBSCRIBE: reads that waited for it go; a group we now follow asks for a snapshot."""
        self._confirmed.add(channel)
        if not channel.startswith(self.prefix) or channel in (self._ctl, self._inbox):
            return
        group = channel[len(self.prefix):].decode("utf-8", "replace")
        if self.owner is None or group not in self.groups or not self.up:
            self._release(group)
            return
        # We now follow the group: ask the instances that follow it for their members, and let the reads that
        # waited for the SUBSCRIBE go once they answered (PUBSUB NUMSUB says how many: the followers but us), or
        # after a second -- so that a join's callback (the chat's welcome and its "name taken" check) sees them.
        query = _Query(self, group, lambda _members: self._release(group))
        self._queries.setdefault(group, []).append(query)
        query.timer = self.loop.call_later(_QUERY_TIMEOUT, query.finish)
        query.ours = True
        self.pub.write(encode_command(b"PUBSUB", b"NUMSUB", channel), "numsub")
        self._numsub.append(query)
        self._publish_control(channel, _ASK, {"i": self.owner.instance_id})

    def _release(self, group: str) -> None:
        """The others' members of ``group`` are known (or will not be): the reads that waited go, and the server
        may say "occupied"."""
        for read in self._awaiting.pop(group, ()):
            read()
        if self.owner is not None:
            self.owner.presence_ready(group)

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
        if tag == "hpublish":
            group, message, exclude, via_sub = self._hpub.popleft()
            if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], int):
                if not via_sub:
                    self._deliver(group, message, exclude, reply[0], reply[1].decode("utf-8", "replace"))
                return
            self.dropped += 1  # Redis refused the script: local members still get it, outside the history
            self._deliver(group, message, exclude)
        elif tag == "hread":
            done = self._hread.popleft()
            if not isinstance(reply, hiredis.ReplyError):
                done(reply)
                return
            done(None)
        elif tag == "numsub":
            query = self._numsub.popleft()
            if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], int):
                query.expect(reply[1])
                return
        elif tag == "sub":
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"subscribe":
                self._subscribed(reply[1])
                return
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"unsubscribe":
                self._confirmed.discard(reply[1])
                return
        if tag in _SETUP_TAGS:
            if isinstance(reply, hiredis.ReplyError):
                self.errors += 1
                conn.fail(f"AUTH refused: {reply}" if tag == "auth" else f"SELECT {self.db} refused: {reply}"
                          if tag == "select" else f"SCRIPT LOAD refused: {reply}" if tag == "script"
                          else f"PING refused: {reply}")
            else:
                conn.setup_reply()
            return
        if isinstance(reply, hiredis.ReplyError):
            self.errors += 1
            if tag == "publish":
                self.dropped += 1
            if "NOSCRIPT" in str(reply):  # the script cache was flushed: load them again
                for script in (_PUBLISH_SCRIPT, _READ_SCRIPT):
                    self.pub.write(encode_command("SCRIPT", "LOAD", script), "script")
            self.log.warning("broker error reply", broker="redis", connection=conn.name, command=tag,
                             error=str(reply))

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        if not channel.startswith(self.prefix):
            return
        if len(payload) >= _HEADER.size and payload[0] == _VERSION and payload[9] > 2:
            opcode = payload[9]
            ours = payload[1:9] == self.instance
            if opcode == _POSITIONED_ALL or (opcode == _POSITIONED and not ours):
                self._on_positioned(channel, payload, ours)
            elif not ours:
                self._on_control(channel, opcode, payload[_HEADER.size:])
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


    def _on_positioned(self, channel: bytes, payload: bytes, ours: bool) -> None:
        """A message of a group with history: deliver it with its offset and epoch (and, when it is ours, without
        the sessions its publisher excluded)."""
        try:
            _version, _instance, _opcode, count = _HEADER.unpack_from(payload)
            start = _HEADER.size + 8 * count
            end_offset = payload.index(b"\n", start)
            end_epoch = payload.index(b"\n", end_offset + 1)
            offset = int(payload[start:end_offset])
            epoch = payload[end_offset + 1:end_epoch].decode("ascii")
            message = _untyped(payload[end_epoch + 1:])
        except (ValueError, struct.error, UnicodeError) as exc:
            self.errors += 1
            self.log.warning("broker message ignored", broker="redis", error=str(exc), size=len(payload))
            return
        exclude = frozenset(struct.unpack_from(f"!{count}Q", payload, _HEADER.size)) if ours else frozenset()
        if not ours:
            self.received += 1
        self._deliver(channel[len(self.prefix):].decode("utf-8", "replace"), message, exclude, offset, epoch)


def _history_result(reply: Any) -> HistoryResult:
    """The read script's answer ``[epoch, offset, [[id, [b"d", data]], ...]]`` (None: the connection failed)."""
    if not (isinstance(reply, list) and len(reply) == 3 and isinstance(reply[1], int)):
        return HistoryResult("", 0, error="broker down" if reply is None else f"unexpected reply {reply!r:.80}")
    result = HistoryResult(reply[0].decode("utf-8", "replace"), reply[1])
    for entry_id, fields_ in reply[2]:
        result.messages.append((int(entry_id.partition(b"-")[0]), _untyped(fields_[1])))
    return result


class _Query:
    """A presence query of the server API: the members the other instances that follow ``group`` answer with."""

    def __init__(self, broker: RedisBroker, group: str, callback: Callable[[list[Member]], None]) -> None:
        self.broker = broker
        self.group = group
        self.callback: Callable[[list[Member]], None] | None = callback
        self.members: list[Member] = []
        self.answers = 0
        self.expected: int | None = None
        self.timer: Timer | None = None
        self.ours = False  # we follow the group ourselves (NUMSUB counts us)

    def expect(self, subscribers: int) -> None:
        """``PUBSUB NUMSUB``: how many instances follow the group (less us, when we do)."""
        self.expected = subscribers - 1 if self.ours else subscribers
        if self.answers >= subscribers:
            self.finish()

    def answer(self, members: list[Member]) -> None:
        self.members.extend(members)
        self.answers += 1
        if self.expected is not None and self.answers >= self.expected:
            self.finish()

    def finish(self) -> None:
        callback, self.callback = self.callback, None
        if callback is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        queries = self.broker._queries.get(self.group)
        if queries is not None and self in queries:
            queries.remove(self)
            if not queries:
                del self.broker._queries[self.group]
        callback(self.members)
