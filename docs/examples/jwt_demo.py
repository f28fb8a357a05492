"""Issue 14's "done when", against a running daemon with a JWT route (docs/auth.md):

    head -c 64 /dev/urandom | base64 -w0 > jwt.secret
    printf '[auth]\njwt_secret_file = "jwt.secret"\n[[routes]]\npath = "/echo"\nplugin = "echo"\nauth = "jwt"\n' > jwt.toml
    selectws serve -c jwt.toml --port 18931 &
    python docs/examples/jwt_demo.py 18931          (in the folder holding jwt.secret)

1. a token from `selectws gentoken` opens /echo with the websockets client; 2. a hand-tampered token is refused
with 403; 3. a token 2 s from expiry is closed with 3000 "token expired".
"""
import base64, json, subprocess, sys, time
from websockets.sync.client import connect
from websockets.exceptions import InvalidStatus, ConnectionClosed
port = sys.argv[1]
url = f"ws://127.0.0.1:{port}/echo"
# 1. gentoken -> /echo with the websockets client
token = subprocess.run([sys.executable, "-m", "selectws", "gentoken", "--sub", "42", "--name", "alice", "--ttl", "3600", "--secret-file", "jwt.secret"],
                       capture_output=True, text=True, check=True).stdout.strip()
print("gentoken:", token)
with connect(f"{url}?token={token}", proxy=None, open_timeout=5) as ws:
    ws.send("hello through a JWT route")
    print("1. echo:", ws.recv(timeout=5))
# 2. hand-tampered: payload sub 42 -> 1, signature kept
head, payload, sig = token.split(".")
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
claims["sub"] = "1"
forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), sig])
try:
    connect(f"{url}?token={forged}", proxy=None, open_timeout=5)
except InvalidStatus as exc:
    print("2. tampered:", exc.response.status_code, bytes(exc.response.body))
# 3. a token 2 s from expiry
short = subprocess.run([sys.executable, "-m", "selectws", "gentoken", "--sub", "42", "--ttl", "2", "--secret-file", "jwt.secret"],
                       capture_output=True, text=True, check=True).stdout.strip()
with connect(f"{url}?token={short}", proxy=None, open_timeout=5) as ws:
    t0 = time.monotonic()
    try:
        ws.recv(timeout=5)
    except ConnectionClosed as exc:
        print(f"3. closed after {time.monotonic() - t0:.2f} s: code {exc.rcvd.code} reason {exc.rcvd.reason!r}")
