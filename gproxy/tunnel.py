"""Tunnels: take the client's socket from gunicorn and splice it to another.

An adapter (sockets and greenlets). Used for CONNECT and for Upgrade
(WebSocket) after the backend's 101.

Rules (facts about gunicorn 27's gevent worker, pinned by the tests):
1. The client socket is ``environ['gunicorn.socket']``. Bytes the client
   sent right behind the request head already sit in gunicorn's read buffer
   (``wsgi.input.reader.unreader``); they go to the other side first, or
   they are lost.
2. When the tunnel ends the client socket is ``shutdown(SHUT_RDWR)``, never
   ``close()``d: gunicorn still owns it, reads EOF, leaves its keep-alive
   loop quietly and closes it (a closed fd gives EBADF errors in its log).
3. The handler returns ``ALREADY_HANDLED``: gunicorn then writes nothing and
   logs nothing, so the tunnel writes its own access-log record
   (``finish``), which is also where tunnel metrics belong.
4. Two named greenlets copy the two directions. An end of stream from one
   side is passed on as a half-close (``SHUT_WR``) and the other direction
   keeps going; an error, the idle timeout (no byte either way) or the
   maximum duration ends both.
5. Hijacked connections count as busy in gunicorn's pool: a graceful reload
   or stop waits for open tunnels up to ``graceful_timeout``, then the
   worker exits and they are cut.
"""

import errno
import logging
import socket
import time

import gevent
from gunicorn.workers.base_async import ALREADY_HANDLED

from . import accesslog, errors

log = logging.getLogger("gproxy.error")

CHUNK = 65536
MAX_HEAD = 65536        # a response head larger than this is invalid

__all__ = ["ALREADY_HANDLED", "hijack", "dial", "Splice", "carry", "finish", "open_tunnels"]

open_tunnels = 0        # tunnels open in this worker, for the logs and gauges


def hijack(environ):
    """(client socket, bytes the client already sent behind the head)."""
    sock = environ["gunicorn.socket"]
    early = b""
    reader = getattr(environ["wsgi.input"], "reader", None)
    unreader = getattr(reader, "unreader", None)
    if unreader is not None and hasattr(unreader, "take_buffered"):
        early = unreader.take_buffered()
    return sock, early


def dial(addresses, port, timeout):
    """A connected socket to the first of ``addresses`` that answers.
    Only the given (already checked) addresses are used: no new lookup."""
    last = None
    for ip in addresses:
        try:
            s = socket.create_connection((str(ip), port), timeout=timeout)
        except (socket.timeout, TimeoutError) as e:
            last = errors.UpstreamConnectTimeout(f"connect {ip}:{port}: timed out")
            last.__cause__ = e
            continue
        except OSError as e:
            last = errors.UpstreamConnectError(f"connect {ip}:{port}: {e.strerror or e}")
            last.__cause__ = e
            continue
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    raise last or errors.UpstreamConnectError("no address to connect to")


