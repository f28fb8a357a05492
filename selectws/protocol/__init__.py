"""Sans-I/O WebSocket protocol core: no sockets here, only bytes in and events and bytes out."""
