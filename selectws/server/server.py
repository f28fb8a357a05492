"""The server: listening sockets, the connection registry, groups and broadcast, shutdown.

It owns one :class:`EventLoop`. Everything runs on that loop's thread: accepting, reading, the plugins, timers and
signals. The registry is plain dicts keyed by connection id; groups are dicts of members in join order, so a
broadcast walks its members once and hands each the same encoded frame.
"""

from __future__ import annotations

import _socket
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

from selectws.config import Config, ConfigError, route_options_error, split_host_port
from selectws.protocol.broadcast import SharedFrame
from selectws.protocol.deflate import DeflateSettings
from selectws.protocol.errors import CloseCode
from selectws.protocol.events import Closed
from selectws.protocol.http11 import HttpLimits, build_response
from selectws.server.accept import OUT_OF_RESOURCES, AcceptGuard, ReserveRouter
from selectws.server.admin import AdminConsole
from selectws.server.api import Plugin, Session
from selectws.server.auth import JwtVerifier
from selectws.server.broker import Broker, BrokerFactory, Deliver, MemoryBroker
from selectws.server.connection import ServerConnection
from selectws.server.handshake import Admission
from selectws.server.health import ops_handlers
from selectws.server.history import HistoryPolicy, HistoryResult, Position, Recovery
from selectws.server.hooks import HookLoader, Hooks
from selectws.server.http_api import API_PREFIX, ServerApi
from selectws.server.opsview import OpsView
from selectws.server.options import OptionError
from selectws.server.presence import ClusterView, Member, check_info
from selectws.server.proxy import parse_networks
from selectws.server.refusals import RefusalSummary
from selectws.server.routing import Route, Router
from selectws.server.static import static_handler
from selectws.server.stats import Counters, ServerStats
from selectws.server.tls_connection import TlsServerConnection
from selectws.server.workerstats import WorkerSlot
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
        # accept() makes a socket.socket of each new descriptor; the call it makes for the descriptor
        # (_socket.socket._accept, the accept4() system call) is used here, and the connection's socket made of the
        # descriptor is a bare _socket.socket: 48 bytes against 96 with the subclass's slots and garbage collector
        # header (memory per connection), and one object less to make per accept. Elsewhere, accept() itself.
        self._accept: Callable[[], tuple[int, Any]] | None = getattr(sock, "_accept", None)
        self._kind = (sock.family, sock.type, sock.proto)  # what accept() gives its sockets: the listener's

    def handle_event(self, mask: int) -> None:
        server = self.server
        accept_fd = self._accept
        if accept_fd is None:
            accept = self.sock.accept
        family, kind, proto = self._kind
        raw = _socket.socket
        for _ in range(_ACCEPT_BATCH):
            try:
                if accept_fd is not None:
                    fd, addr = accept_fd()
                    conn = raw(family, kind, proto, fd)
                else:
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
        worker_stats: WorkerSlot | None = None,
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
        # The open WebSockets are the connections marked registered (ServerConnection.registered), and counted
        # here: no registry of their own (a dict entry per connection is memory per connection).
        self._open_count = 0
        self.groups: dict[str, dict[int, ServerConnection]] = {}
        # Presence (selectws/server/presence.py): the info each local member joined with (by group, then connection
        # id; only for members that have one), and what the other instances have (fed by the broker).
        self._info: dict[str, dict[int, dict[str, Any]]] = {}
        self.cluster = ClusterView()
        # Groups whose first local member joined while the others' members were not known yet (a broker shared by
        # instances): "occupied" waits until the broker heard them (presence_ready), the member that joined.
        self._occupied_pending: dict[str, ServerConnection] = {}
        # History (selectws/server/history.py): the routes that keep it, and which route owns a group (cached).
        self._history_routes: list[tuple[Plugin, HistoryPolicy]] = []
        self._owner_cache: dict[str, tuple[Plugin, HistoryPolicy] | None] = {}
        # Members joining with recovery (by group, then connection id): while their group's history is read, live
        # messages wait in the hold and go out after the replay; after it, the live messages the replay already
        # had are skipped, until the live stream passes the replay's last offset (see _Hold).
        self._held: dict[str, dict[int, _Hold]] = {}
        self._overrun_warned_at = float("-inf")
        self.broker: Broker = (broker or _memory_broker)(self.loop, self._deliver, self.log)
        self.broker.attach(self)
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
        self.refusals = RefusalSummary(self.loop, lambda: self.log)  # refused handshakes: a line per minute at most
        # Hardening: sockets still in the opening handshake, open WebSockets per client address (the address
        # after trusted_proxies), and the rate limit of the "too many pending handshakes" warning.
        self.handshaking: dict[int, ServerConnection] = {}
        self.per_ip: dict[str, int] = {}  # open WebSockets by address (conn.host, counted while registered)
        self._ip_names: dict[str, str] = {}  # the same keys: the one string of each address its connections share
        self._pending_refused_unlogged = 0
        self._pending_warned_at = float("-inf")
        self._shed_unlogged = 0  # connections dropped by the write buffer budget since its last warning
        self._shed_warned_at = float("-inf")
        # The operator figures (with workers: every worker's, through worker_stats) and the admin page.
        self.ops = OpsView(self.loop, self.stats, lambda: bool(self.listeners), lambda: self.groups, worker_stats,
                           lambda: self.log)
        self.admin = AdminConsole(self, self.ops, lambda: self.log)
        self.apply_config(config)
        self.loop.end_of_iteration.append(self._flush_dirty)
        self.loop.after_batch.append(self._flush_dirty)  # and after every BATCH reads of a long iteration
        self.loop.end_of_iteration.append(flush_logs)

    def stats(self) -> ServerStats:
        """The counters and gauges as they are now (for /metrics, /healthz and systemd's status)."""
        c = self.counters
        live = self.connections.values()
        by_route: dict[str, int] = {route.path: 0 for route in self.router.routes}
        for conn in live:
            route = conn.route
            if route is not None and conn.registered:
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
            handshake_failure_reasons=dict(c.handshake_failure_reasons),
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
            recoveries=dict(c.recoveries),
            remote_members=sum(len(m) for m in self.cluster.groups.values()),
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
        history_routes: list[tuple[Plugin, HistoryPolicy]] = []
        for i, rc in enumerate(config.routes):
            plugin_cls = self.find_plugin(rc.plugin)
            try:
                plugin: Plugin = plugin_cls(self, rc.options)
            except OptionError as exc:  # a config loaded without the plugin resolver: the same error as with it
                raise route_options_error(i, rc, exc) from exc
            if rc.history_size:
                if type(plugin).owns_group is Plugin.owns_group:
                    raise ConfigError(f"routes[{i}].history_size", f"plugin {rc.plugin!r} does not say which groups "
                                      "are its own (Plugin.owns_group), so no history can be kept for it")
                history_routes.append((plugin, HistoryPolicy(rc.history_size, rc.history_ttl)))
            compression = config.compression.enabled if rc.compression is None else rc.compression
            routes.append(Route(rc.path, plugin, rc.plugin, tuple(rc.subprotocols), compression,
                                frozenset(rc.origins), rc.subprotocol_required, **rc.rate_limit(config.limits),
                                auth=rc.auth))
        self.config = config
        self._history_routes = history_routes
        self._owner_cache = {}
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
        self._apply_ops(config, api_key)
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

    def _apply_ops(self, config: Config, api_key: str | None = None) -> None:
        """(Re)register /healthz, /readyz and /metrics: on the WebSocket router, or on the operator listener's, there
        with the admin page (``[ops] admin``, selectws/server/admin.py) when it is on."""
        handlers = ops_handlers(self.stats, config.ops, self.ops)
        if self._ops_listen is None:
            self._ops_listen = config.ops.listen
        elif config.ops.listen != self._ops_listen:
            self.log.warning("ops.listen changed; it takes effect on restart", running=self._ops_listen,
                             configured=config.ops.listen)
        for path in self._ops_paths:
            self.router.http.pop(path, None)
        if self._ops_listen:
            self.admin.configure(config.ops.admin, api_key)
            self.ops_router = Router(self.admin.routes(), {**handlers, **self.admin.http_handlers()})
            self.ops_router.body_handlers.update(self.admin.body_handlers())
            for listener in self.ops_listeners:  # a new router (its WebSocket routes are fixed when built)
                listener.router = self.ops_router
            self._ops_paths = []
        else:
            self.router.http.update(handlers)
            self._ops_paths = list(handlers)

    def _apply_api(self, config: Config, key: str | None) -> None:
        """(Re)register the server API (``POST /api/<method>``) where /healthz and /metrics are, or take it away
        when no key is configured."""
        self.api = ServerApi(self, key, config.limits.max_message_size, self.log) if key else None
        router = self.ops_router if self._ops_listen else self.router
        router.body_handlers.pop(API_PREFIX, None)  # the others (the admin login) are _apply_ops's
        if self.api is not None:
            router.body_handlers[API_PREFIX] = self.api

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
        self, sock: _socket.socket, addr: Any, router: Router | None = None
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

    def _refuse_pending(self, sock: _socket.socket, addr: Any) -> None:
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
            open_count=self._open_count, max_connections=self.max_connections, per_ip=self.per_ip,
            max_per_ip=self.max_connections_per_ip, draining=self.draining, deflate=self.deflate_settings,
            trusted_proxies=self.trusted_proxies, jwt=self.jwt, per_user=self.per_user,
            max_per_user=self.max_connections_per_user,
        )

    @property
    def sessions(self) -> dict[int, ServerConnection]:
        """The open WebSocket connections, by id (computed: the registry is the ``registered`` mark)."""
        return {conn_id: conn for conn_id, conn in self.connections.items() if conn.registered}

    def _register(self, conn: ServerConnection) -> None:
        """``conn`` is an open WebSocket: count it, and by its address (whose one string it shares from now on)."""
        conn.registered = True
        self._open_count += 1
        ip = conn.host
        count = self.per_ip.get(ip)
        if count is None:
            self.per_ip[ip] = 1
            self._ip_names[ip] = ip
        else:
            self.per_ip[ip] = count + 1
            conn.host = self._ip_names.get(ip, ip)

    def _unregister(self, conn: ServerConnection) -> bool:
        """Uncount ``conn`` (see :meth:`_register`); False if it was not counted (never, or already not)."""
        if not conn.registered:
            return False
        conn.registered = False
        self._open_count -= 1
        ip = conn.host
        left = self.per_ip.get(ip, 1) - 1
        if left:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
            self._ip_names.pop(ip, None)
        return True

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
        if conn.router is not None:  # the admin feed on the operator listener: the operator's, not a client
            return
        self._register(conn)
        self.handshaking.pop(conn.id, None)
        session = conn.session
        self.log.info(
            "open", conn=conn.id, peer=conn.host, port=conn.port, path=conn.path,
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
        if not self._unregister(conn):
            return
        self._uncount_user(conn)
        session = conn.session
        if session is not None:
            for group in list(session.groups):
                self.leave(session, group)
        codes = self.counters.close_codes
        codes[event.code] = codes.get(event.code, 0) + 1
        self.log.info(
            "close", conn=conn.id, peer=conn.host, path=conn.path, code=event.code,
            reason=event.reason, by_peer=event.by_peer, duration=round(self.loop.now - conn.opened_at, 3),
            bytes_in=conn.bytes_in, bytes_out=conn.bytes_out,
        )
        if self.hooks:
            self.hooks.close(conn, event.code, event.reason)

    def on_gone(self, conn: ServerConnection) -> None:
        """The socket of ``conn`` is closed: forget it."""
        self.handshaking.pop(conn.id, None)
        self._unregister(conn)  # normally done by on_closed already; never leaks either way
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
        return self._open_count

    # ------------------------------------------------------------------ ServerAPI for plugins
    def join(self, session: Session, group: str, *, info: dict[str, Any] | None = None,
             since: Position | None = None, then: Callable[[Recovery], None] | None = None) -> None:
        """Add ``session`` to ``group`` (see :meth:`ServerAPI.join`): ``info`` is its presence info; with ``then``,
        the group's position is read first (and with ``since`` what the session missed is replayed), live messages
        meanwhile wait, and ``then`` gets the :class:`Recovery` before they go out."""
        if "\x00" in group:
            raise ValueError("a group name cannot contain NUL")
        conn = self._open_conn(_local_id(session))
        if conn is None or conn.session is None:
            return
        details = check_info(info) if info is not None else None
        members = self.groups.get(group)
        if members is None:
            members = self.groups[group] = {}
            self.broker.subscribe(group)
        new = conn.id not in members
        if self.hooks and new:
            first = not members and group not in self.cluster.groups
            if first and self.broker.kind != "memory":  # the other instances may have members: ask first
                self._occupied_pending[group] = conn
                first = False
            self.hooks.join(conn, group, first=first)
        members[conn.id] = conn
        if details is not None:
            self._info.setdefault(group, {})[conn.id] = details
        own = conn.session
        if own._groups is None:
            own._groups = set()
        own._groups.add(group)
        if new or details is not None:
            self.broker.presence_join(group, self._member(conn, group))
        if then is None and since is None:
            return
        owner = self._owner(group)
        if owner is None:  # no history here: nothing to replay, no position
            if then is not None:
                self._call_plugin(conn, then, Recovery(None, None, None if since is None else False))
            return
        plugin, policy = owner
        self._held.setdefault(group, {})[conn.id] = _Hold()
        self.broker.history(group, policy, since.offset if since is not None else None, policy.size,
                            lambda result: self._recovered(conn, group, plugin, since, then, result))

    def _recovered(self, conn: ServerConnection, group: str, plugin: Plugin, since: Position | None,
                   then: Callable[[Recovery], None] | None, result: HistoryResult) -> None:
        """The history read of a join is in: replay what was missed, hand over the position, release what waited."""
        held_group = self._held.get(group)
        hold = held_group.pop(conn.id, None) if held_group is not None else None
        if held_group is not None and not held_group:
            del self._held[group]
        if conn.session is None or conn.id not in self.groups.get(group, {}):
            return  # closed, or left the group, meanwhile
        epoch = result.epoch
        last = result.offset
        recovered: bool | None = None
        missed = 0
        render = plugin.with_position
        if since is not None:
            recovered = result.error is None and since.epoch == epoch and result.complete_since(since.offset)
            counters = self.counters
            if recovered:
                counters.recoveries["ok"] += 1
                for offset, message in result.messages:
                    if offset > since.offset:
                        conn.send_message(render(group, message, offset, epoch))
                        missed += 1
                counters.messages_out += missed
            else:
                counters.recoveries["lost"] += 1
        if then is not None:
            self._call_plugin(conn, then, Recovery(epoch if result.error is None else "", last, recovered, missed,
                                                   result.error))
        if conn.session is None or conn.id not in self.groups.get(group, {}):
            return
        caught_up = result.error is not None
        for offset, message_epoch, message in hold.buffer if hold is not None else ():
            if not offset or offset > last or message_epoch != epoch:
                conn.send_message(render(group, message, offset, message_epoch) if offset else message)
                self.counters.messages_out += 1
                caught_up = caught_up or bool(offset)
        if not caught_up:  # live messages the read already had may still come: skip them (and only them)
            self._held.setdefault(group, {})[conn.id] = _Hold(last, epoch)

    def _hold_overrun(self, group: str, conn_id: int) -> None:
        """More live messages than :data:`HOLD_MAX` came while a member's history was read: memory stays bounded,
        the member is closed with 1013 (try again later) and reconnects; logged once per 10 s at most."""
        held = self._held.get(group)
        if held is not None:
            held.pop(conn_id, None)
            if not held:
                del self._held[group]
        conn = self.groups.get(group, {}).get(conn_id)
        if conn is None:
            return
        self.counters.recoveries["overrun"] = self.counters.recoveries.get("overrun", 0) + 1
        now = self.loop.now
        if now - self._overrun_warned_at >= 10.0:
            self._overrun_warned_at = now
            self.log.warning("recovery overrun: live messages outgrew the hold while the history was read; closing "
                             "with 1013", group=group, conn=conn_id, limit=HOLD_MAX)
        conn.close(CloseCode.TRY_AGAIN_LATER, "recovery overrun, reconnect")

    def _call_plugin(self, conn: ServerConnection, callback: Callable[[Recovery], None], recovery: Recovery) -> None:
        try:
            callback(recovery)
        except Exception:
            conn._plugin_error("join callback")

    def leave(self, session: Session, group: str) -> None:
        members = self.groups.get(group)
        if members is None:
            return
        conn = members.pop(_local_id(session), None)
        if conn is not None and conn.session is not None and conn.session._groups is not None:
            conn.session._groups.discard(group)
        held = self._held.get(group)
        if held is not None and conn is not None:
            held.pop(conn.id, None)
            if not held:
                del self._held[group]
        member = self._member(conn, group) if conn is not None else None
        info = self._info.get(group)
        if info is not None and conn is not None:
            info.pop(conn.id, None)
            if not info:
                del self._info[group]
        # The cluster's last member (as far as we know); not when "occupied" was never sent (still pending).
        last = not members and group not in self.cluster.groups and self._occupied_pending.pop(group, None) is None
        if member is not None:
            self.broker.presence_leave(group, member)
        if not members:
            del self.groups[group]
            self.broker.unsubscribe(group)
            self.cluster.forget(group)  # its deltas stop coming: the view would go stale
        if conn is not None and self.hooks:
            self.hooks.leave(conn, group, last=last)

    def members(self, group: str) -> list[Session]:
        return [conn.session for conn in self.groups.get(group, {}).values() if conn.session is not None]

    def _member(self, conn: ServerConnection, group: str) -> Member:
        session = conn.session
        info = self._info.get(group)
        return Member(f"{self.instance_id}.{conn.id}", self.instance_id, session.user if session is not None else None,
                      (info.get(conn.id) if info else None) or {})

    def presence(self, group: str) -> list[Member]:
        """Every member of ``group`` on every instance: this instance's, then the others' (as the broker last told
        us; exact for the groups this instance has members in)."""
        return self.local_presence(group) + self.cluster.members(group)

    def local_presence(self, group: str) -> list[Member]:
        return [self._member(conn, group) for conn in self.groups.get(group, {}).values()]

    def follows(self, group: str) -> bool:
        return group in self.groups

    def presence_query(self, group: str, callback: Callable[[list[Member]], None]) -> None:
        self.broker.presence_query(group, callback)

    def local_groups(self) -> list[str]:
        return list(self.groups)

    def presence_ready(self, group: str) -> None:
        """The broker heard the other instances' members of ``group`` (or gave up): send a pending "occupied"."""
        conn = self._occupied_pending.pop(group, None)
        members = self.groups.get(group)
        if conn is None or not members or group in self.cluster.groups or not self.hooks:
            return
        if conn.id not in members:
            conn = next(iter(members.values()))
        self.hooks.emit("occupied", conn, group=group)

    def local_count(self, group: str, exclude: frozenset[int]) -> int:
        """How many local members of ``group`` a message excluding ``exclude`` reaches."""
        members = self.groups.get(group)
        return sum(1 for conn_id in members if conn_id not in exclude) if members else 0

    def presence_gone(self, group: str, gone: list[Member]) -> None:
        """Members of another instance vanished from ``group`` (the instance died, or its snapshot no longer has
        them). One instance tells the plugins: the one with the smallest id among those that still have members in
        the group, so that the chat says ``left`` once, not once per instance."""
        members = self.groups.get(group)
        if not members or not gone:
            return
        if min(self.cluster.instances(group) | {self.instance_id}) != self.instance_id:
            return
        plugins: dict[int, Plugin] = {}
        for conn in members.values():
            if conn.route is not None:
                plugins.setdefault(id(conn.route.plugin), conn.route.plugin)
        for plugin in plugins.values():
            try:
                plugin.on_presence_gone(group, list(gone))
            except Exception:
                self.log.exception("plugin raised in on_presence_gone", group=group)
                self.counters.plugin_errors += 1

    def history(self, group: str, since: int | None, limit: int, callback: Callable[[HistoryResult], None]) -> None:
        """Read ``group``'s history (see :meth:`ServerAPI.history`); :class:`LookupError` when no route keeps it."""
        owner = self._owner(group)
        if owner is None:
            raise LookupError(f"no route keeps history for group {group!r}")
        policy = owner[1]
        self.broker.history(group, policy, since, max(1, min(limit, policy.size)), callback)

    def history_policy(self, group: str) -> HistoryPolicy | None:
        owner = self._owner(group)
        return owner[1] if owner is not None else None

    def _owner(self, group: str) -> tuple[Plugin, HistoryPolicy] | None:
        """The route (its plugin and history policy) whose groups include ``group``, when one keeps history."""
        cache = self._owner_cache
        try:
            return cache[group]
        except KeyError:
            pass
        found = None
        for plugin, policy in self._history_routes:
            if plugin.owns_group(group):
                found = (plugin, policy)
                break
        if len(cache) >= 10000:
            cache.clear()
        cache[group] = found
        return found

    def broadcast(self, group: str, message: str | bytes, exclude: Session | Iterable[Session] | None = None) -> int:
        routes = self._history_routes
        if routes:
            owner = self._owner(group)
            if owner is not None:
                return self.broker.publish(group, message, _exclude_ids(exclude), owner[1])
        return self.broker.publish(group, message, _exclude_ids(exclude))

    def _deliver(self, group: str, message: str | bytes, exclude: frozenset[int], offset: int = 0,
                 epoch: str = "") -> int:
        """Local delivery of a group message: each wire form is framed once, and the same bytes object is
        queued on every member that takes it (:class:`SharedFrame`). A message with an offset (history) is first
        put in the shape its route gives it (:meth:`Plugin.with_position`)."""
        members = self.groups.get(group)
        if not members:
            return 0
        if self._held:
            held = self._held.get(group)
            if held:  # members joining with recovery: see _Hold
                skip = []
                for conn_id, hold in list(held.items()):
                    if hold.floor is None:  # its history is being read: the message waits for the replay
                        if conn_id not in exclude:
                            if len(hold.buffer) >= HOLD_MAX:  # the read takes too long for this much traffic
                                self._hold_overrun(group, conn_id)
                            else:
                                hold.buffer.append((offset, epoch, message))
                        skip.append(conn_id)
                    elif offset and offset <= hold.floor and epoch == hold.epoch:
                        skip.append(conn_id)  # the replay had it
                    else:  # the live stream passed the replay: live from now on
                        del held[conn_id]
                if not held:
                    self._held.pop(group, None)
                if skip:
                    exclude = exclude.union(skip)
        if offset:
            owner = self._owner(group)
            if owner is not None:
                message = owner[0].with_position(group, message, offset, epoch)
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
        conn = self._open_conn(int(number))
        return conn.session if conn is not None else None

    def _open_conn(self, conn_id: int) -> ServerConnection | None:
        """The open WebSocket connection with this id (registered), if any."""
        conn = self.connections.get(conn_id)
        return conn if conn is not None and conn.registered else None

    def all_sessions(self) -> list[Session]:
        return [conn.session for conn in self.connections.values() if conn.registered and conn.session is not None]

    # ------------------------------------------------------------------ signals, shutdown
    def _on_stop_signal(self, signum: int) -> None:
        if self.draining:
            self.log.warning("second stop signal: closing everything now", signal=signal.Signals(signum).name)
            self._finish_shutdown()
            return
        self.log.info("stop signal: draining", signal=signal.Signals(signum).name, connections=self._open_count)
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
        n = self._open_count
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


#: Live messages a member joining with recovery may have waiting while its group's history is read (with Redis, one
#: round trip, at most [broker] health_timeout); past it the member is closed with 1013 and reconnects.
HOLD_MAX = 10_000


class _Hold:
    """A member joining with recovery. While its group's history is read (``floor`` None) the group's live messages
    wait in ``buffer`` as ``(offset, epoch, message)``. After the replay, the live stream may still bring messages the
    read already had (with Redis, the read's answer and the live messages come on two connections): ``floor`` is the
    read's last offset, and live messages at or below it are skipped until one above it arrives."""

    __slots__ = ("buffer", "epoch", "floor")

    def __init__(self, floor: int | None = None, epoch: str = "") -> None:
        self.floor = floor
        self.epoch = epoch
        self.buffer: list[tuple[int, str, str | bytes]] = []


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
    return MemoryBroker(deliver, lambda: loop.now)