def read_head(sock, timeout):
    """Read a response head; return (status, reason, [(name, value)], head
    bytes, bytes that followed the head)."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                raise errors.InvalidResponse("response head too large")
            data = sock.recv(CHUNK)
            if not data:
                raise errors.UpstreamReset("closed before a response head")
            buf += data
    except (socket.timeout, TimeoutError) as e:
        raise errors.UpstreamTimeout(f"no response header within {timeout:g}s") from e
    except OSError as e:
        raise errors.UpstreamReset(f"reading the response head: {e.strerror or e}") from e
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise errors.InvalidResponse(f"bad status line {lines[0][:80]!r}")
    fields = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise errors.InvalidResponse(f"bad header line {line[:80]!r}")
        fields.append((name, value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else "", fields, head + b"\r\n\r\n", rest


class Splice:
    """Copy bytes both ways between ``client`` and ``upstream`` until both
    directions ended, or an error, the idle timeout or the maximum duration."""

    def __init__(self, client, upstream, idle_timeout, max_duration=None):
        self.client, self.upstream = client, upstream
        self.idle, self.max_duration = idle_timeout, max_duration
        self.bytes_up = self.bytes_down = 0     # client->upstream, upstream->client
        self.last = time.monotonic()
        self.end = None         # why it ended: eof | idle | max_duration | reset | killed
        self.started = None

    def run(self, to_upstream=b"", to_client=b""):
        self.started = time.monotonic()
        for s in (self.client, self.upstream):
            s.settimeout(self.idle)
        up = gevent.Greenlet(self._copy, self.client, self.upstream, to_upstream, "up")
        up.name = "copy_client_to_backend"
        down = gevent.Greenlet(self._copy, self.upstream, self.client, to_client, "down")
        down.name = "copy_backend_to_client"
        up.start()
        down.start()
        try:
            done = gevent.joinall([up, down], timeout=self.max_duration)
            if len(done) < 2:
                self.stop("max_duration")
                gevent.joinall([up, down], timeout=5)
        except gevent.GreenletExit:
            self.stop("killed")     # the worker is stopping (graceful_timeout passed)
            raise
        finally:
            gevent.killall([up, down], block=False)
            self.stop(self.end or "eof")
            self.upstream.close()
        return self

    @property
    def duration(self):
        return time.monotonic() - self.started if self.started else 0.0

    def stop(self, reason):
        """End both directions (idempotent); the client socket is only shut
        down: gunicorn closes it."""
        if self.end is None:
            self.end = reason
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass    # already shut down or reset by the peer

    def _copy(self, src, dst, first, direction):
        try:
            if first:
                self._send(dst, first, direction)
            while True:
                try:
                    data = src.recv(CHUNK)
                except (socket.timeout, TimeoutError):
                    if time.monotonic() - self.last >= self.idle:
                        self.stop("idle")
                        return
                    continue    # the other direction was busy
                if not data:
                    break
                self._send(dst, data, direction)
        except (socket.timeout, TimeoutError):
            self.stop("idle")   # the receiver did not read for idle_timeout
            return
        except OSError as e:
            if self.end is None and e.errno not in (errno.EBADF, errno.ENOTCONN):
                log.info("tunnel %s: %s", direction, e.strerror or e)
            self.stop("reset")
            return
        try:
            dst.shutdown(socket.SHUT_WR)   # pass the half-close on
        except OSError:
            self.stop("reset")

    def _send(self, dst, data, direction):
        dst.sendall(data)
        self.last = time.monotonic()
        if direction == "up":
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)


def carry(app, ex, environ, upstream, greeting, cfg, to_client=b""):
    """Take the client connection over, send it ``greeting`` (the 200 of a
    CONNECT, the backend's 101 head), then splice both ways until the
    tunnel ends; account for it and return ``ALREADY_HANDLED``."""
    client, early = hijack(environ)
    splice = Splice(client, upstream, cfg.idle_timeout, cfg.max_duration)
    opened(app)
    try:
        client.sendall(greeting)
    except OSError:
        splice.stop("client_gone")
        upstream.close()
        ex.status = 499
    else:
        splice.run(to_upstream=early, to_client=to_client)
    finally:
        finish(app, ex, splice)
    return ALREADY_HANDLED


def opened(app):
    global open_tunnels
    open_tunnels += 1
    app.stats.tunnel_opened()


def finish(app, ex, splice):
    """The tunnel's access-log record: bytes each way, duration, why it
    ended. The one place a tunnel's close is accounted for (metrics too)."""
    global open_tunnels
    open_tunnels -= 1
    ex.bytes_in, ex.bytes_out = splice.bytes_up, splice.bytes_down
    ex.error = None if splice.end == "eof" else f"tunnel_{splice.end}"
    if app.format_access is not None:
        rec = ex.record()
        rec["tunnel"] = {"end": splice.end, "duration": round(splice.duration, 6),
                         "open": open_tunnels}
        accesslog.access(app.format_access(rec))
    app.stats.tunnel_closed(splice.bytes_up, splice.bytes_down, splice.duration)
    app.stats.record(ex)


class RawResponse:
    """A non-101 answer to an Upgrade request, read from the raw backend
    socket with its own framing (RFC 9112 6.3); the same interface as
    ``transport.UpstreamResponse``, so the proxy's ``Streamer`` sends it."""

    __slots__ = ("status", "reason", "headers", "sock", "buf", "method", "idle",
                 "completed", "index")

    def __init__(self, sock, status, reason, headers, rest, method, idle):
        self.sock, self.status, self.reason, self.headers = sock, status, reason, headers
        self.buf, self.method, self.idle = rest, method, idle
        self.completed = False
        self.index = None

    def body(self):
        self.sock.settimeout(self.idle)
        try:
            yield from self._pieces()
        except (socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"idle for more than {self.idle:g}s mid-body") from e
        except (OSError, ValueError) as e:
            raise errors.UpstreamReset(f"body broke off: {e}") from e
        self.completed = True

    def _pieces(self):
        names = {n.lower(): v for n, v in self.headers}
        if self.method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            return
        if "chunked" in names.get("transfer-encoding", "").lower():
            yield from self._chunked()
        elif "content-length" in names:
            yield from self._exactly(int(names["content-length"]))
        else:
            while True:     # delimited by the close
                piece = self._take(CHUNK)
                if not piece:
                    return
                yield piece

    def _take(self, n):
        if not self.buf:
            self.buf = self.sock.recv(CHUNK)
        piece, self.buf = self.buf[:n], self.buf[n:]
        return piece

    def _exactly(self, n):
        while n > 0:
            piece = self._take(min(n, CHUNK))
            if not piece:
                raise ValueError("short body")
            n -= len(piece)
            yield piece

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(CHUNK)
            if not data or len(self.buf) > MAX_HEAD:
                raise ValueError("bad chunked framing")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _chunked(self):
        while True:
            size = int(self._line().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self._line():     # trailers are dropped, as urllib3 does
                    pass
                return
            yield from self._exactly(size)
            if self._line():
                raise ValueError("bad chunked framing")

    def close(self):
        self.sock.close()
