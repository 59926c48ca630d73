"""gproxy's one HTTP/1.1 client, for every upstream exchange: http and https
backends (TLS verified, with SNI), Upgrade requests (a 101 hands the
connection to the tunnel), the forward proxy's origins and the supervisor's
health checks. Pooled keep-alive connections, the request written
byte-exact in one ``sendall``, the response head parsed from one buffer, the
body framed by hand.

Why not urllib3/http.client: per proxied request they cost about 400 us of
CPU (an ``email`` header parser, a ``HTTPResponse`` with a dozen layers,
cookie and header dictionaries), more than everything else in gproxy
together (see bench/README.md). This module does only what a proxy needs.

Rules:
1. Bytes pass unchanged: the method, the target and every header field are
   written as given, in order, repeats kept; nothing is added except the
   framing (``Transfer-Encoding: chunked`` for a body of unknown length,
   ``Content-Length: 0`` for a body-less POST/PUT/PATCH, as urllib3 does).
2. A response is framed as RFC 9112 6.3 says: no body for HEAD, 1xx, 204
   and 304; chunked if the last transfer coding is chunked (the chunk
   framing is removed, gunicorn adds its own); else Content-Length; else
   until the backend closes. A body that ends early raises ``Broken``.
3. A connection goes back to the pool only after a complete response that
   did not ask to close it; an idle connection the backend has closed is
   noticed before it is used (one non-blocking ``MSG_PEEK``).
4. Failures are plain exceptions of this module (``ConnectFailed``,
   ``Stale``, ``Invalid``, ``Broken``) or ``socket.timeout``; the transport
   maps them to ProxyErrors.
5. The response is parsed strictly, never with ``int()`` or
   ``str.isdigit()`` semantics (``+5``, ``0x5``, ``5_0`` and ``\u00b2`` are
   not numbers on the wire): the head by llhttp (httptools' response parser:
   status ``HTTP/1.x NNN``, field names are tokens, no control bytes, an
   ASCII Content-Length, no obs-fold), the chunk sizes here (1-15 hex
   digits). Anything else is ``Invalid`` (a 502), which is where response
   desync would start (RFC 9112 6.3, 7.1). Measured (bench/README.md):
   llhttp parses a typical head in half the time of ASCII-exact regular
   expressions; the body stays a pull loop on the socket.
"""

import re
import socket
import time

import httptools

MAX_HEAD = 65536        # response head limit (nginx proxy_buffer_size is 4-8 KiB)
NO_BODY_STATUS = frozenset((204, 304))
BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))   # urllib3 sends Content-Length: 0
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class ConnectFailed(Exception):
    """The TCP connection could not be made (``__cause__`` says why)."""


class Stale(Exception):
    """The backend closed or reset the connection before any response byte."""


class Invalid(Exception):
    """The response head is not HTTP/1.x."""


class Broken(Exception):
    """The response body ended before its framing said it would."""


_DIGITS = re.compile(r"[0-9]{1,18}\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\Z")


class Conn:
    __slots__ = ("sock", "raw", "buf", "idle_since", "reused", "connect_time")

    def __init__(self, sock):
        self.sock = sock
        # the OS socket under gevent's cooperative one (under TLS, the TCP
        # socket: a TLS record waiting there, even a close_notify, retires
        # the connection), for the liveness peek
        self.raw = getattr(sock, "_sock", sock)
        self.buf = b""
        self.idle_since = 0.0
        self.reused = False
        self.connect_time = None

    def alive(self):
        try:
            self.raw.recv(1, _PEEK)
        except BlockingIOError:
            return True         # nothing to read: still open
        except OSError:
            return False
        return False            # closed by the backend, or bytes nobody asked for

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def detach(self):
        """(socket, bytes read past the response head): for a tunnel after
        a 101. The connection is no longer this module's."""
        sock, rest = self.sock, self.buf
        self.sock, self.buf = None, b""
        return sock, rest


