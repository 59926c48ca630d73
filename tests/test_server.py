"""gproxy's HTTP/1.1 server side (gproxy/worker.py) over raw sockets.

Every refusal test also checks that nothing reached the backend: after a
request we cannot frame unambiguously, the bytes that follow it (here
always a well-formed ``GET /smuggled``) must never be read as a request.
"""

import os
import re
import signal
import socket
import time

import pytest

from servers import alive, wait_until, worker_serving


def conf(b, extra=""):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
access_log: {{format: json}}
upstreams:
  u: {{backends: ["{b.url}"], retries: 0}}
routes:
  - {{upstream: u}}
{extra}"""


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def exchange(port, data, timeout=20):
    """Send ``data``; return (every byte received, whether the proxy closed
    the connection within ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                d = s.recv(65536)
            except socket.timeout:
                return out, False
            except ConnectionResetError:
                return out, True
            if not d:
                return out, True
            out += d
        return out, False


def get_10_bytes(s, request):
    """Send ``request`` on the open socket ``s``; return the response to a
    /bytes/10 request, whole, leaving the connection open."""
    s.sendall(request)
    out = b""
    while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < 10:
        d = s.recv(65536)
        assert d, f"closed after {out!r}"
        out += d
    return out


def status_of(out):
    return int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else None


def statuses(out):
    """The status of every response in ``out`` (the tests' bodies never
    contain a status line)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]


@pytest.fixture
def front(gproxy, backends):
    b, = backends(1)
    return gproxy(conf(b)), b


# --- framing: RFC 9112 6.3 and 7, each a 400 (or 501) and a close -------------------

ATTACKS = {
    "content-length and transfer-encoding":
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "final coding not chunked":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "obfuscated coding xchunked":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "space before the colon":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "repeated transfer-encoding":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding on HTTP/1.0":
        b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "content-length +5": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "content-length list": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello",
    "content-length twice": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length above 2^63":
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775809\r\n\r\nhello",
    "content-length overflow":
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
    "chunk size 0x5":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size -5":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk size with a leading space":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    "overflowing chunk size":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "bare LF in a chunk line":
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "obs-fold": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "bare CR in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\n",
    "NUL in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "control byte in a value": b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n",
    "bare LF line ends": b"GET /a HTTP/1.1\nHost: x\n\n",
    "HTTP/1.1 without Host": b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two Host fields": b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "HTTP/0.9": b"GET /a\r\n\r\n",
}


@pytest.mark.parametrize("name", ATTACKS)
def test_ambiguous_framing_is_refused_and_nothing_follows_it_to_the_backend(front, name):
    g, b = front
    out, closed = exchange(g.port, ATTACKS[name] + SMUGGLED)
    assert status_of(out) in (400, 501), f"{name}: got {out[:120]!r}, want a 400"
    assert closed, f"{name}: the connection stayed open after the refusal"
    assert b"Connection: close" in out
    assert statuses(out) == [status_of(out)], f"{name}: more than one answer: {out!r}"
    time.sleep(0.05)
    assert [r.target for r in b.received] == [], f"{name}: the backend saw {b.received}"


def test_a_long_chunk_extension_is_framed_the_same_on_both_sides(front):
    """gunicorn answered 400 to a 16 KiB chunk extension but kept reading
    the bytes behind it as a new request. llhttp skips extensions as they
    stream: the request is one well-framed request (extension dropped) and
    what follows it is the next request, on both sides."""
    g, b = front
    out, closed = exchange(g.port, b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;"
                                   + b"e" * 16384 + b"\r\nhello\r\n0\r\n\r\n"
                                   + SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert statuses(out) == [200, 200] and closed
    assert [(r.target, r.body, r.chunked) for r in b.received] == [("/a", b"hello", True),
                                                                   ("/smuggled", b"", False)]
    assert b"eeee" not in b.received[0].head


def test_gzip_then_chunked_is_501_and_closed(front):
    """RFC 9112 6.1: a transfer coding we do not decode is refused (501)."""
    g, b = front
    out, closed = exchange(g.port, b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                                   b"\r\n\r\n0\r\n\r\n" + SMUGGLED)
    assert status_of(out) == 501 and closed
    assert b.received == []


def test_well_framed_requests_reach_the_backend_one_each(front):
    """The control case: pipelined chunked and sized requests, each seen once."""
    g, b = front
    data = (b"POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n0\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out, closed = exchange(g.port, data)
    assert statuses(out) == [200, 200, 200] and closed
    assert [(r.target, r.body) for r in b.received] == [("/one", b"hello"), ("/two", b"abc"),
                                                        ("/three", b"")]


# --- limits --------------------------------------------------------------------------

def test_request_line_up_to_8_kib_is_served_longer_is_414(front):
    g, b = front
    target = "/q?" + "a" * 8000
    out, _ = exchange(g.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status_of(out) == 200, out[:100]
    assert b.received[0].target == target
    out, closed = exchange(g.port, f"GET /q?{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + SMUGGLED)
    assert status_of(out) == 414 and closed
    assert len(b.received) == 1


def test_header_block_and_field_count_limits_are_431(front):
    g, b = front
    big = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))     # 70 KiB
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n" + SMUGGLED)
    assert status_of(out) == 431 and closed
    many = b"".join(b"X-F%d: v\r\n" % i for i in range(101))
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n" + SMUGGLED)
    assert status_of(out) == 431 and closed
    fine = b"".join(b"X-F%d: v\r\n" % i for i in range(98))       # 99 with Host, 100 with Connection
    out, _ = exchange(g.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fine + b"\r\n")
    assert status_of(out) == 200
    assert [r.target for r in b.received] == ["/ok"]


def test_limits_are_configurable(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "limits: {request_line: 1KB, header_fields: 5}"))
    out, _ = exchange(g.port, f"GET /{'a' * 1100} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(out) == 414
    out, _ = exchange(g.port, b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n")
    assert status_of(out) == 431


# --- transparency --------------------------------------------------------------------

def test_header_names_reach_the_backend_byte_exact_underscores_included(front):
    """gunicorn dropped X_Trace_Id (header_map) and re-cased every name."""
    g, b = front
    out, _ = exchange(g.port, b"GET /a HTTP/1.1\r\nhost: x\r\nX_Trace_Id: 7\r\nx-lower: 1\r\n"
                              b"MiXeD-CaSe: 2\r\nX-Dup: a\r\nX-Dup: b\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 200
    names = [n for n, _ in b.received[0].headers]
    assert names[:5] == ["Host", "X_Trace_Id", "x-lower", "MiXeD-CaSe", "X-Dup"], names
    assert b.received[0].all("X-Dup") == ["a", "b"]
    assert b.received[0].header("X_Trace_Id") == "7"


def test_absolute_form_on_a_reverse_route_is_routed_by_its_authority(gproxy, backends):
    """RFC 9112 3.2.2: absolute-form is accepted and its authority is the host."""
    b1, b2 = backends(2)
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
upstreams:
  one: {{backends: ["{b1.url}"]}}
  two: {{backends: ["{b2.url}"]}}
routes:
  - {{host: api.example.com, upstream: two}}
  - {{upstream: one}}
""")
    out, _ = exchange(g.port, b"GET http://api.example.com/x?y=1 HTTP/1.1\r\nHost: other\r\n"
                              b"Connection: close\r\n\r\n")
    assert status_of(out) == 200, out[:200]
    assert b1.received == []
    r, = b2.received
    assert r.target == "/x?y=1", f"got {r.target!r}, want the origin-form"
    assert r.header("Host") == "api.example.com"


