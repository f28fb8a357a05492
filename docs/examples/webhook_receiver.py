"""A loopback webhook receiver for trying [[hooks]]: prints each event of each batch and whether the batch's
X-Selectws-Signature is valid (the check of docs/webhooks.md).

    python docs/examples/webhook_receiver.py SECRET_FILE [PORT]     (default port 18099, 127.0.0.1 only)
"""

import hashlib
import hmac
import http.server
import json
import sys

SECRET = open(sys.argv[1], "rb").read().strip()
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 18099


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        good = hmac.compare_digest(self.headers.get("X-Selectws-Signature", ""), expected)
        for event in json.loads(body)["events"]:
            print(f"batch signature {'valid' if good else 'INVALID'}:", json.dumps(event), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


http.server.HTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
