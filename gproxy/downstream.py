"""The client side of a request, as the handlers see it: the one contract
between gproxy's server (``worker``) and its application.

The handlers build their ``Exchange`` from the WSGI environ; everything
below them takes a ``Request`` (``request(environ)``), never the environ.

Rules:
1. Raw header fields: ``Request.fields`` is every field as received, a list
   of (name, value) latin-1 strings, name case kept, repeats in order.
   ``Request.target`` is the request target as sent (RAW_URI).
2. Body pieces: ``Request.body()`` yields the body as it arrives (chunk
   framing removed), never waiting to fill a buffer; ``Expect:
   100-continue`` is answered on the first read, so a request refused before
   reading never has its body sent. Broken framing raises ``BadRequest``
   (the server then answers 400 and closes), the client going away
   ``ClientAbort``, the body timeout ``RequestTimeout``.
3. Taking over the socket: ``Request.take_over()`` returns (socket, bytes
   already read behind the head); the server then writes nothing for this
   request and closes the socket when the handler returns (CONNECT,
   WebSocket). The handler returns ``HANDLED``.
4. Responses go through ``start_response`` with every header passed as
   given (``Proxy-Authenticate`` and the like included); the server adds
   ``Server``, ``Date`` and the framing (see ``worker``).
5. The local address: ``Request.local_address()``.
"""

import collections
import socket
import sys
from dataclasses import dataclass

from . import errors

HANDLED = ()     # what a handler returns after take_over()


class Refused(Exception):
    """What the server refuses to read further: (status, why). The server
    answers it and closes the connection."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one client may send; defaults as nginx (config ``limits``)."""
    request_line: int = 8192        # large_client_header_buffers 4 8k -> 414
    header_block: int = 65536       # 4 x 8k buffers is nginx's 32 KiB; we allow 64 KiB -> 431
    header_fields: int = 100        # gunicorn limit_request_fields, Apache LimitRequestFields
    header_timeout: float = 60.0    # client_header_timeout -> 408
    body_timeout: float = 60.0      # client_body_timeout, between reads
    keepalive: float = 75.0         # keepalive_timeout

    @classmethod
    def of(cls, config):
        if config is None:
            return cls()
        lim = config.limits
        return cls(request_line=lim.request_line, header_block=lim.header_block,
                   header_fields=lim.header_fields, header_timeout=lim.header_timeout,
                   body_timeout=lim.body_timeout, keepalive=config.keepalive_timeout)


BASE_ENVIRON = {
    "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
    "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    "SCRIPT_NAME": "",
}


