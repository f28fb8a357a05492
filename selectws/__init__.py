"""selectws: a WebSocket server daemon on one ``selectors`` loop.

Layers, each in its own package, importing only downward (``lint-imports`` checks it):

* :mod:`selectws.app` -- command line, workers supervisor, socket activation, the CLI client.
* :mod:`selectws.plugins` (plugin API for users, registry, built-ins) | :mod:`selectws.brokers` (Redis).
* :mod:`selectws.server` -- connections, routing, the plugin API, groups, health and metrics.
* :mod:`selectws.transport` -- the ``selectors`` loop and its timers, the TLS step, logging, sd_notify.
* :mod:`selectws.protocol` (the sans-I/O RFC 6455 / 7692 core: bytes in, events and bytes out) |
  :mod:`selectws.config` (the configuration schema and its validation: pure data).
"""

__version__ = "0.1.0"