class Pool:
    """Idle keep-alive connections to one backend, most recently used first.
    ``tls``: an ``ssl.SSLContext`` for an https backend (SNI is ``host``)."""

    def __init__(self, host, port, max_idle, idle_timeout, tls=None, server_name=None):
        self.addr = (host, port)
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle = []
        self.tls = tls
        self.server_name = server_name or host

    def get(self, connect_timeout, fresh=False):
        """A pooled connection that is still open, else a new one (always a
        new one with ``fresh``); ``connect_time`` is set on a new one."""
        now = time.monotonic()
        idle = self.idle
        while idle and not fresh:
            c = idle.pop()
            if now - c.idle_since < self.idle_timeout and c.alive():
                c.reused = True
                c.connect_time = None
                return c
            c.close()
        try:
            sock = socket.create_connection(self.addr, timeout=connect_timeout)
        except OSError as e:
            raise ConnectFailed(str(e)) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            except OSError as e:        # ssl.SSLError and certificate errors included
                sock.close()
                raise ConnectFailed(f"TLS handshake with {self.server_name}: {e}") from e
        c = Conn(sock)
        c.connect_time = time.monotonic() - now
        return c

    def put(self, c):
        if len(self.idle) < self.max_idle:
            c.idle_since = time.monotonic()
            self.idle.append(c)
        else:
            c.close()


def request_head(method, target, fields, chunked):
    """The request line and header block as bytes (latin-1, as gunicorn
    decoded them, so the bytes are the client's)."""
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in fields:
        parts += (name, ": ", value, "\r\n")
    if chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def send_all(sock, data):
    """``sock.sendall(data)``, one ``send`` when the kernel takes it all (the
    usual case): gevent's ``sendall`` asks the kernel for SO_SNDBUF on every
    call, a syscall per write."""
    n = sock.send(data)
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def send_body(sock, body, chunked):
    if chunked:
        for piece in body:
            send_all(sock, b"%x\r\n%b\r\n" % (len(piece), piece))
        send_all(sock, b"0\r\n\r\n")
    else:
        for piece in body:
            send_all(sock, piece)


def read_head(conn):
    """Read up to the end of the response head; return (status, reason,
    version, fields). Skips interim 1xx heads (not 101) as http.client does."""
    while True:
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        recv = conn.sock.recv
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise Invalid(f"response head longer than {MAX_HEAD} bytes")
            try:
                data = recv(65536)
            except (ConnectionResetError, BrokenPipeError) as e:
                if buf:
                    raise Broken(f"{type(e).__name__} in the response head") from e
                raise Stale(f"{type(e).__name__}: {e}") from e
            if not data:
                if buf:
                    raise Invalid("connection closed inside the response head")
                raise Stale("RemoteDisconnected: closed without a response")
            buf += data
            end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(data) - 3))
        head, conn.buf = buf[:end], buf[end + 4:]
        status, reason, version, fields = parse_head(head)
        if not 100 <= status < 200 or status == 101:
            return status, reason, version, fields
        # other 1xx (100 Continue, 103 Early Hints): interim, the final head follows


class _Head:
    """httptools callbacks collecting one response head."""
    __slots__ = ("fields", "reason")

    def __init__(self):
        self.fields = []
        self.reason = b""

    def on_header(self, name, value):
        self.fields.append((name, value))

    def on_status(self, reason):
        self.reason += reason


def parse_head(head):
    """(status, reason, version, fields) from the head's bytes (rule 5)."""
    h = _Head()
    parser = httptools.HttpResponseParser(h)
    # Content-Length beside Transfer-Encoding: parsed, then decided by
    # framing() (Transfer-Encoding wins, the connection is not reused)
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    try:
        parser.feed_data(head + b"\r\n\r\n")
    except httptools.HttpParserUpgrade:
        pass                        # a 101 head: the tunnel takes what follows
    except httptools.HttpParserError as e:
        raise Invalid(f"{e or type(e).__name__}: {head[:80]!r}") from None
    version = "HTTP/" + parser.get_http_version()
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise Invalid(f"bad status line {head[:80]!r}")
    fields = [(n.decode("latin-1"), v.decode("latin-1").rstrip(" \t")) for n, v in h.fields]
    return parser.get_status_code(), h.reason.decode("latin-1"), version, fields