# --- connection management -------------------------------------------------------------

def test_connection_close_among_other_options_closes(front):
    """A `close` option anywhere in Connection closes (RFC 9112 9.6); the
    stock worker kept `Connection: close, X-Foo` open."""
    g, b = front
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close, X-Foo\r\n\r\n",
                           timeout=10)     # the keep-alive timeout is 75 s
    assert status_of(out) == 200 and closed


def test_pipelined_requests_are_answered_in_order(front):
    g, b = front
    data = b"".join(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % s for s in (201, 202, 203))
    out, _ = exchange(g.port, data + b"GET /status/204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [201, 202, 203, 204]


def test_http10_keeps_alive_only_when_asked(front):
    g, b = front
    out, closed = exchange(g.port, b"GET /a HTTP/1.0\r\n\r\n")
    assert status_of(out) == 200 and closed
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        for _ in range(2):
            out = get_10_bytes(s, b"GET /bytes/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert b"Connection: keep-alive" in out, out


def test_unknown_length_is_chunked_for_11_and_close_delimited_for_10(gproxy, backends):
    b, = backends(1)

    def no_length(backend, req, conn):
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-close")
        conn.sock.close()
        return False
    b.handler = no_length
    g = gproxy(conf(b))
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in out and out.endswith(b"b\r\nuntil-close\r\n0\r\n\r\n"), out
    out, closed = exchange(g.port, b"GET /a HTTP/1.0\r\n\r\n")
    assert b"Transfer-Encoding" not in out and out.endswith(b"\r\n\r\nuntil-close") and closed


def test_server_and_date_are_ours(front):
    g, b = front
    out, _ = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = out.split(b"\r\n\r\n")[0].decode()
    assert "\r\nServer: gproxy/" in head and "\r\nDate: " in head


# --- Expect: 100-continue ---------------------------------------------------------------

def test_expect_100_continue_refused_before_the_body_is_sent(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b).replace("- {upstream: u}", "- {upstream: u, max_body: 1KB}"))
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        out = b""
        while b"\r\n\r\n" not in out:
            out += s.recv(65536)
        assert out.startswith(b"HTTP/1.1 413"), f"got {out[:60]!r}, want 413 before any 100"
        assert b"Connection: close" in out
    assert b.received == []


def test_expect_100_continue_sends_100_when_the_body_is_read(front):
    g, b = front
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        s.sendall(b"hello")
        out = b""
        while not out.endswith(b"hello"):
            out += s.recv(65536)
    assert out.startswith(b"HTTP/1.1 200")
    assert b.received[0].body == b"hello"
    assert b.received[0].header("Expect") is None


# --- timeouts ------------------------------------------------------------------------

def test_header_timeout_answers_408_and_closes(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "limits: {header_timeout: 1s}"))
    t0 = time.monotonic()
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\n")      # and nothing more
    took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408") and closed, out
    assert took > 0.9, f"closed after {took:.2f}s, before the 1s header timeout"
    assert b.received == []


