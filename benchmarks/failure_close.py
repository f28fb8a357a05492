"""Measure: 5 MiB random binary to /echo (max_message_size 1 MiB) -> close code / wasClean, 12 tries each client.
Usage: PYTHONPATH=<tree> python measure.py [chromium|aiohttp|websockets|wsclient ...]"""
import asyncio, os, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, os.environ.get("CONFTEST_DIR", str(Path(__file__).resolve().parent.parent / "tests" / "integration")))
from conftest import Daemon  # noqa
import selectws; print("selectws from", selectws.__file__)

N = int(os.environ.get('N', 12))
SIZE = 5 * 1024 * 1024
JS = """async ([url, size, n]) => {
  const out = [];
  for (let t = 0; t < n; t++) {
    const buf = new Uint8Array(size);
    for (let o = 0; o < size; o += 65536) crypto.getRandomValues(buf.subarray(o, Math.min(o + 65536, size)));
    const r = await new Promise((resolve) => {
      const ws = new WebSocket(url); ws.binaryType = "arraybuffer";
      const timer = setTimeout(() => resolve({code: -1, wasClean: null}), 15000);
      ws.onopen = () => ws.send(buf);
      ws.onclose = (e) => { clearTimeout(timer); resolve({code: e.code, wasClean: e.wasClean, ba: ws.bufferedAmount}); };
    });
    out.push(r);
  }
  return out;
}"""

def chromium(url):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless=new","--no-sandbox","--disable-gpu"])
        page = b.new_page()
        res = page.evaluate(JS, [url, SIZE, N])
        b.close()
    return [(r["code"], r["wasClean"], r.get("ba")) for r in res]

def aiohttp_(url):
    import aiohttp
    async def one():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(url, max_msg_size=0) as ws:
                await ws.send_bytes(os.urandom(SIZE))
                msg = await asyncio.wait_for(ws.receive(), 10)
                return (ws.close_code, str(msg.type))
    return [asyncio.run(one()) for _ in range(N)]

def websockets_(url):
    from websockets.sync.client import connect
    from websockets.exceptions import ConnectionClosed
    out = []
    for _ in range(N):
        with connect(url, max_size=None, open_timeout=5, close_timeout=5) as ws:
            try:
                ws.send(os.urandom(SIZE)); ws.recv(timeout=10)
            except ConnectionClosed as e:
                pass
            rcvd = ws.protocol.close_rcvd
            out.append((rcvd.code if rcvd else None, type(ws.protocol.close_exc).__name__))
    return out

def wsclient(url):
    import websocket
    out = []
    for _ in range(N):
        ws = websocket.create_connection(url, timeout=10)
        try:
            ws.send_binary(os.urandom(SIZE))
            op, data = ws.recv_data(control_frame=True)
            out.append((op, int.from_bytes(data[:2], "big") if len(data) >= 2 else data))
        except Exception as e:
            out.append(("exc", repr(e)[:80]))
        finally:
            ws.close()
    return out

if __name__ == "__main__":
    if os.environ.get("URL"):
        class _D:
            def url(self, p): return os.environ["URL"] + p
            def terminate(self): pass
            def errors(self): return []
        d = _D()
    else:
        tmp = Path(tempfile.mkdtemp())
        d = Daemon(Path(os.environ['CFG']) if os.environ.get('CFG') else None, cwd=tmp)
    try:
        for name in sys.argv[1:] or ["chromium", "aiohttp", "websockets", "wsclient"]:
            t = time.monotonic()
            fn = {"chromium": chromium, "aiohttp": aiohttp_, "websockets": websockets_, "wsclient": wsclient}[name]
            res = fn(d.url("/echo"))
            print(name, f"{time.monotonic()-t:.1f}s", res, flush=True)
            if name == "chromium":
                print("clean 1009:", sum(1 for c, w, *_ in res if c == 1009 and w is True), "/", N)
    finally:
        d.terminate()
        errs = d.errors()
        print("daemon errors:", errs[:3])
