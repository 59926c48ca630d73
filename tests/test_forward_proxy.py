"""The forward proxy end to end: curl -x, curl -p -x (CONNECT), requests with
proxies=, the ACLs and proxy authentication, against real gunicorn and real
origins on 127.0.0.1. Loopback origins are opened with allow_private, since
block_private_destinations refuses them by default."""

import base64
import hashlib
import os
import socket
import subprocess
import time

import pytest
import requests
from passlib.apache import HtpasswdFile
from passlib.hash import apr_md5_crypt

from gproxy import config
from origins import EchoServer, TlsOrigin, ask
from servers import Backend, GProxy, pattern, raw_request

OPEN_LOOPBACK = """  allow_private: ["127.0.0.1/32"]
  connect_ports: ["1025-65535"]
"""


def fconf(forward=OPEN_LOOPBACK, workers=1, top=""):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
{top}
forward_proxy:
  enabled: true
{forward}
"""


def curl(*args, timeout=30):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          timeout=timeout, env=env)


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tls_origin(tmp_path):
    o = TlsOrigin(tmp_path)
    yield o
    o.stop()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.stop()


def session():
    s = requests.Session()
    s.trust_env = False     # only the proxies= given here
    return s


# --- absolute-form -------------------------------------------------------------

def test_curl_x_plain_http_byte_exact(gproxy, backends, tmp_path):
    b, = backends(1)
    g = gproxy(fconf())
    out = tmp_path / "body"
    r = curl("-x", g.url, f"{b.url}/bytes/1048576?x=%2F", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sha(out.read_bytes()) == sha(pattern(1048576)), "body differs"
    got = b.received[0]
    assert got.target == "/bytes/1048576?x=%2F", f"got {got.target!r}, want origin-form"
    assert got.header("Host") == f"127.0.0.1:{b.port}"
    assert got.header("Via") and got.header("Via").startswith("1.1 "), got.headers
    names = {n.lower() for n, _ in got.headers}
    assert not names & {"proxy-connection", "proxy-authorization", "x-forwarded-for"}, names


def test_absolute_form_target_and_headers_transparent(gproxy, backends):
    b, = backends(1)
    g = gproxy(fconf())
    out = ask(g.port, (f"GET http://127.0.0.1:{b.port}/a%2fb;p?q=%7e&&z HTTP/1.1\r\n"
                               "Host: wrong.example\r\nX-Dup: one\r\nX-Dup: two\r\n"
                               "Proxy-Connection: keep-alive\r\nConnection: X-Hop\r\n"
                               "X-Hop: secret\r\n\r\n").encode())
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    got = b.received[0]
    assert got.target == "/a%2fb;p?q=%7e&&z", got.target
    assert got.header("Host") == f"127.0.0.1:{b.port}", "Host must be the target's authority"
    assert got.all("X-Dup") == ["one", "two"]
    assert got.header("X-Hop") is None and got.header("Proxy-Connection") is None
    assert b"\r\nVia: 1.1 " in out.split(b"\r\n\r\n")[0], "response Via missing"


def test_keepalive_connection_to_a_destination_is_reused(gproxy, backends):
    b, = backends(1)
    g = gproxy(fconf())
    s = session()
    for _ in range(3):
        r = s.get(f"{b.url}/x", proxies={"http": g.url}, timeout=10)
        assert r.status_code == 200
    assert len({r.conn_id for r in b.received}) == 1, "want one pooled upstream connection"


def test_idle_pools_bounded_over_many_destinations(gproxy, backends):
    bs = backends(8)
    g = gproxy(fconf(OPEN_LOOPBACK + "  pool: {max_destinations: 3, max_idle_per_destination: 1}\n"))
    s = session()
    for b in bs:
        assert s.get(f"{b.url}/x", proxies={"http": g.url}, timeout=10).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        held = sum(len(b.open_socks) for b in bs)
        if held <= 3:
            break
        time.sleep(0.05)
    assert held <= 3, f"got {held} idle upstream connections held, want at most 3"


def test_requests_proxies_http_and_https(gproxy, backends, tls_origin):
    b, = backends(1)
    g = gproxy(fconf())
    s = session()
    proxies = {"http": g.url, "https": g.url}
    r = s.get(f"{b.url}/bytes/100000", proxies=proxies, timeout=10)
    assert r.status_code == 200 and r.content == pattern(100000)
    r = s.get(f"https://127.0.0.1:{tls_origin.port}/bytes/300000", proxies=proxies,
              verify=tls_origin.ca_path, timeout=10)
    assert r.status_code == 200 and r.content == pattern(300000)
    assert [x["method"] for x in g.access_records(1)] == ["GET"], "the tunnel is still open"


def test_curl_p_x_connect_to_https_byte_exact(gproxy, tls_origin, tmp_path):
    g = gproxy(fconf())
    out = tmp_path / "body"
    r = curl("-p", "-x", g.url, "--cacert", tls_origin.ca_path,
             f"https://127.0.0.1:{tls_origin.port}/bytes/2000000", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sha(out.read_bytes()) == sha(pattern(2000000))
    rec = g.access_records(1)[-1]
    assert rec["method"] == "CONNECT" and rec["status"] == 200 and rec["tunnel"]["end"] == "eof", rec
    assert rec["bytes_out"] > 2000000 and rec["bytes_in"] > 0, rec


def test_built_in_default_is_a_loopback_only_forward_proxy():
    cfg = config.parse(config.DEFAULT_YAML, "<built-in>")
    fp = cfg.forward_proxy
    assert cfg.listen == ("127.0.0.1:8080",)
    assert fp.enabled and fp.block_private_destinations and fp.auth is None
    assert [str(n) for n in fp.allow_clients] == ["127.0.0.0/8", "::1/128"]
    assert fp.connect_ports == ((443, 443),)
    # and without the section no forward proxy at all
    assert not config.parse("workers: 1\n").forward_proxy.enabled


def test_default_forward_settings_serve_curl_x(gproxy, backends):
    """The built-in default's forward_proxy section, on a test port, plus
    the allow-list that opens this loopback origin."""
    b, = backends(1)
    text = config.DEFAULT_YAML.replace("${GPROXY_LISTEN:-127.0.0.1:8080}", "127.0.0.1:{port}")
    assert "{port}" in text, "the built-in default's listen line changed"
    text += '  allow_private: ["127.0.0.1/32"]\n'
    g = gproxy(text)
    r = curl("-x", g.url, f"{b.url}/hello")
    assert r.returncode == 0 and r.stdout == b"ok b1", (r.stdout, r.stderr)


# --- access control --------------------------------------------------------------

def refused(g, request, reason):
    seen = len(g.access_records(0))
    out = raw_request(g.port, request)
    assert out.startswith(b"HTTP/1.1 403"), out[:300]
    rec = g.access_records(seen + 1)[-1]
    assert rec["status"] == 403 and rec["error"] == reason, rec
    assert f"forward proxy refused {reason}" in g.stderr()
    return out


def get_via(url):
    return f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def connect_to(port, host="127.0.0.1"):
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def test_client_outside_allow_clients_is_refused(gproxy, backends, echo):
    b, = backends(1)
    g = gproxy(fconf(OPEN_LOOPBACK + '  allow_clients: ["10.0.0.0/8"]\n'))
    refused(g, get_via(f"{b.url}/x"), "client_denied")
    refused(g, connect_to(echo.port), "client_denied")
    assert b.received == [] and b.connections == 0 and echo.accepted == 0


def test_denied_host_and_allow_hosts(gproxy, backends):
    b, = backends(1)
    g = gproxy(fconf(OPEN_LOOPBACK + '  deny_hosts: ["*.blocked.test", "localhost"]\n'
                                     '  allow_hosts: ["127.0.0.*", "localhost", "*.blocked.test"]\n'))
    refused(g, get_via(f"http://localhost:{b.port}/x"), "denied_host")
    refused(g, get_via(f"http://LOCALHOST.:{b.port}/x"), "denied_host")
    refused(g, get_via(f"http://ads.blocked.test:{b.port}/x"), "denied_host")
    refused(g, get_via(f"http://127.1:{b.port}/x"), "denied_host")   # not in allow_hosts
    assert b.connections == 0
    out = raw_request(g.port, get_via(f"{b.url}/x"))
    assert out.startswith(b"HTTP/1.1 200") and b.connections == 1


def test_connect_port_outside_connect_ports_is_refused(gproxy, echo):
    g = gproxy(fconf('  allow_private: ["127.0.0.1/32"]\n'))    # connect_ports: default [443]
    refused(g, connect_to(echo.port), "denied_port")
    assert echo.accepted == 0


def test_http_port_outside_http_ports_is_refused(gproxy, backends):
    b, = backends(1)
    g = gproxy(fconf(OPEN_LOOPBACK + "  http_ports: [80]\n"))
    refused(g, get_via(f"{b.url}/x"), "denied_port")
    assert b.connections == 0


@pytest.fixture(scope="module")
def private_refusing(tmp_path_factory):
    """A forward proxy with the default block_private_destinations, a
    backend and an echo server, shared by the cases of one parametrized test."""
    b, e = Backend("b1"), EchoServer()
    g = GProxy(tmp_path_factory.mktemp("gp"), fconf('  connect_ports: ["1025-65535"]\n')).start()
    yield g, b, e
    g.stop()
    b.stop()
    e.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2", "[::ffff:127.0.0.1]",
                                  "2130706433"])
def test_private_destination_is_refused_by_default(private_refusing, host):
    g, b, echo = private_refusing
    refused(g, get_via(f"http://{host}:{b.port}/x"), "private_destination")
    refused(g, connect_to(echo.port, host), "private_destination")
    assert b.connections == 0 and echo.accepted == 0


def test_loop_to_the_proxy_itself_is_refused(gproxy, backends):
    b, = backends(1)
    g = gproxy(fconf())
    refused(g, get_via(f"http://127.0.0.1:{g.port}/x"), "loop")
    refused(g, connect_to(g.port), "loop")
    # Via: a request that already passed through this proxy (another address)
    s = session()
    r = s.get(f"{b.url}/x", proxies={"http": g.url}, timeout=10)
    via = b.received[0].header("Via")
    out = raw_request(g.port, (f"GET {b.url}/y HTTP/1.1\r\nHost: x\r\nVia: 1.0 other, {via}\r\n"
                               "Connection: close\r\n\r\n").encode())
    assert r.status_code == 200 and out.startswith(b"HTTP/1.1 403"), out[:200]
    assert [x.target for x in b.received] == ["/x"]


def test_forward_proxy_disabled_refuses_connect_and_routes_absolute_form(gproxy, backends, echo):
    """With the forward proxy off, CONNECT is refused and an absolute-form
    request is a reverse request for its authority (RFC 9112 3.2.2), never
    sent to the host it names."""
    b, other = backends(2)
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
upstreams:
  web: {{backends: ["{b.url}"]}}
routes: [{{upstream: web}}]
""")
    refused(g, connect_to(echo.port), "forward_disabled")
    out = raw_request(g.port, get_via(f"{other.url}/x"))
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert [r.target for r in b.received] == ["/x"]
    assert other.connections == 0 and echo.accepted == 0


