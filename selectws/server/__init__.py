"""The single-threaded selectors event loop and the glue between sockets and the protocol core."""
