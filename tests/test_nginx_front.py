"""Real nginx from Debian terminating TLS in front of gproxy, with
ops/nginx-tls-front.conf as shipped (four values substituted) and a
certificate made for the test: HTTPS requests, the forwarding headers the
backend sees, a WebSocket through both, nginx's keep-alive connections to
gproxy, and HUP reloads of gproxy under load through nginx."""

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess

import pytest
import trustme
import websocket

from loadgen import Load
from origins import WsEcho
from servers import REPO, free_port, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    def __init__(self, tmp_path, gproxy_port):
        self.dir = tmp_path / "nginx"
        self.dir.mkdir()
        self.port = free_port()
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "cert.pem"))
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        front = open(os.path.join(REPO, "ops", "nginx-tls-front.conf")).read()
        for old, new in (("127.0.0.1:8080", f"127.0.0.1:{gproxy_port}"), ("listen 443 ssl", f"listen 127.0.0.1:{self.port} ssl"),
                         ("/etc/ssl/certs/gproxy.pem", str(self.dir / "cert.pem")),
                         ("/etc/ssl/private/gproxy.key", str(self.dir / "key.pem"))):
            assert old in front, old
            front = front.replace(old, new)
        (self.dir / "front.conf").write_text(front)
        d = self.dir
        (d / "nginx.conf").write_text(f"""\
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    include {d}/front.conf;
}}
""")
        self.proc = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=open(d / "stderr", "wb"))
        wait_until(lambda: self.accepts() or self.proc.poll() is not None, 10, "nginx to listen")
        assert self.proc.poll() is None, (d / "stderr").read_text() + (d / "error.log").read_text()
        self.ctx = ssl.create_default_context()
        self.ca.configure_trust(self.ctx)

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def https(self):
        return http.client.HTTPSConnection("localhost", self.port, context=self.ctx, timeout=10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)     # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nginx(tmp_path):
    made = []

    def start(gproxy_port):
        n = Nginx(tmp_path, gproxy_port)
        made.append(n)
        return n
    yield start
    for n in made:
        n.stop()


def front_conf(backend_url, admin, extra=""):
    return f"""\
listen: ["127.0.0.1:{{port}}"]
workers: 2
trusted_proxies: ["127.0.0.1/32"]
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  app: {{backends: ["{backend_url}"]}}
  ws: {{backends: ["WS"]}}
routes:
  - {{path_prefix: /ws/, upstream: ws}}
  - {{upstream: app}}
{extra}"""


@pytest.fixture
def stack(gproxy, backends, nginx):
    b = backends(1)[0]
    w = WsEcho()
    g = gproxy(front_conf(b.url, free_port()).replace("WS", w.url))
    n = nginx(g.port)
    yield g, b, w, n
    w.stop()


def established_from(port):
    """Remote ports of the established TCP connections to 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    out = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            p = line.split()
            if p[1] == want and p[3] == "01":
                out.add(int(p[2].split(":")[1], 16))
    return out


def test_https_through_nginx_with_the_forwarding_headers_the_backend_sees(stack):
    g, b, _, n = stack
    c = n.https()
    c.request("GET", "/hello?x=1", headers={"X-Forwarded-For": "198.51.100.7"})
    r = c.getresponse()
    assert r.status == 200 and r.read() == f"ok {b.name}".encode()
    got = b.received[-1]
    assert got.target == "/hello?x=1"
    assert got.header("X-Forwarded-Proto") == "https"
    assert got.header("X-Forwarded-Host") == "localhost"
    # nginx appended its peer (the client, 127.0.0.1); gproxy, trusting
    # nginx, appended nginx's address
    assert got.header("X-Forwarded-For") == "198.51.100.7, 127.0.0.1, 127.0.0.1"
    rec = g.access_records(1)[-1]
    assert rec["client"] == "198.51.100.7", rec      # the right-most untrusted address


def test_nginx_keeps_alive_its_connections_to_gproxy(stack):
    g, b, _, n = stack
    for _ in range(10):                 # a new client connection each time
        c = n.https()
        c.request("GET", "/a")
        assert c.getresponse().read()
        c.close()
    first = wait_until(lambda: established_from(g.port), 5, "nginx's idle connections to gproxy")
    for _ in range(10):
        c = n.https()
        c.request("GET", "/b")
        assert c.getresponse().read()
        c.close()
    assert established_from(g.port) == first        # the same connections, reused
    assert len(first) <= 2


def test_websocket_through_nginx(stack):
    g, _, w, n = stack
    sslopt = {"ca_certs": None, "context": n.ctx}
    ws = websocket.create_connection(f"wss://localhost:{n.port}/ws/chat", timeout=10,
                                     http_proxy_host=None, suppress_origin=True, sslopt=sslopt)
    ws.send("through nginx")
    assert ws.recv() == "through nginx"
    ws.send_binary(b"\x00" * 70000)
    assert ws.recv() == b"\x00" * 70000
    ws.close()
    assert w.paths[-1] == "/ws/chat"


def test_hup_reloads_of_gproxy_under_load_through_nginx_fail_nothing(stack, tmp_path):
    g, b, _, n = stack
    wait_until(lambda: g.cli("status").returncode == 0, 10, "the admin endpoint")
    load = Load(n.port, connect=n.https, max_seconds=60).start().progress(50)
    for _ in range(3):
        r = g.cli("reload")
        assert r.returncode == 0, r.stderr
        load.progress(100)
    load.stop()
    print(f"3 HUPs of gproxy through nginx: {load.summary()}")
    assert load.failures == [], load.summary()
    errors = (n.dir / "error.log").read_text()
    assert not re.search(r"\[(error|crit|alert|emerg)\]", errors), errors[-2000:]