@pytest.fixture(scope="module")
def open_forward(tmp_path_factory):
    """fconf()'s forward proxy, shared by the cases of one parametrized test."""
    g = GProxy(tmp_path_factory.mktemp("gp"), fconf()).start()
    yield g
    g.stop()


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x", "http://user:pw@127.0.0.1:1/x",
                                    "http://bad_host!:80/", "http://127.0.0.1:99999/"])
def test_malformed_forward_targets_are_400(open_forward, target):
    g = open_forward
    out = raw_request(g.port, get_via(target))
    assert out.startswith(b"HTTP/1.1 400"), out[:200]


# --- proxy authentication ------------------------------------------------------------

@pytest.fixture
def htpasswd(tmp_path):
    return write_htpasswd(tmp_path)


def write_htpasswd(directory):
    path = directory / "users.htpasswd"
    f = HtpasswdFile(str(path), new=True, default_scheme="bcrypt")
    f.set_password("alice", "wonder land")
    f.save()
    with open(path, "a") as fh:     # an Apache $apr1$ line, as htpasswd -m writes
        fh.write(f"bob:{apr_md5_crypt.hash('builder')}\n")
    return str(path)


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def auth_conf(htpasswd):
    return fconf(OPEN_LOOPBACK + f'  auth: {{htpasswd: "{htpasswd}", realm: "test realm"}}\n')


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory):
    """auth_conf's forward proxy and a backend, shared by the cases of one
    parametrized test."""
    b = Backend("b1")
    d = tmp_path_factory.mktemp("gp")
    g = GProxy(d, auth_conf(write_htpasswd(d))).start()
    yield g, b
    g.stop()
    b.stop()


