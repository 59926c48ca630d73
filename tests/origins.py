"""Origins for the forward-proxy and tunnel tests, all on 127.0.0.1:0:
an HTTPS server with a certificate made for the test (trustme), a TCP echo
server, and a WebSocket echo server (websockets)."""

import http.server
import socket
import ssl
import threading

import trustme
from websockets.sync.server import serve as ws_serve

from servers import pattern


class TlsOrigin:
    """HTTPS on 127.0.0.1 with a throwaway CA: /bytes/N, anything else "tls ok".
    ``ca_path`` is the CA to trust; ``received`` holds each request's headers."""

    def __init__(self, tmp_path):
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path = str(tmp_path / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.received = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                origin.received.append(list(self.headers.items()))
                parts = self.path.strip("/").split("/")
                body = pattern(int(parts[1])) if parts[0] == "bytes" else b"tls ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class EchoServer:
    """TCP echo; closes its side after the client's EOF. ``accepted`` counts
    connections, so a test can assert that nothing reached it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(s,), daemon=True).start()

    @staticmethod
    def _echo(s):
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            s.close()

    def stop(self):
        self.running = False
        self.sock.close()


class WsEcho:
    """A WebSocket echo server (the websockets library, threaded)."""

    def __init__(self, name="ws"):
        self.name = name
        self.connections = 0
        self.paths = []

        def echo(ws):
            self.connections += 1
            self.paths.append(ws.request.path)
            for message in ws:
                ws.send(message)

        self.server = ws_serve(echo, "127.0.0.1", 0, max_size=8 * 1024 * 1024)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def ask(port, data, timeout=10):
    """Send one request on a fresh connection and return the response, read
    to its end by Content-Length or the chunked terminator (gunicorn keeps
    the connection open unless the request's Connection is exactly "close")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                          for line in head.split(b"\r\n")[1:] if b":" in line}
                if b"content-length" in fields and len(body) >= int(fields[b"content-length"]):
                    return out
                if fields.get(b"transfer-encoding") == b"chunked" and body.endswith(b"0\r\n\r\n"):
                    return out
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