class Request:
    """One request read by the server (see the rules above)."""

    __slots__ = ("conn", "target_bytes", "raw_fields", "pieces", "complete", "head_done",
                 "method", "target", "version", "fields", "chunked", "content_length",
                 "keep_alive", "expect_continue", "upgrade", "taken", "hosts", "tes",
                 "_environ")

    def __init__(self, conn):
        self.conn = conn
        self.target_bytes = b""
        self.raw_fields = []
        self.pieces = collections.deque()
        self.complete = False
        self.head_done = False
        self.taken = False
        self._environ = None

    # -- the head (called by the server's parser) -------------------------------

    def finish_head(self, parser):
        self.head_done = True
        self.method = parser.get_method().decode("latin-1")
        self.version = "HTTP/" + parser.get_http_version()
        self.target = self.target_bytes.decode("latin-1")
        self.upgrade = parser.should_upgrade()
        fields = self.fields = []
        hosts = tes = 0
        cl = None
        conn_tokens = ""
        expect = False
        for name, value in self.raw_fields:
            # llhttp keeps trailing whitespace; it is not part of the value
            n, v = name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")
            fields.append((n, v))
            low = n.lower()
            if low == "host":
                hosts += 1
            elif low == "transfer-encoding":
                tes += 1
            elif low == "content-length":
                cl = v
            elif low == "connection":
                conn_tokens += "," + v.lower()
            elif low == "expect":
                expect = v.lower() == "100-continue"
        self.hosts, self.tes = hosts, tes
        self.chunked = tes > 0
        self.content_length = int(cl) if cl is not None else None
        tokens = {t.strip() for t in conn_tokens.split(",")} if conn_tokens else ()
        if self.version == "HTTP/1.1":
            self.keep_alive = "close" not in tokens            # RFC 9112 9.3
        else:
            self.keep_alive = "keep-alive" in tokens and "close" not in tokens
        self.expect_continue = expect and self.version == "HTTP/1.1"
        if self.content_length == 0 or (self.content_length is None and not self.chunked):
            self.expect_continue = False

    def framing_error(self):
        """(status, why) when the head cannot be served, else None."""
        if self.version not in ("HTTP/1.1", "HTTP/1.0"):
            return (505, f"{self.version} is not supported") if self.version >= "HTTP/2" \
                else (400, f"{self.version} is not supported")
        if self.hosts > 1:
            return 400, "more than one Host field"          # RFC 9112 3.2
        if self.hosts == 0 and self.version == "HTTP/1.1":
            return 400, "HTTP/1.1 request without Host"     # RFC 9112 3.2
        if self.tes:
            if self.version == "HTTP/1.0":
                return 400, "Transfer-Encoding in an HTTP/1.0 request"   # RFC 9112 6.1
            te = next(v for n, v in self.fields if n.lower() == "transfer-encoding")
            if te.strip().lower() != "chunked":
                return 501, f"transfer coding {te!r} is not supported"   # RFC 9112 6.1
        if self.content_length is not None and self.content_length > (2**63 - 1):
            return 400, "Content-Length too large"
        if self.upgrade and self.method != "CONNECT" and (self.chunked or self.content_length):
            return 400, "an Upgrade request with a body"
        return None

    # -- what the handlers use ---------------------------------------------------

    def body(self):
        """The body, piece by piece as it arrives (rule 2)."""
        conn, pieces = self.conn, self.pieces
        if self.expect_continue:
            self.expect_continue = False
            if not self.complete:
                conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            while True:
                while pieces:
                    yield pieces.popleft()
                if not conn.read_body(self):
                    if pieces:
                        continue
                    return
        except (socket.timeout, TimeoutError) as e:
            raise errors.RequestTimeout("client body timeout") from e
        except OSError as e:
            raise errors.ClientAbort(f"request body: {e.strerror or e}") from e
        except Refused as e:
            raise errors.BadRequest(f"request body: {e}") from e

    def has_body(self):
        return self.chunked or bool(self.content_length)

    def take_over(self):
        """(socket, bytes already read behind the head); see rule 3."""
        self.taken = True
        conn = self.conn
        early = conn.rest + b"".join(self.pieces)
        conn.rest = b""
        self.pieces.clear()
        return conn.sock, early

    def local_address(self):
        try:
            return self.conn.sock.getsockname()
        except OSError:
            return None

    @property
    def client(self):
        addr = self.conn.addr
        return addr[0] if isinstance(addr, tuple) and addr else "-"

    def environ(self):
        """The PEP 3333 environ (built once)."""
        env = self._environ
        if env is not None:
            return env
        conn = self.conn
        base = conn.environ_base
        if base is None:
            base = conn.environ_base = _connection_environ(conn)
        env = self._environ = base.copy()
        target = self.target
        path, _, query = target.partition("?")
        if not path.startswith("/") and "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]   # absolute-form
        env["REQUEST_METHOD"] = self.method
        env["RAW_URI"] = target
        env["PATH_INFO"] = _decode_path(path)
        env["QUERY_STRING"] = query
        env["SERVER_PROTOCOL"] = self.version
        for name, value in self.fields:
            if "_" in name:
                continue        # HTTP_X_A would be both X-A and X_A: rule 3 of worker
            key = name.upper().replace("-", "_")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                env[key] = value
                continue
            key = "HTTP_" + key
            old = env.get(key)
            env[key] = value if old is None else old + ("; " if key == "HTTP_COOKIE" else ", ") + value
        env["wsgi.input"] = Input(self)
        env["wsgi.input_terminated"] = True
        env["gproxy.downstream"] = self
        return env


def _connection_environ(conn):
    """What every request's environ on one connection starts with (kept by
    the server's Connection, copied per request)."""
    env = BASE_ENVIRON.copy()
    server = conn.server
    if isinstance(server, tuple):
        env["SERVER_NAME"], env["SERVER_PORT"] = str(server[0]), str(server[1])
    else:
        env["SERVER_NAME"], env["SERVER_PORT"] = str(server), ""
    addr = conn.addr
    if isinstance(addr, tuple):
        env["REMOTE_ADDR"], env["REMOTE_PORT"] = addr[0], str(addr[1])
    else:
        env["REMOTE_ADDR"] = "-"
    return env


class Input:
    """``wsgi.input`` over ``Request.body()``, for WSGI code that reads."""

    __slots__ = ("pieces", "buf")

    def __init__(self, request):
        self.pieces = request.body()
        self.buf = b""

    def read(self, size=-1):
        buf = self.buf
        while size < 0 or len(buf) < size:
            piece = next(self.pieces, None)
            if piece is None:
                break
            buf += piece
        if size < 0:
            self.buf = b""
            return buf
        self.buf = buf[size:]
        return buf[:size]

    def readline(self, size=-1):
        buf = self.buf
        while b"\n" not in buf and (size < 0 or len(buf) < size):
            piece = next(self.pieces, None)
            if piece is None:
                break
            buf += piece
        end = buf.find(b"\n") + 1 or len(buf)
        if size >= 0:
            end = min(end, size)
        self.buf = buf[end:]
        return buf[:end]

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line


def request(environ):
    """The ``Request`` behind a WSGI environ."""
    return environ["gproxy.downstream"]


def _decode_path(path):
    if "%" not in path:
        return path
    from urllib.parse import unquote_to_bytes
    return unquote_to_bytes(path).decode("latin-1")