@pytest.mark.parametrize("creds", [None, ("alice", "wrong"), ("nobody", "x"), ("alice", "")])
def test_missing_or_wrong_credentials_get_407(auth_proxy, creds):
    g, b = auth_proxy
    seen = len(g.access_records(0))
    extra = f"Proxy-Authorization: {basic(*creds)}\r\n" if creds else ""
    out = raw_request(g.port, (f"GET {b.url}/x HTTP/1.1\r\nHost: x\r\n{extra}"
                               "Connection: close\r\n\r\n").encode())
    head = out.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 407"), out[:300]
    assert b'\r\nProxy-Authenticate: Basic realm="test realm"' in head, head
    assert b.connections == 0
    assert g.access_records(seen + 1)[-1]["status"] == 407


def test_right_credentials_pass_and_are_never_forwarded(gproxy, backends, htpasswd, tls_origin,
                                                        tmp_path):
    b, = backends(1)
    g = gproxy(auth_conf(htpasswd))
    r = curl("-x", g.url, "-U", "alice:wonder land", f"{b.url}/hello")
    assert r.returncode == 0 and r.stdout == b"ok b1", (r.stdout, r.stderr)
    s = session()
    proxy = f"http://bob:builder@127.0.0.1:{g.port}"
    r2 = s.get(f"{b.url}/again", proxies={"http": proxy}, timeout=10)
    assert r2.status_code == 200
    r3 = s.get(f"https://127.0.0.1:{tls_origin.port}/x", proxies={"https": proxy},
               verify=tls_origin.ca_path, timeout=10)
    assert r3.status_code == 200 and r3.content == b"tls ok"
    for req in b.received:
        assert req.header("Proxy-Authorization") is None, req.headers
    for fields in tls_origin.received:
        assert "proxy-authorization" not in {n.lower() for n, _ in fields}


