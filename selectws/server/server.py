"""The server: listening sockets, the connection registry, groups and broadcast, shutdown.

It owns one :class:`EventLoop`. Everything runs on that loop's thread: accepting, reading, the plugins, timers and
signals. The registry is plain dicts keyed by connection id; groups are dicts of members in join order, so a
broadcast walks its members once and hands each the same encoded frame.
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import selectors
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

from selectws.config import Config, split_host_port
from selectws.protocol.broadcast import SharedFrame
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.errors import CloseCode
from selectws.protocol.events import Closed
from selectws.protocol.http11 import HttpLimits, build_response
from selectws.server.accept import OUT_OF_RESOURCES, AcceptGuard, ReserveRouter
from selectws.server.api import Plugin, Session
from selectws.server.auth import JwtVerifier
from selectws.server.broker import Broker, BrokerFactory, Deliver, MemoryBroker
from selectws.server.connection import ServerConnection
from selectws.server.handshake import Admission
from selectws.server.health import ops_handlers
from selectws.server.hooks import HookLoader, Hooks
from selectws.server.http_api import API_PREFIX, ServerApi
from selectws.server.proxy import parse_networks
from selectws.server.routing import Route, Router
from selectws.server.static import static_handler
from selectws.server.stats import Counters, ServerStats
from selectws.server.tls_connection import TlsServerConnection
from selectws.transport.listen import bind_listeners, format_address
from selectws.transport.logs import flush_logs, get_logger
from selectws.transport.loop import EventLoop
from selectws.transport.sdnotify import Notifier, watchdog_interval
from selectws.transport.tls import build_context

__all__ = ["Listener", "Server", "raise_nofile_limit"]

_RECV_SIZE = 256 * 1024
_PENDING_503 = build_response(503, [("Retry-After", "5")], b"503 too many pending handshakes, retry\n\n")
_ACCEPT_BATCH = 128


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every connection is a file descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


class Listener:
    """A listening socket in the loop; accepts in batches so a burst of connections costs few iterations."""

    def __init__(self, server: Server, sock: socket.socket, router: Router | None = None) -> None:
        self.server = server
        self.sock = sock
        #: None: the server's WebSocket router; the operator listener has one with only /healthz and /metrics.
        self.router = router
        sock.setblocking(False)

    def handle_event(self, mask: int) -> None:
        server = self.server
        accept = self.sock.accept
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._out_of_resources(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            server.accept_connection(conn, addr, self.router)

    def _out_of_resources(self, exc: OSError) -> None:
        """accept() failed for lack of descriptors (or memory): serve one connection from the reserve, or pause
        this listener until a descriptor is free (:mod:`selectws.server.accept`). Never the common path."""
        server = self.server
        guard = server.accept_guard
        if not guard.failed(self, exc):
            return
        try:
            conn, addr = self.sock.accept()
        except OSError:  # the queue emptied meanwhile, or still no descriptor: the spare goes back
            guard.refill()
            return
        guard.served()
        accepted = server.accept_connection(conn, addr, self.router)
        if accepted is None:  # refused at once: its descriptor is free again
            guard.refill()
        elif self.router is None:  # a WebSocket listener: the operator endpoints, or 503 (it holds a spare)
            accepted.router = ReserveRouter(server.router, server._ops_paths, server)

    @property
    def address(self) -> tuple[Any, ...]:
        addr: tuple[Any, ...] = self.sock.getsockname()
        return addr


class Server:
    """The daemon: one loop, its listeners, its clients, its plugins."""

    def __init__(
        self,
        config: Config,
        *,
        plugins: Callable[[str], type[Plugin]],
        sockets: Iterable[socket.socket] | None = None,
        ops_sockets: Iterable[socket.socket] | None = None,
        notifier: Notifier | None = None,
        broker: BrokerFactory | None = None,
        reload: Callable[[], Config] | None = None,
        hooks: HookLoader | None = None,
        api_key: Callable[[Config], str | None] | None = None,
        jwt: Callable[[Config], JwtVerifier | None] | None = None,
    ) -> None:
        """``plugins`` finds a plugin class by its configured name; ``broker`` builds the broker (default: in
        memory); ``reload`` re-reads the configuration on SIGHUP (None: nothing to reload); ``hooks`` reads the
        ``[[hooks]]`` secrets and addresses (None: no webhooks). The application layer passes them."""
        self.config = config
        self.loop = EventLoop()
        self.log = get_logger("selectws.server").bind()  # bound again by apply_config after a reload
        self.notifier = notifier or Notifier.from_env()
        self.find_plugin = plugins
        self.reload = reload
        self._hook_loader = hooks
        # The server API (selectws/server/http_api.py): ``api_key(config)`` reads its key (the application's
        # secrets reader; a ConfigError naming the key if it cannot); None, or no key configured: the API is off.
        self._api_key_reader = api_key
        self.api: ServerApi | None = None
        # auth = "jwt" routes: ``jwt(config)`` builds the verifier from [auth] (the application reads the secret or
        # the public key, and knows whether PyJWT is installed); None: such routes answer 500.
        self._jwt_loader = jwt
        self.jwt: JwtVerifier | None = None
        self.per_user: dict[str, int] = {}  # open authenticated connections by user (max_connections_per_user)
        self._user_of: dict[int, str] = {}  # connection id -> the user it is counted under in per_user
        #: Random per process: session ids are ``<instance_id>.<n>``, unique across the instances of a cluster.
        self.instance_id = secrets.token_hex(6)
        self.hooks: Hooks | None = None  # webhooks (selectws/server/hooks.py); None when none are configured
        self.recv_buffer = bytearray(_RECV_SIZE)
        self.recv_view = memoryview(self.recv_buffer)
        self.dirty: list[ServerConnection] = []
        # Write buffers: the connections with unsent output, and the sum of their unsent bytes (a broadcast frame
        # queued on many counts once per recipient: an upper bound of the memory held).
        self.backlogged: set[ServerConnection] = set()
        self.buffered_total = 0
        self.connections: dict[int, ServerConnection] = {}  # every accepted socket, by id
        self.sessions: dict[int, ServerConnection] = {}  # open WebSocket connections, by id
        self.groups: dict[str, dict[int, ServerConnection]] = {}
        self.broker: Broker = (broker or _memory_broker)(self.loop, self._deliver, self.log)
        self._ops_inherited = list(ops_sockets) if ops_sockets is not None else None  # bound by a supervisor
        self.listeners: list[Listener] = []
        # [ops] listen: health and metrics on a listener of their own that stays open while draining.
        self.ops_listeners: list[Listener] = []
        self.ops_router = Router([])
        self._ops_listen: str | None = None  # fixed by the first configuration: the listener is bound once
        self._ops_paths: list[str] = []
        self._inherited = list(sockets) if sockets is not None else None
        # [tls]: the context new connections on the WebSocket listeners are wrapped with (None: plain TCP). Whether
        # TLS is on is fixed by the first configuration; a reload replaces the context (a new certificate).
        self.tls_context: ssl.SSLContext | None = None
        self._tls_on: bool | None = None
        self._next_id = 1
        self.draining = False
        self._stopped = False
        self._grace_timer: Any = None
        self._status_sent = ""  # the last STATUS= sent to systemd
        self.started_at = time.time()
        #: Plain integers on the hot path, turned into metrics only when asked (see :meth:`stats`).
        self.counters = Counters()
        # Out of file descriptors: the spare descriptors, the paused listeners (selectws/server/accept.py).
        self.accept_guard = AcceptGuard(self.loop, self.counters, lambda: self.log)
        # Hardening: sockets still in the opening handshake, open WebSockets per client address (the address
        # after trusted_proxies), and the rate limit of the "too many pending handshakes" warning.
        self.handshaking: dict[int, ServerConnection] = {}
        self.per_ip: dict[str, int] = {}
        self._ip_of: dict[int, str] = {}  # connection id -> the address it is counted under in per_ip
        self._pending_refused_unlogged = 0
        self._pending_warned_at = float("-inf")
        self._shed_unlogged = 0  # connections dropped by the write buffer budget since its last warning
        self._shed_warned_at = float("-inf")
        self.apply_config(config)
        self.loop.end_of_iteration.append(self._flush_dirty)
        self.loop.end_of_iteration.append(flush_logs)

    def stats(self) -> ServerStats:
        """The counters and gauges as they are now (for /metrics, /healthz and systemd's status)."""
        c = self.counters
        live = self.connections.values()
        by_route: dict[str, int] = {route.path: 0 for route in self.router.routes}
        for conn in self.sessions.values():
            route = conn.route
            if route is not None:
                by_route[route.path] = by_route.get(route.path, 0) + 1
        return ServerStats(
            started_at=self.started_at,
            draining=self.draining,
            accepted=c.accepted,
            accept_errors=c.accept_errors,
            accept_paused=self.accept_guard.exhausted,
            accept_reserve=len(self.accept_guard.spares),
            accept_reserve_used=self.accept_guard.reserve_used,
            rejected=dict(c.rejected),
            handshake_failures=c.handshake_failures,
            messages_in=c.messages_in,
            messages_out=c.messages_out,
            plugin_errors=c.plugin_errors,
            slow_consumers_dropped=c.slow_consumers_dropped,
            close_codes=dict(c.close_codes),
            bytes_in=c.closed_bytes_in + sum(conn.bytes_in for conn in live),
            bytes_out=c.closed_bytes_out + sum(conn.bytes_out for conn in live),
            sockets_open=len(self.connections),
            handshaking=len(self.handshaking),
            open_by_route=by_route,
            groups=len(self.groups),
            write_buffer_bytes=self.buffered_total + sum(conn.ws.pending_output for conn in live),
            write_buffer_budget=self.max_buffered_total,
            budget_dropped=c.budget_dropped,
            loop_iterations=self.loop.iterations,
            loop_lag_max=self.loop.max_lag,
            timers=self.loop.timer_count,
            broker=self.broker.stats(),
            hooks=self.hooks.stats() if self.hooks else (),
            **self._rate_limit_stats(),
        )

    def _rate_limit_stats(self) -> dict[str, dict[str, int]]:
        """The rate-limit counters by route, with a 0 for every route that has a limit (a series exists at once)."""
        c = self.counters
        routes = [route for route in self.router.routes if route.max_messages_per_second]
        limited = {route.path: 0 for route in routes}
        closing = {route.path: 0 for route in routes if route.rate_limit_action == "close"}
        return {"rate_limited": {**limited, **c.rate_limited}, "rate_limit_closes": {**closing, **c.rate_limit_closes}}

    # ------------------------------------------------------------------ configuration
    def apply_config(self, config: Config) -> None:
        """Build routes and limits from ``config`` (at start, and on reload).

        The plugins are constructed first: if one raises, nothing of the running configuration has changed.
        """
        tls_context = self._tls_for(config)  # first: a certificate that fails to load changes nothing
        # Webhook secrets and addresses, before anything changes too; DNS only at start (before the loop runs).
        hook_targets = self._hook_loader(config, not hasattr(self, "router")) if self._hook_loader else ()
        api_key = self._api_key_reader(config) if self._api_key_reader is not None else None  # before changes too
        jwt = self._jwt_loader(config) if self._jwt_loader is not None else None  # the [auth] key, likewise
        routes = []
        for rc in config.routes:
            plugin_cls = self.find_plugin(rc.plugin)
            plugin: Plugin = plugin_cls(self, rc.options)
            compression = config.compression.enabled if rc.compression is None else rc.compression
            routes.append(Route(rc.path, plugin, rc.plugin, tuple(rc.subprotocols), compression,
                                frozenset(rc.origins), rc.subprotocol_required, **rc.rate_limit(config.limits),
                                auth=rc.auth))
        self.config = config
        self.log = get_logger("selectws.server").bind()  # picks up a reconfigured level or format
        if tls_context is not self.tls_context and tls_context is not None:
            self.log.info("tls certificate loaded", cert=config.tls.cert, key=config.tls.key,
                          min_version=config.tls.min_version, client_certs=bool(config.tls.ca))
        self.tls_context = tls_context
        limits = config.limits
        self.http_limits = HttpLimits(limits.max_request_line, limits.max_header_count, limits.max_header_bytes)
        self.high_water = limits.write_buffer_high
        self.low_water = limits.write_buffer_high // 4
        # A connection whose backlog passes this is not reading at all and is dropped (close 1013).
        # Output that would take a connection's backlog past this is not queued: the peer is a slow consumer.
        self.hard_limit = limits.write_buffer_limit
        self.max_buffered_total = limits.max_buffered_total
        self.slow_consumer_action = limits.slow_consumer_action
        self.slow_consumer_close_code = limits.slow_consumer_close_code
        self.max_connections = limits.max_connections
        self.max_connections_per_ip = limits.max_connections_per_ip
        self.max_connections_per_user = limits.max_connections_per_user
        self.jwt = jwt
        self.max_pending_handshakes = limits.max_pending_handshakes
        self.trusted_proxies = parse_networks(config.server.trusted_proxies)
        previous = getattr(self, "router", None)
        self.router = Router(routes, previous.http if previous else None, previous.fallback if previous else None)
        base = os.path.dirname(os.path.abspath(config.source)) if config.source else None
        self.router.fallback = static_handler(config.static, base=base, warn=self.log.warning)
        self._apply_ops(config)
        self._apply_api(config, api_key)
        if hook_targets and self.hooks is None:
            self.hooks = Hooks(self.loop, lambda: self.log)
        if self.hooks is not None:
            self.hooks.configure(hook_targets)
            if not self.hooks:
                self.hooks = None
        self.deflate_settings: DeflateSettings | None = None
        if config.compression.enabled or any(r.compression for r in routes):
            c = config.compression
            self.deflate_settings = DeflateSettings(
                server_max_window_bits=c.server_max_window_bits,
                client_max_window_bits=c.client_max_window_bits,
                server_no_context_takeover=c.server_no_context_takeover,
                client_no_context_takeover=c.client_no_context_takeover,
                memory_level=c.memory_level,
                min_size=c.min_size,
            )

    def _tls_for(self, config: Config) -> ssl.SSLContext | None:
        """The TLS context ``config`` asks for; :class:`ConfigError` (naming the key) if its files do not load."""
        if self._tls_on is None:
            self._tls_on = config.tls.enabled
        elif config.tls.enabled != self._tls_on:
            self.log.warning("tls turned on or off; it takes effect on restart", running=self._tls_on,
                             configured=config.tls.enabled)
        if not self._tls_on or not config.tls.enabled:
            return self.tls_context
        base = os.path.dirname(os.path.abspath(config.source)) if config.source else None
        return build_context(config.tls, base)

    def _apply_ops(self, config: Config) -> None:
        """(Re)register /healthz and /metrics: on the WebSocket router, or on the operator listener's."""
        handlers = ops_handlers(self.stats, config.ops)
        if self._ops_listen is None:
            self._ops_listen = config.ops.listen
        elif config.ops.listen != self._ops_listen:
            self.log.warning("ops.listen changed; it takes effect on restart", running=self._ops_listen,
                             configured=config.ops.listen)
        for path in self._ops_paths:
            self.router.http.pop(path, None)
        if self._ops_listen:
            self.ops_router.http = handlers
            self._ops_paths = []
        else:
            self.router.http.update(handlers)
            self._ops_paths = list(handlers)

    def _apply_api(self, config: Config, key: str | None) -> None:
        """(Re)register the server API (``POST /api/<method>``) where /healthz and /metrics are, or take it away
        when no key is configured."""
        self.api = ServerApi(self, key, config.limits.max_message_size, self.log) if key else None
        router = self.ops_router if self._ops_listen else self.router
        router.body_handlers = {API_PREFIX: self.api} if self.api is not None else {}

    # ------------------------------------------------------------------ listening
    def start(self) -> None:
        """Listen, install signal handlers, tell systemd we are ready."""
        raise_nofile_limit()
        server = self.config.server
        socks = self._inherited or bind_listeners(server.host, server.port, server.backlog)
        for sock in socks:
            listener = Listener(self, sock)
            self.listeners.append(listener)
            self.loop.register(sock, selectors.EVENT_READ, listener)
        if self._ops_listen:
            try:
                ops_socks = self._ops_inherited or bind_listeners(
                    *split_host_port("ops.listen", self._ops_listen), self.config.server.backlog
                )
            except OSError as exc:
                for listener in self.listeners:
                    self.loop.unregister(listener.sock)
                    listener.sock.close()
                self.listeners = []
                raise OSError(exc.errno, f"ops.listen = {self._ops_listen!r}: {exc.strerror or exc}") from exc
            for sock in ops_socks:
                listener = Listener(self, sock, self.ops_router)
                self.ops_listeners.append(listener)
                self.loop.register(sock, selectors.EVENT_READ, listener)
        self.accept_guard.keep_for_ops = 1 if self.ops_listeners else 0  # a spare the WebSocket port cannot take
        self.accept_guard.refill()  # the spare descriptors, for when the process runs out of them
        self.loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        self.loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        addresses = [format_address(listener.address) for listener in self.listeners]
        ops_addresses = [format_address(listener.address) for listener in self.ops_listeners]
        self.log.info(
            "listening", addresses=addresses, routes=[f"{r.path} -> {r.plugin_name}" for r in self.router.routes],
            inherited=bool(self._inherited), tls=self.tls_context is not None, pid=os.getpid(),
            ops_addresses=ops_addresses,
            ops_paths=sorted(self.ops_router.http if self.ops_listeners else self._ops_paths),
            instance=self.instance_id, api=self.api is not None,
        )
        self.broker.start()
        self._status_sent = self.status_text()
        self.notifier.ready(status=f"listening on {', '.join(addresses)}; {self._status_sent}")
        flush_logs()  # the "listening" line must not wait for the first loop iteration
        interval = watchdog_interval()
        if interval:
            self._watchdog(interval)
        self.loop.call_later(5.0, self._status_tick)

    def run(self) -> None:
        """Start and run until shut down."""
        self.start()
        try:
            self.loop.run()
        finally:
            self.close()

    def close(self) -> None:
        flush_logs()
        for listener in self.listeners + self.ops_listeners:
            self.loop.unregister(listener.sock)
            listener.sock.close()
        self.listeners = []
        self.ops_listeners = []
        self.accept_guard.close()
        for conn in list(self.connections.values()):
            conn.shutdown_now()
        self.broker.close()
        if self.hooks:
            self.hooks.shutdown()
        self.loop.close()
        self.notifier.close()

    # ------------------------------------------------------------------ connections
    def accept_connection(
        self, sock: socket.socket, addr: Any, router: Router | None = None
    ) -> ServerConnection | None:
        """Serve an accepted socket; the connection, or None if it was refused (and closed) at once."""
        if router is None and len(self.handshaking) >= self.max_pending_handshakes:
            self._refuse_pending(sock, addr)
            return None
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn_id = self._next_id
        self._next_id += 1
        remote = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) else (str(addr), 0)
        tls = self.tls_context if router is None else None  # the operator listener stays plain HTTP
        conn: ServerConnection
        if tls is None:
            conn = ServerConnection(self, sock, remote, conn_id, router)
        else:
            try:
                conn = TlsServerConnection(self, sock, remote, conn_id, tls)
            except OSError as exc:  # the peer is already gone
                self.log.info("connection lost before TLS", peer=remote[0], error=str(exc))
                sock.close()
                return None
        self.connections[conn_id] = conn
        if router is None:  # the operator listener's health checks are never refused for a handshake flood
            self.handshaking[conn_id] = conn
        self.counters.accepted += 1
        self.loop.register(conn.sock, selectors.EVENT_READ, conn)  # the SSLSocket for TLS
        return conn

    def _refuse_pending(self, sock: socket.socket, addr: Any) -> None:
        """Too many sockets in the opening handshake: answer 503 at once (best effort, never blocking) and close.

        Logged at most once per burst (every 10 s while it lasts, with the count refused since the last line).
        """
        counters = self.counters
        counters.accepted += 1
        counters.rejected[503] = counters.rejected.get(503, 0) + 1
        if self.tls_context is None:
            try:
                sock.setblocking(False)
                sock.send(_PENDING_503)
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass
        self._pending_refused_unlogged += 1
        now = self.loop.now
        if now - self._pending_warned_at >= 10.0:
            self._pending_warned_at = now
            self.log.warning(
                "too many pending handshakes; refusing new connections", pending=len(self.handshaking),
                limit=self.max_pending_handshakes, refused=self._pending_refused_unlogged,
                peer=str(addr[0]) if isinstance(addr, tuple) else str(addr),
            )
            self._pending_refused_unlogged = 0

    def admission(self) -> Admission:
        """What the limits and state allow a new WebSocket right now (read by the handshake decision)."""
        return Admission(
            open_count=len(self.sessions), max_connections=self.max_connections, per_ip=self.per_ip,
            max_per_ip=self.max_connections_per_ip, draining=self.draining, deflate=self.deflate_settings,
            trusted_proxies=self.trusted_proxies, jwt=self.jwt, per_user=self.per_user,
            max_per_user=self.max_connections_per_user,
        )

    def _uncount_ip(self, conn: ServerConnection) -> None:
        ip = self._ip_of.pop(conn.id, None)
        if ip is not None:
            left = self.per_ip[ip] - 1
            if left:
                self.per_ip[ip] = left
            else:
                del self.per_ip[ip]

    def _uncount_user(self, conn: ServerConnection) -> None:
        user = self._user_of.pop(conn.id, None)
        if user is not None:
            left = self.per_user[user] - 1
            if left:
                self.per_user[user] = left
            else:
                del self.per_user[user]

    def on_open(self, conn: ServerConnection) -> None:
        """``conn`` completed its opening handshake."""
        self.sessions[conn.id] = conn
        self.handshaking.pop(conn.id, None)
        ip = conn.remote[0]
        self._ip_of[conn.id] = ip
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        session = conn.session
        self.log.info(
            "open", conn=conn.id, peer=conn.remote[0], port=conn.remote[1], path=conn.path,
            subprotocol=session.subprotocol if session is not None else None,
        )
        if self.hooks:
            self.hooks.open(conn)
        user = session.user if session is not None else None
        if user is not None and session is not None:  # auth = "jwt": counted, and in the group of the user
            self._user_of[conn.id] = user
            self.per_user[user] = self.per_user.get(user, 0) + 1
            self.join(session, f"user:{user}")

    def on_closed(self, conn: ServerConnection, event: Closed) -> None:
        """The WebSocket of ``conn`` ended (its socket may still be draining)."""
        if self.sessions.pop(conn.id, None) is None:
            return
        self._uncount_ip(conn)
        self._uncount_user(conn)
        session = conn.session
        if session is not None:
            for group in list(session.groups):
                self.leave(session, group)
        codes = self.counters.close_codes
        codes[event.code] = codes.get(event.code, 0) + 1
        self.log.info(
            "close", conn=conn.id, peer=conn.remote[0], path=conn.path, code=event.code,
            reason=event.reason, by_peer=event.by_peer, duration=round(self.loop.now - conn.opened_at, 3),
            bytes_in=conn.bytes_in, bytes_out=conn.bytes_out,
        )
        if self.hooks:
            self.hooks.close(conn, event.code, event.reason)

    def on_gone(self, conn: ServerConnection) -> None:
        """The socket of ``conn`` is closed: forget it."""
        self.handshaking.pop(conn.id, None)
        self._uncount_ip(conn)  # normally done by on_closed already; never leaks either way
        self._uncount_user(conn)
        if self.connections.pop(conn.id, None) is not None:
            self.counters.closed_bytes_in += conn.bytes_in
            self.counters.closed_bytes_out += conn.bytes_out
        guard = self.accept_guard
        if guard.exhausted or len(guard.spares) < guard.reserve:  # a descriptor is free: the reserve, the listeners
            guard.freed()
        if self.draining and not self.connections:
            self._finish_shutdown()

    def shed_write_buffers(self) -> None:
        """All write buffers together passed ``max_buffered_total``: drop the connections holding the most unsent
        bytes until the sum is back under three quarters of it (room, so that the next shedding is not at once).
        One warning per episode: at most one line per 10 s, with the count since the last line."""
        limit = self.max_buffered_total
        target = limit - (limit >> 2)
        before = self.buffered_total
        dropped = 0
        for conn in sorted(self.backlogged, key=lambda c: c.buffered, reverse=True):
            if self.buffered_total <= target:
                break
            conn.drop_over_budget()
            dropped += 1
        self._shed_unlogged += dropped
        now = self.loop.now
        if now - self._shed_warned_at >= 10.0:
            self._shed_warned_at = now
            self.log.warning(
                "write buffers over max_buffered_total; dropped the connections holding the most unsent bytes",
                dropped=self._shed_unlogged, buffered_before=before, buffered_after=self.buffered_total,
                limit=limit,
            )
            self._shed_unlogged = 0

    def _flush_dirty(self) -> None:
        dirty = self.dirty
        while dirty:
            batch = dirty[:]
            dirty.clear()
            for conn in batch:
                conn.flush()

    @property
    def open_count(self) -> int:
        return len(self.sessions)

    # ------------------------------------------------------------------ ServerAPI for plugins
    def join(self, session: Session, group: str) -> None:
        conn = self.sessions.get(_local_id(session))
        if conn is None or conn.session is None:
            return
        members = self.groups.get(group)
        if members is None:
            members = self.groups[group] = {}
            self.broker.subscribe(group)
        if self.hooks and conn.id not in members:
            self.hooks.join(conn, group, first=not members)
        members[conn.id] = conn
        own = conn.session
        if own._groups is None:
            own._groups = set()
        own._groups.add(group)

    def leave(self, session: Session, group: str) -> None:
        members = self.groups.get(group)
        if members is None:
            return
        conn = members.pop(_local_id(session), None)
        if conn is not None and conn.session is not None and conn.session._groups is not None:
            conn.session._groups.discard(group)
        if not members:
            del self.groups[group]
            self.broker.unsubscribe(group)
        if conn is not None and self.hooks:
            self.hooks.leave(conn, group, last=not members)

    def members(self, group: str) -> list[Session]:
        return [conn.session for conn in self.groups.get(group, {}).values() if conn.session is not None]

    def broadcast(self, group: str, message: str | bytes, exclude: Session | Iterable[Session] | None = None) -> int:
        return self.broker.publish(group, message, _exclude_ids(exclude))

    def _deliver(self, group: str, message: str | bytes, exclude: frozenset[int]) -> int:
        """Local delivery of a group message: each wire form is framed once, and the same bytes object is
        queued on every member that takes it (:class:`SharedFrame`)."""
        members = self.groups.get(group)
        if not members:
            return 0
        settings = self.deflate_settings
        shared = SharedFrame(message, settings.memory_level if settings is not None else 8)
        plain = shared.plain
        count = 0
        for conn_id, conn in list(members.items()):
            if conn_id in exclude:
                continue
            ext = conn.ws.extension
            frame = plain if ext is None else shared.for_extension(ext)  # inline: the common case costs no call
            # None: a recipient with its own compression context frames the message itself.
            sent = conn.send_frame(frame) if frame is not None else conn.send_message(message)
            if sent:
                count += 1
        self.counters.messages_out += count
        return count

    def get(self, session_id: str) -> Session | None:
        """The open session with this id (``<instance_id>.<n>``), if it is on this instance."""
        instance, _, number = str(session_id).rpartition(".")
        if instance != self.instance_id or not (number.isascii() and number.isdigit()):
            return None
        conn = self.sessions.get(int(number))
        return conn.session if conn is not None else None

    def all_sessions(self) -> list[Session]:
        return [conn.session for conn in self.sessions.values() if conn.session is not None]

    # ------------------------------------------------------------------ signals, shutdown
    def _on_stop_signal(self, signum: int) -> None:
        if self.draining:
            self.log.warning("second stop signal: closing everything now", signal=signal.Signals(signum).name)
            self._finish_shutdown()
            return
        self.log.info("stop signal: draining", signal=signal.Signals(signum).name, connections=len(self.sessions))
        self.shutdown()

    def _on_reload_signal(self, signum: int) -> None:
        reload = self.reload
        self.notifier.reloading()  # always paired with READY=1: Type=notify-reload waits for both
        if reload is None:
            self.log.info("SIGHUP: no configuration file to reload")
            self.notifier.ready(status=f"nothing to reload (no --config); {self.status_text()}")
            return
        try:
            config = reload()
            self.apply_config(config)
        except Exception as exc:
            self.log.error("reload failed; keeping the running configuration", error=str(exc),
                           key=getattr(exc, "key", None))
            self.notifier.ready(status=f"reload failed: {exc}; {self.status_text()}")
            return
        self.log.info("configuration reloaded", source=config.source,
                      routes=[f"{r.path} -> {r.plugin_name}" for r in self.router.routes], api=self.api is not None)
        self.notifier.ready(status=f"configuration reloaded; {self.status_text()}")

    def shutdown(self, grace: float | None = None) -> None:
        """Graceful shutdown: stop accepting, close 1001 everywhere, flush, exit within the grace period."""
        if self.draining:
            return
        self.draining = True
        self.notifier.send("STOPPING=1", status=self.status_text())
        for listener in self.listeners:
            self.loop.unregister(listener.sock)
            listener.sock.close()
        self.listeners = []
        for conn in list(self.connections.values()):
            conn.shutdown(CloseCode.GOING_AWAY, "server shutting down")
        self._flush_dirty()
        if not self.connections:
            self._finish_shutdown()
            return
        grace = self.config.timeouts.shutdown_grace if grace is None else grace
        self._grace_timer = self.loop.call_later(grace, self._grace_expired)

    def _grace_expired(self) -> None:
        self.log.warning("shutdown grace period over; closing the remaining connections",
                         remaining=len(self.connections))
        self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for conn in list(self.connections.values()):
            conn.shutdown_now()
        self.log.info("stopped", accepted=self.counters.accepted)
        self.loop.stop()

    # ------------------------------------------------------------------ periodic
    def status_text(self) -> str:
        """The ``STATUS=`` systemd shows: connections open and accepted so far (and whether draining)."""
        n = len(self.sessions)
        text = f"{n} connection{'' if n == 1 else 's'} open, {self.counters.accepted} accepted"
        return f"draining: {text}" if self.draining else text

    def _watchdog(self, interval: float) -> None:
        # The keep-alive also carries STATUS= when it changed: one datagram, and the status stays fresh.
        status = self.status_text()
        if status != self._status_sent:
            self._status_sent = status
            self.notifier.send("WATCHDOG=1", status=status)
        else:
            self.notifier.watchdog()
        self.loop.call_later(interval, lambda: self._watchdog(interval))

    def _status_tick(self) -> None:
        if self.notifier.enabled:
            status = self.status_text()
            if status != self._status_sent:
                self._status_sent = status
                self.notifier.status(status)
        self.loop.call_later(5.0, self._status_tick)


def _exclude_ids(exclude: Session | Iterable[Session] | None) -> frozenset[int]:
    if exclude is None:
        return frozenset()
    if not isinstance(exclude, Iterable):  # one session
        return frozenset((_local_id(exclude),))
    return frozenset(_local_id(s) for s in exclude)


def _local_id(session: Session) -> int:
    """The registry key of ``session``: its connection's number in this process (plugins see ``session.id``, the
    string ``<instance_id>.<n>`` unique across instances)."""
    conn = getattr(session, "_conn", None)
    return conn.id if conn is not None else -1


def _memory_broker(loop: EventLoop, deliver: Deliver, log: Any) -> Broker:
    return MemoryBroker(deliver)
