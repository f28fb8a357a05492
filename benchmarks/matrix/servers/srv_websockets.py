"""python-websockets (asyncio implementation) peer server of the benchmark matrix: /echo, /sub, /pub.

Vendored from the project's perf harness (shared/perf/servers/srv_websockets.py). Started by
benchmarks/matrix/run.py with --peer-python, pinned to the server core. One change from the original:
permessage-deflate is left at the library's default (accepted when a client offers it, as selectws does); only the
churn point offers it, every other point negotiates no extension.
"""

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, broadcast, serve

SUBS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request else "/echo"
    if path == "/sub":
        SUBS.add(ws)
        try:
            await ws.wait_closed()
        finally:
            SUBS.discard(ws)
    elif path == "/pub":
        async for msg in ws:
            broadcast(SUBS, msg)
    else:
        async for msg in ws:
            await ws.send(msg)


async def main(a: argparse.Namespace) -> None:
    async with serve(handler, a.host, a.port, ping_interval=None, max_size=2**25, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (must be installed)")
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))