def test_connect_without_credentials_gets_407(gproxy, htpasswd, echo):
    g = gproxy(auth_conf(htpasswd))
    out = raw_request(g.port, connect_to(echo.port))
    assert out.startswith(b"HTTP/1.1 407") and b"Proxy-Authenticate: Basic" in out, out
    assert echo.accepted == 0


def test_407_keeps_the_connection_for_the_authenticated_retry(gproxy, backends, htpasswd):
    b, = backends(1)
    g = gproxy(auth_conf(htpasswd))
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
        s.sendall(f"GET {b.url}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 407"), first
        s.sendall(f"GET {b.url}/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: "
                  f"{basic('alice', 'wonder land')}\r\nConnection: close\r\n\r\n".encode())
        second = b""
        while not second.endswith(b"ok b1"):
            data = s.recv(65536)
            if not data:
                break
            second += data
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"ok b1"), second


def test_unreachable_origin_is_502_and_logged(gproxy):
    from servers import free_port
    port = free_port()
    g = gproxy(fconf())
    out = raw_request(g.port, get_via(f"http://127.0.0.1:{port}/x"))
    assert out.startswith(b"HTTP/1.1 502"), out[:200]
    rec = g.access_records(1)[-1]
    assert (rec["status"], rec["error"], rec["route"]) == (502, "connect_error", "forward")
    out = raw_request(g.port, connect_to(port), timeout=5)
    assert out.startswith(b"HTTP/1.1 502"), out[:200]