def framing(method, status, version, fields):
    """("none"|"chunked"|"length"|"close", length, keep_alive)."""
    te = cl = None
    close = version == "HTTP/1.0"     # unless it says keep-alive
    for name, value in fields:
        n = name.lower()
        if n == "content-length":
            if not _DIGITS.match(value):
                raise Invalid(f"bad Content-Length {value[:40]!r}")
            if cl is not None and value != cl:
                raise Invalid("conflicting Content-Length fields")
            cl = value
        elif n == "transfer-encoding":
            te = value if te is None else f"{te}, {value}"
        elif n == "connection":
            v = value.lower()
            close = "close" in v or (close and "keep-alive" not in v)
    if method == "HEAD" or status < 200 or status in NO_BODY_STATUS:
        return "none", 0, not close
    if te is not None:
        if te.rsplit(",", 1)[-1].strip().lower() != "chunked":
            return "close", None, False
        # RFC 9112 6.3: with both, Transfer-Encoding wins and the connection
        # is not reused (a sign of smuggling)
        return "chunked", None, not close and cl is None
    if cl is not None:
        return "length", int(cl), not close
    return "close", None, False


class Body:
    """The response body of one connection as pieces of at most ``chunk``
    bytes, handed on as they arrive. ``tick`` runs before every read (the
    transport's deadline check)."""

    __slots__ = ("conn", "tick", "chunk")

    def __init__(self, conn, chunk, tick):
        self.conn, self.chunk, self.tick = conn, chunk, tick

    def length(self, n):
        conn = self.conn
        if conn.buf:
            piece, conn.buf = conn.buf[:n], conn.buf[n:]
            n -= len(piece)
            yield piece
        recv, chunk, tick = conn.sock.recv, self.chunk, self.tick
        while n > 0:
            tick()
            data = recv(chunk if n > chunk else n)
            if not data:
                raise Broken(f"IncompleteRead: {n} more bytes expected")
            n -= len(data)
            yield data

    def until_close(self):
        conn = self.conn
        if conn.buf:
            piece, conn.buf = conn.buf, b""
            yield piece
        recv, chunk, tick = conn.sock.recv, self.chunk, self.tick
        while True:
            tick()
            data = recv(chunk)
            if not data:
                return
            yield data

    def chunked(self):
        while True:
            line = self._line()
            m = _CHUNK_SIZE.match(line)
            if m is None:
                raise Broken(f"InvalidChunkLength: {line[:20]!r}")
            size = int(m.group(1), 16)
            if size == 0:
                while self._line():
                    pass            # trailers are dropped, as urllib3 does
                return
            while size > 0:
                piece = self._some(min(size, self.chunk))
                size -= len(piece)
                yield piece
            if self._exact(2) != b"\r\n":
                raise Broken("chunk data not followed by CRLF")

    def _fill(self):
        self.tick()
        data = self.conn.sock.recv(self.chunk)
        if not data:
            raise Broken("IncompleteRead: closed inside the chunked body")
        self.conn.buf += data

    def _line(self):
        conn = self.conn
        while True:
            i = conn.buf.find(b"\r\n")
            if i >= 0:
                line, conn.buf = conn.buf[:i], conn.buf[i + 2:]
                return line
            if len(conn.buf) > 4096:
                raise Broken("chunk size line too long")
            self._fill()

    def _some(self, n):
        conn = self.conn
        if not conn.buf:
            self._fill()
        piece, conn.buf = conn.buf[:n], conn.buf[n:]
        return piece

    def _exact(self, n):
        conn = self.conn
        while len(conn.buf) < n:
            self._fill()
        piece, conn.buf = conn.buf[:n], conn.buf[n:]
        return piece
