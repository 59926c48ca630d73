"""CONNECT tunnels end to end: splicing, early bytes, half-close, idle timeout,
maximum duration, concurrency, and what reloads do to open tunnels."""

import signal
import socket
import threading
import time

import pytest
import requests

from origins import EchoServer

TUNNEL = """
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
graceful_timeout: {graceful}
forward_proxy:
  allow_private: ["127.0.0.1/32"]
  connect_ports: ["1025-65535"]
tunnel: {{idle_timeout: {idle}{extra}}}
"""


def tconf(workers=1, graceful="30s", idle="60s", extra=""):
    return TUNNEL.format(workers=workers, graceful=graceful, idle=idle, extra=extra)


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.stop()


def open_tunnel(g, port, early=b"", timeout=20):
    s = socket.create_connection(("127.0.0.1", g.port), timeout=timeout)
    s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode() + early)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        assert data, f"proxy closed before answering CONNECT: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return s, rest


def recv_exactly(s, n, have=b""):
    buf = have
    while len(buf) < n:
        data = s.recv(min(65536, n - len(buf)))
        if not data:
            break
        buf += data
    return buf


def wait_closed(s, limit):
    """Seconds until the peer closed (EOF or reset), reading whatever comes."""
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def tunnel_records(g, n):
    return [r for r in g.access_records(n) if r["method"] == "CONNECT"]


def test_connect_splices_both_ways_with_early_bytes_and_half_close(gproxy, echo):
    g = gproxy(tconf())
    s, rest = open_tunnel(g, echo.port, early=b"early!")    # pipelined behind the head
    payload = bytes(range(256)) * 4096                          # 1 MiB
    sender = threading.Thread(target=s.sendall, args=(payload,))
    sender.start()
    got = recv_exactly(s, 6 + len(payload), rest)
    sender.join()
    assert got == b"early!" + payload, "echo differs"
    s.shutdown(socket.SHUT_WR)      # the half-close reaches the echo server, which closes
    assert wait_closed(s, 10) < 10
    s.close()
    rec, = tunnel_records(g, 1)
    n = 6 + len(payload)
    assert (rec["bytes_in"], rec["bytes_out"]) == (n, n), rec
    assert rec["status"] == 200 and rec["tunnel"]["end"] == "eof" and rec["error"] is None, rec


def test_idle_tunnel_is_closed_after_idle_timeout(gproxy, echo):
    g = gproxy(tconf(idle="1s"))
    s, _ = open_tunnel(g, echo.port)
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    waited = wait_closed(s, 15)
    assert 0.8 <= waited < 15, f"closed after {waited:.2f}s, want about 1s"
    rec, = tunnel_records(g, 1)
    assert rec["tunnel"]["end"] == "idle" and rec["error"] == "tunnel_idle", rec


def test_busy_tunnel_is_closed_at_max_duration(gproxy, echo):
    g = gproxy(tconf(idle="30s", extra=", max_duration: 1500ms"))
    s, _ = open_tunnel(g, echo.port)
    t0 = time.monotonic()
    s.settimeout(10)
    try:
        while time.monotonic() - t0 < 12:
            s.sendall(b"tick")
            if not s.recv(64):
                break
            time.sleep(0.1)
    except (ConnectionResetError, BrokenPipeError):
        pass
    elapsed = time.monotonic() - t0
    assert 1.3 <= elapsed < 12, f"cut after {elapsed:.2f}s, want about 1.5s"
    rec, = tunnel_records(g, 1)
    assert rec["tunnel"]["end"] == "max_duration", rec


def test_stalled_tunnel_does_not_block_other_requests_in_the_worker(gproxy, backends, echo):
    b, = backends(1)
    g = gproxy(tconf(workers=1))
    s, _ = open_tunnel(g, echo.port)
    # The client writes 32 MiB and reads nothing: the echo backs up and the
    # tunnel's greenlets block on full socket buffers.
    stall = threading.Thread(target=lambda: _send_quietly(s, b"z" * (32 << 20)), daemon=True)
    stall.start()
    time.sleep(0.5)
    session = requests.Session()
    session.trust_env = False
    t0 = time.monotonic()
    for i in range(20):
        r = session.get(f"{b.url}/n{i}", proxies={"http": g.url}, timeout=10)
        assert r.status_code == 200 and r.content == b"ok b1"
    assert time.monotonic() - t0 < 10
    assert stall.is_alive(), "the stalled tunnel should still be backed up"
    s.shutdown(socket.SHUT_RDWR)    # wakes the sending thread
    stall.join(10)
    s.close()


def _send_quietly(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass


def test_200_concurrent_tunnels_through_2_workers_all_echo(gproxy, echo):
    g = gproxy(tconf(workers=2))
    socks = []
    try:
        for i in range(200):
            socks.append(open_tunnel(g, echo.port, timeout=30)[0])
        for i, s in enumerate(socks):
            s.sendall(f"tunnel {i:03d} ".encode() * 100)
        for i, s in enumerate(socks):
            want = f"tunnel {i:03d} ".encode() * 100
            got = recv_exactly(s, len(want))
            assert got == want, f"tunnel {i}: got {got[:40]!r}..., want {want[:40]!r}..."
    finally:
        for s in socks:
            s.close()
    recs = tunnel_records(g, 200)
    assert len(recs) == 200 and all(r["bytes_in"] == r["bytes_out"] == 1100 for r in recs)


# --- reloads: what HUP and TERM do to open tunnels ---------------------------------

def _tunnel_alive(s):
    s.sendall(b"still there?")
    return recv_exactly(s, 12) == b"still there?"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_open_tunnel_is_drained_until_graceful_timeout(gproxy, echo, sig):
    g = gproxy(tconf(graceful="3s"))
    s, _ = open_tunnel(g, echo.port)
    assert _tunnel_alive(s)
    g.proc.send_signal(sig)
    t0 = time.monotonic()
    time.sleep(1)
    assert _tunnel_alive(s), "the tunnel must keep working while the worker drains"
    waited = 1 + wait_closed(s, 20)
    assert 2.5 <= waited < 10, f"cut {waited:.2f}s after the signal, want about graceful_timeout (3s)"
    if sig == signal.SIGTERM:
        g.proc.wait(10)
        assert time.monotonic() - t0 < 10
    else:
        s2, _ = open_tunnel(g, echo.port)      # the new workers serve tunnels
        assert _tunnel_alive(s2)
        s2.close()
