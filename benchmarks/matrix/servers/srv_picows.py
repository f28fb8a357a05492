"""picows (Cython) peer server of the benchmark matrix, on uvloop: /echo, /sub, /pub.

Vendored from the project's perf harness (shared/perf/servers/srv_picows.py), behaviour unchanged. Started by
benchmarks/matrix/run.py with --peer-python, pinned to the server core. picows has no permessage-deflate, so in the
churn point its offers are declined.
"""

import argparse

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

SUBS = set()


def _close(t: WSTransport, f: WSFrame) -> None:
    t.send_close(f.get_close_code(), f.get_close_message())
    t.disconnect()


class Echo(WSListener):
    def on_ws_frame(self, t: WSTransport, f: WSFrame) -> None:
        if f.msg_type == WSMsgType.CLOSE:
            _close(t, f)
        elif f.msg_type in (WSMsgType.BINARY, WSMsgType.TEXT):
            t.send(f.msg_type, f.get_payload_as_memoryview())


class Sub(WSListener):
    def on_ws_connected(self, t: WSTransport) -> None:
        SUBS.add(t)

    def on_ws_disconnected(self, t: WSTransport) -> None:
        SUBS.discard(t)

    def on_ws_frame(self, t: WSTransport, f: WSFrame) -> None:
        if f.msg_type == WSMsgType.CLOSE:
            _close(t, f)


class Pub(WSListener):
    def on_ws_frame(self, t: WSTransport, f: WSFrame) -> None:
        if f.msg_type == WSMsgType.CLOSE:
            _close(t, f)
        elif f.msg_type in (WSMsgType.BINARY, WSMsgType.TEXT):
            data, mt = f.get_payload_as_bytes(), f.msg_type
            for s in SUBS:
                s.send(mt, data)


def factory(req):  # type: ignore[no-untyped-def]
    p = req.path
    return Sub() if p == b"/sub" else Pub() if p == b"/pub" else Echo()


async def main(a: argparse.Namespace) -> None:
    server = await ws_create_server(factory, a.host, a.port, max_frame_size=2**25, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    uvloop.run(main(p.parse_args()))
