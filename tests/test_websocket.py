"""WebSocket (Upgrade) pass-through on reverse routes, with a real WebSocket
client library and a real WebSocket echo backend."""

import os
import socket

import pytest
import websocket

from origins import WsEcho, ask


def wconf(*urls, balance="round_robin", extra=""):
    backends = ", ".join(f'"{u}"' for u in urls)
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
upstreams:
  ws:
    balance: {balance}
    backends: [{backends}]
routes:
  - upstream: ws
{extra}
"""


@pytest.fixture
def ws_backends():
    made = []

    def make(n=1):
        new = [WsEcho(f"ws{len(made) + i + 1}") for i in range(n)]
        made.extend(new)
        return new

    yield make
    for w in made:
        w.stop()


def ws_connect(g, path="/chat"):
    return websocket.create_connection(f"ws://127.0.0.1:{g.port}{path}", timeout=20,
                                       http_proxy_host=None, suppress_origin=True)


def test_text_binary_large_and_clean_close(gproxy, ws_backends):
    w, = ws_backends(1)
    g = gproxy(wconf(w.url))
    ws = ws_connect(g, "/chat?room=1")
    ws.send("hello ☃")
    assert ws.recv() == "hello ☃"
    blob = bytes(range(256)) * 16
    ws.send_binary(blob)
    assert ws.recv() == blob
    big = os.urandom(1 << 20)           # one 1 MiB message
    ws.send_binary(big)
    got = ws.recv()
    assert got == big, f"got {len(got)} bytes back, want the same 1 MiB"
    ws.close(status=1000)               # waits for the server's close frame
    assert ws.connected is False
    assert w.paths == ["/chat?room=1"]
    rec = [r for r in g.access_records(1) if r["status"] == 101]
    assert rec and rec[0]["tunnel"]["end"] == "eof" and rec[0]["bytes_out"] > (1 << 20), rec
    assert rec[0]["upstream"] == "ws" and rec[0]["backend"] == f"127.0.0.1:{w.port}"


def test_backend_is_chosen_by_the_route_policy(gproxy, ws_backends):
    ws = ws_backends(2)
    g = gproxy(wconf(*(w.url for w in ws)))
    conns = [ws_connect(g) for _ in range(4)]
    for i, c in enumerate(conns):
        c.send(f"m{i}")
        assert c.recv() == f"m{i}"
        c.close()
    assert [w.connections for w in ws] == [2, 2], "round robin over both backends"


def test_a_refused_backend_is_skipped(gproxy, ws_backends):
    w, = ws_backends(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    g = gproxy(wconf(dead, w.url))
    for _ in range(2):
        c = ws_connect(g)
        c.send("x")
        assert c.recv() == "x"
        c.close()
    assert w.connections == 2


def test_non_101_answer_is_relayed_as_a_normal_response(gproxy, backends):
    b, = backends(1)
    g = gproxy(wconf(b.url))
    out = ask(g.port, b"GET /bytes/5000 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) == 5000, f"got {len(body)} body bytes, want 5000"
    got = b.received[0]
    assert got.header("Upgrade") == "websocket" and got.header("Connection") == "Upgrade"
    assert got.header("Sec-WebSocket-Key") == "dGhlIHNhbXBsZSBub25jZQ=="


def test_chunked_non_101_answer_is_relayed(gproxy, backends):
    b, = backends(1)
    b.gate.set()
    g = gproxy(wconf(b.url))
    out = ask(g.port, b"GET /chunks/3/1000 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    assert b"A" * 1000 in body and b"C" * 1000 in body and body.endswith(b"0\r\n\r\n"), body[-20:]


def test_other_upgrade_protocols_are_not_passed_on(gproxy, backends):
    b, = backends(1)
    g = gproxy(wconf(b.url))
    out = ask(g.port, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\n"
                              b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    got = b.received[0]
    assert got.header("Upgrade") is None and got.header("Connection") is None, got.headers
