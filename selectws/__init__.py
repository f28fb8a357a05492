"""selectws: a WebSocket server daemon on one ``selectors`` loop.

Layers, each in its own package:

* :mod:`selectws.protocol` -- the sans-I/O RFC 6455 / 7692 core: bytes in, events and bytes out.
* :mod:`selectws.server` -- the single-threaded ``selectors`` loop that moves bytes between sockets and the core.
* :mod:`selectws.plugins` -- the plugin API and the built-in plugins (echo, broadcast, chat).
* :mod:`selectws.brokers` -- what carries group messages (in memory today, Redis later).
* :mod:`selectws.ops` -- configuration, logging, CLI and service integration.
"""

__version__ = "0.1.0"
