"""The HTTP/1.1 client (gproxy.h1) as transcripts, and the worker_class key."""


import pytest

from gproxy import config, h1
from gproxy.errors import ConfigError


def test_request_head_is_written_byte_exact_in_order():
    head = h1.request_head("GET", "/a%2fb?x=%7e", [("Host", "h"), ("X-Dup", "1"), ("A", "b"),
                                                   ("X-Dup", "2")], chunked=False)
    assert head == b"GET /a%2fb?x=%7e HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nA: b\r\nX-Dup: 2\r\n\r\n"
    head = h1.request_head("POST", "/", [("Host", "h")], chunked=True)
    assert head.endswith(b"Transfer-Encoding: chunked\r\n\r\n"), head


def test_response_head_keeps_repeats_and_rejects_junk():
    status, reason, version, fields = h1.parse_head(
        b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX:  v ")
    assert (status, reason, version) == (200, "Fine", "HTTP/1.1")
    assert fields == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X", "v")]
    for junk in (b"NOT HTTP AT ALL", b"HTTP/1.1 2000 OK", b"HTTP/1.1 200 OK\r\nno colon",
                 b"HTTP/1.1 200 OK\r\nA: 1\r\n folded"):
        with pytest.raises(h1.Invalid):
            h1.parse_head(junk)


@pytest.mark.parametrize("method, status, version, fields, want", [
    ("HEAD", 200, "HTTP/1.1", [("Content-Length", "9")], ("none", 0, True)),
    ("GET", 204, "HTTP/1.1", [], ("none", 0, True)),
    ("GET", 304, "HTTP/1.1", [("Connection", "close")], ("none", 0, False)),
    ("GET", 200, "HTTP/1.1", [("Content-Length", "5")], ("length", 5, True)),
    # both: Transfer-Encoding wins, and the connection is not reused (RFC 9112 6.3)
    ("GET", 200, "HTTP/1.1", [("Transfer-Encoding", "gzip, chunked"), ("Content-Length", "5")],
     ("chunked", None, False)),
    ("GET", 200, "HTTP/1.1", [("Transfer-Encoding", "chunked")], ("chunked", None, True)),
    ("GET", 200, "HTTP/1.1", [("Transfer-Encoding", "chunked, gzip")], ("close", None, False)),
    ("GET", 200, "HTTP/1.1", [], ("close", None, False)),
    ("GET", 200, "HTTP/1.0", [("Content-Length", "1")], ("length", 1, False)),
    ("GET", 200, "HTTP/1.0", [("Content-Length", "1"), ("Connection", "keep-alive")],
     ("length", 1, True)),
])
def test_response_framing_follows_rfc9112(method, status, version, fields, want):
    got = h1.framing(method, status, version, fields)
    assert got == want, f"got {got}, want {want}"


def test_conflicting_content_lengths_are_invalid():
    with pytest.raises(h1.Invalid):
        h1.framing("GET", 200, "HTTP/1.1", [("Content-Length", "5"), ("Content-Length", "6")])


class _FakeSock:
    """Hands out the given byte strings one recv at a time."""

    def __init__(self, *reads):
        self.reads = list(reads)

    def recv(self, n):
        return self.reads.pop(0) if self.reads else b""


def test_chunked_body_is_unframed_across_reads():
    c = h1.Conn(_FakeSock(b"5\r\nhel", b"lo\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"))
    pieces = list(h1.Body(c, 65536, lambda: None).chunked())
    assert b"".join(pieces) == b"hello world", pieces
    assert c.buf == b""


def test_short_length_body_raises_broken():
    c = h1.Conn(_FakeSock(b"abc"))
    with pytest.raises(h1.Broken):
        list(h1.Body(c, 65536, lambda: None).length(10))


def test_worker_class_key_is_checked():
    assert config.parse("workers: 2\n").worker_class == "gproxy"
    with pytest.raises(ConfigError, match=r":1: worker_class: expected one of gproxy, got 'gevent'"):
        config.parse("worker_class: gevent\n")
