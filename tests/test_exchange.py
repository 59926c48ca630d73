"""The one exchange and the one upstream client: the BackendSet interface,
and a regression test for each bug the four former client paths had.

Each regression test's docstring names the bug it pins."""

import inspect
import socket
import ssl

import pytest
import trustme

from gproxy import exchange, forward, proxy
from servers import Backend, raw_request


def test_upstream_state_and_destinations_implement_backend_set():
    """forward.Destinations.failed() drifted from UpstreamState.failed(): an
    origin breaking mid-body raised a TypeError. Both now implement the one
    declared interface, with its signatures."""
    for cls in (proxy.UpstreamState, forward.Destinations):
        assert issubclass(cls, exchange.BackendSet)
        for name, want in inspect.getmembers(exchange.BackendSet, inspect.isfunction):
            got = getattr(cls, name)
            assert inspect.signature(got) == inspect.signature(want), \
                f"{cls.__name__}.{name}{inspect.signature(got)}, want {inspect.signature(want)}"


def test_retry_rule():
    from gproxy import errors
    from gproxy.transport import BodySource
    started = BodySource(iter(()))
    started.started = True
    may = exchange.Attempt.may_retry
    assert may(errors.UpstreamConnectError(), None, False)          # never sent: any method
    assert may(errors.UpstreamConnectError(), BodySource(iter(())), False)
    assert not may(errors.UpstreamConnectError(), started, False)   # the body began to stream
    assert may(errors.UpstreamTimeout(), None, True)                # idempotent, no body
    assert not may(errors.UpstreamTimeout(), None, False)           # a POST that reached it
    assert not may(errors.BodyTooLarge(), None, True)               # not the backend's fault


def conf(url, extra=""):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
upstreams:
  u:
    backends: ["{url}"]
    retries: 0
{extra}
routes:
  - {{upstream: u}}
"""


def records(g, n=1):
    return g.access_records(at_least=n, timeout=10)


@pytest.fixture
def tls_backend(tmp_path):
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_path = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    b = Backend("tls", tls=ctx)
    yield b, ca_path
    b.stop()


def cl_beside_chunked(backend, req, conn):
    conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
    return True


def test_https_backend_content_length_beside_chunked_is_not_relayed(gproxy, tls_backend):
    """The fix "a Content-Length beside chunked framing is not relayed" reached
    only the plain-http client: through an https backend the client got
    Content-Length: 3 and a silently truncated body."""
    b, ca = tls_backend
    b.handler = cl_beside_chunked
    g = gproxy(conf(b.url, f"    tls: {{ca_file: {ca}}}"))
    out = raw_request(g.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out[:300]
    assert b"Content-Length: 3" not in head
    assert body == b"5\r\nhello\r\n0\r\n\r\n", body
    assert b.received[0].target == "/x"


def test_https_backend_certificate_is_verified(gproxy, tls_backend):
    """An https backend whose certificate no trusted CA signed is a 502."""
    b, _ = tls_backend
    g = gproxy(conf(b.url))
    out = raw_request(g.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502"), out[:200]
    assert records(g)[0]["error"] == "connect_error"


def test_https_backend_connections_are_pooled(gproxy, tls_backend):
    b, ca = tls_backend
    g = gproxy(conf(b.url, f"    tls: {{ca_file: {ca}}}"))
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
        for i in range(5):
            s.sendall(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
            out = b""
            while not (b"\r\n\r\n" in out and len(out.split(b"\r\n\r\n", 1)[1]) >= 100):
                out += s.recv(65536)
            assert out.startswith(b"HTTP/1.1 200")
    assert len(b.received) == 5 and b.connections == 1, f"{b.connections} connections for 5 requests"


def test_non_101_answer_to_an_upgrade_is_framed_strictly(gproxy, backends):
    """A non-101 answer to an Upgrade request went through its own reader
    (RawResponse), which relayed Content-Length: 3 beside chunked framing."""
    b, = backends(1)
    b.handler = cl_beside_chunked
    g = gproxy(conf(b.url))
    out = raw_request(g.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out[:300]
    assert b"Content-Length: 3" not in head and body == b"5\r\nhello\r\n0\r\n\r\n"
    assert b.received[0].header("Upgrade") == "websocket"


@pytest.mark.parametrize("cl", ["\u00b2", "+5", "5, 6", " 0x5"])
def test_non_ascii_or_signed_content_length_is_502_with_a_record(gproxy, backends, cl):
    """`Content-Length: ²` passed isdigit() and ended in a 500 with no
    access-log line; +5 and the like are not lengths on the wire either."""
    b, = backends(1)

    def answer(backend, req, conn):
        conn.sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\nhello".encode("utf-8"))
        return True
    b.handler = answer
    g = gproxy(conf(b.url))
    out = raw_request(g.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502"), out[:200]
    rec, = records(g)
    assert rec["status"] == 502 and rec["error"] == "invalid_response"


@pytest.mark.parametrize("size", [b"0x5", b"0_5", b"+5", b"5 5"])
def test_chunk_sizes_with_int_semantics_are_refused(gproxy, backends, size):
    """Chunk sizes 0x5, 0_5 and +5 were accepted (int() semantics), which is
    how response desync starts: the response is cut, never completed."""
    b, = backends(1)

    def answer(backend, req, conn):
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size
                          + b"\r\nhello\r\n0\r\n\r\n")
        return True
    b.handler = answer
    g = gproxy(conf(b.url))
    out = raw_request(g.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert not out.endswith(b"0\r\n\r\n"), f"a broken response was completed: {out!r}"
    assert b"hello" not in out
    rec, = records(g)
    assert rec["error"] == "reset", rec


def test_forward_proxy_origin_breaking_mid_body_is_an_upstream_failure(gproxy, backends):
    """Through the forward proxy an origin breaking mid-body raised a
    TypeError and was logged as 499 client_abort (the client blamed)."""
    b, = backends(1)
    g = gproxy("""
listen: ["127.0.0.1:{port}"]
workers: 1
forward_proxy: {enabled: true, block_private_destinations: false}
""")
    out = raw_request(g.port, f"GET {b.url}/cut/1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200")
    rec, = records(g)
    assert rec["status"] == 200 and rec["error"] == "reset", rec
    assert "TypeError" not in g.stderr()
    assert "upstream reset" in g.stderr()
