"""A stand-in with vLLM's default posture (no API key, dev mode and profiler on, CORS `*`,
plain HTTP), for testing `bulwark audit`: every exposure the audit knows is present here."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROUTES = {}
for line in (ROOT / "engine/tests/data/posture-routes.txt").read_text().splitlines():
    if line and not line.startswith("#"):
        doc, _wire, path, _cat, _body = line.split()
        ROUTES[path] = doc


def normalize(path):
    # Like a lenient framework: collapse slashes, ignore case and a trailing slash, decode %6d.
    path = path.split("?")[0].replace("%6d", "m").replace("%2F", "/")
    while "//" in path:
        path = path.replace("//", "/")
    path = path.replace("/./", "/").lower()
    return path.rstrip("/") or "/"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body=None, extra=()):
        data = json.dumps(body if body is not None else {"ok": True}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        origin = self.headers.get("origin")
        if origin:
            self.send_header("access-control-allow-origin", origin)  # reflected, as many servers do
            self.send_header("access-control-allow-credentials", "true")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self, method):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        path = normalize(self.path)
        if path == "/version":
            return self.reply(200, {"version": "0.11.0"})
        if path == "/v1/embeddings":
            return self.reply(500, {"detail": "model does not support embeddings"})
        doc = ROUTES.get(path)
        if doc is None:
            return self.reply(404, {"detail": "Not Found"})
        if doc != method:
            return self.reply(405, {"detail": "Method Not Allowed"})
        return self.reply(200 if method == "GET" else 422, {"detail": "ok" if method == "GET" else "validation error"})

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_OPTIONS(self):
        self.reply(200, {}, [("access-control-allow-origin", "*"), ("access-control-allow-methods", "*"),
                             ("access-control-allow-headers", "*")])




def serve_tls_and_plaintext(port, certfile, keyfile):
    """One port that speaks TLS to TLS clients and plain HTTP to everyone else (a posture the
    audit must flag: plaintext answered on the TLS port)."""
    import socket
    import ssl
    import threading

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)

    def get_request():
        conn, addr = srv.socket.accept()
        first = conn.recv(1, socket.MSG_PEEK)
        if first == b"\x16":  # a TLS ClientHello
            conn = ctx.wrap_socket(conn, server_side=True)
        return conn, addr

    srv.get_request = get_request
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


if __name__ == "__main__":
    if len(sys.argv) > 3:  # PORT CERT KEY: TLS and plaintext on one port
        import threading
        serve_tls_and_plaintext(int(sys.argv[1]), sys.argv[2], sys.argv[3])
        threading.Event().wait()
    else:
        ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
