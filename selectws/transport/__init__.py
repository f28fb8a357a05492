"""Transport: the selectors event loop, its timers and signals, the non-blocking TLS step, buffered logging and
systemd's notify socket. A leaf above the protocol core: it knows sockets, not WebSocket."""