def test_slow_header_bytes_do_not_extend_the_header_timeout(gproxy, backends):
    """Slowloris: a byte every 0.3 s must not keep a head open past the limit."""
    b, = backends(1)
    g = gproxy(conf(b, "limits: {header_timeout: 1s}"))
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /a HTTP/1.1\r\n")
        closed_at = None
        for _ in range(40):       # 12 s of trickling at most
            try:
                s.sendall(b"X")
            except OSError:
                closed_at = time.monotonic() - t0
                break
            s.settimeout(0.3)
            try:
                if s.recv(65536) == b"":
                    closed_at = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.monotonic() - t0
                break
    # closed well before the trickle ends: each byte did not restart the 1 s limit
    assert closed_at is not None and closed_at < 8, f"held for {closed_at}"


def test_body_timeout_ends_a_stalled_upload(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "limits: {body_timeout: 1s}"))
    out, closed = exchange(g.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
    assert closed
    assert status_of(out) == 408, out
    assert b.received == []     # the backend never saw a complete request


def test_idle_keepalive_connections_end_at_keepalive_timeout(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, "keepalive_timeout: 1s"))
    t0 = time.monotonic()
    out, closed = exchange(g.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(out) == [200] and closed
    assert time.monotonic() - t0 > 0.8


def test_normal_requests_are_served_while_slow_clients_hold_connections(gproxy, backends):
    """A scaled slowloris (bench/slowloris.py runs the full size): 300 slow
    connections trickling header bytes; new normal connections are answered
    at once and every slow one is gone by the header timeout."""
    b, = backends(1)
    g = gproxy(conf(b, "limits: {header_timeout: 2s}"))
    slow = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    t0 = time.monotonic()
    try:
        for _ in range(10):
            out, _ = exchange(g.port, b"GET /n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(out) == 200
        assert [r.target for r in b.received] == ["/n"] * 10

        def closed(s):
            s.settimeout(0.01)
            try:
                while s.recv(65536):
                    pass            # the 408
                return True
            except socket.timeout:
                return False
            except OSError:
                return True

        def all_closed():
            return all([closed(s) for s in slow])
        wait_until(lambda: time.monotonic() - t0 > 1.5 and all_closed(), 15, "slow connections closed")
    finally:
        for s in slow:
            s.close()


def test_a_parked_keepalive_connection_serves_its_next_request(front):
    """After PARK_AFTER (1 s) idle, a keep-alive connection gives up its
    greenlet; its next request wakes it and is served on the same socket."""
    g, b = front
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
        for i in range(2):
            out = get_10_bytes(s, b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200")
            if i == 0:
                time.sleep(1.5)         # idle: the connection is parked meanwhile
    assert len(b.received) == 2


def test_a_quit_that_lands_while_a_worker_boots_is_not_lost(gproxy, backends):
    """Between its fork and its own signal handlers a worker runs the
    arbiter's, inherited with the fork: a QUIT then (the arbiter's stop,
    or a reload's, racing a new worker's boot) must still stop it rather
    than wait out graceful_timeout and a SIGKILL."""
    b, = backends(1)
    g = gproxy(conf(b, "graceful_timeout: 60s"))
    before = set(g.worker_pids())
    os.kill(g.proc.pid, signal.SIGTTIN)         # the arbiter forks one more worker
    new, deadline = set(), time.monotonic() + 10
    while not new and time.monotonic() < deadline:
        new = set(g.worker_pids()) - before
    pid, = new
    os.kill(pid, signal.SIGQUIT)
    print("QUIT sent while the worker was", "serving" if worker_serving(pid) else "booting")
    wait_until(lambda: not alive(pid), 10, f"worker {pid} to honour the QUIT sent as it booted")
