"""A command-line WebSocket client (``selectws connect URL``) on selectws's own sans-I/O core, in the client role.

See :mod:`selectws.client.connect`.
"""
