"""gproxy's gunicorn worker: HTTP/1.1 on the client side, served by gproxy.

gunicorn keeps the processes (the arbiter, HUP reload, USR2 upgrade,
TERM/QUIT, ``worker_connections``, ``max_requests``, the heartbeat): this is
a subclass of its gevent worker, whose accept loop and graceful drain are
reused as they are. Each accepted connection is served here instead: one
greenlet per connection, requests framed by llhttp (``httptools``, the
parser of Node.js, strict on framing), the WSGI application called once per
request with a PEP 3333 environ plus ``gproxy.downstream`` (the request's
raw parts: ``downstream.Request``).

Rules (each pinned by a test in tests/test_server.py):
1. Bytes we cannot frame unambiguously get a 4xx and the connection is
   closed; nothing after them is read as a request (RFC 9112 6.3, 11.2).
   llhttp refuses Content-Length beside Transfer-Encoding, a Transfer-Encoding
   whose last coding is not chunked, repeated or malformed Content-Length,
   bad or overflowing chunk sizes, obs-fold, bare CR/LF, control bytes and
   whitespace before the colon. This module adds: Host missing (HTTP/1.1) or
   repeated, Transfer-Encoding on HTTP/1.0 or repeated, Content-Length at
   or above 2^63, HTTP versions other than 1.0 and 1.1. Chunk extensions
   are skipped by llhttp as they stream (never buffered) and are not
   forwarded: the body is re-framed upstream.
2. Limits as nginx: request line (414), header block and field count (431);
   a header timeout for the whole head (408, as ``client_header_timeout``),
   a body timeout between reads, the keep-alive idle timeout.
3. Header names and values reach the application byte-exact (latin-1
   strings, case and underscores kept, repeats in order) in
   ``Request.fields``. The environ's ``HTTP_*`` keys skip names with an
   underscore, which would collide with their dashed twin.
4. ``Expect: 100-continue`` is answered when the application first reads
   the body, so a refusal goes out before the client sends it.
5. The response is framed here: Content-Length if the application gave one,
   else chunked for HTTP/1.1 and close-delimited for HTTP/1.0; no body for
   HEAD, 1xx, 204 and 304. The head and a first small piece go out in one
   send. A body iterator that raises aborts the connection (never a clean
   end), as does a body shorter than its Content-Length.
6. Keep-alive as RFC 9112 9.3: HTTP/1.1 unless ``close`` is among the
   Connection options, HTTP/1.0 only with ``keep-alive``. The connection is
   closed after a response whose request body was not read to its end, after
   an Upgrade that was not taken over, and once the worker is stopping.
   Pipelined requests are answered in order.
7. ``Request.take_over()`` hands the socket and the bytes already read
   behind the head to the application (CONNECT, WebSocket); the worker then
   writes nothing and closes the socket when the application returns.
"""

import collections
import errno
import os
import queue
import signal
import socket
import time
from functools import partial

import gevent
import httptools
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

from . import __version__, downstream
from .downstream import Refused
from .h1 import send_all

SERVER = f"gproxy/{__version__}"
RECV = 65536
# A keep-alive connection idle this long gives up its greenlet (and its
# stack, most of what an idle connection costs) and waits on a watcher.
PARK_AFTER = 1.0
PARK = object()
LINGER_TIME = 2.0       # nginx lingering_time is 30 s; we only drain a little
# A stopping worker (HUP, TERM) still answers, with Connection: close, a request
# that comes on an idle keep-alive connection within this long, and only then
# closes the idle ones (HAProxy idle-close-on-response): closing at once races
# a client that is sending its next request, which then fails.
IDLE_GRACE = 1.0
LINGER_BYTES = 1 << 20
NO_BODY_STATUS = frozenset((204, 304))
REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           414: "URI Too Long", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 505: "HTTP Version Not Supported"}

_date = [0, b""]


_FIRST_LINES = {}    # status line -> the head's first bytes (a few statuses recur)


def _unsafe(text):
    return "\r" in text or "\n" in text or "\0" in text


def http_date(now=None):
    """The Date header value, formatted once per second."""
    now = int(time.time() if now is None else now)
    if now != _date[0]:
        _date[0] = now
        _date[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date[1]


class Server(StreamServer):
    """gevent's StreamServer, except that the handler closes the client
    socket itself (a parked connection outlives its handler)."""

    def do_close(self, sock, *args):
        pass


class Worker(GeventWorker):
    """``worker_class: gproxy`` (gunicorn.conf.py). gunicorn's gevent worker
    with its own connection handler, and a stop that does not poll: a
    stopping worker answers a request that comes on an idle keep-alive
    connection within ``IDLE_GRACE`` (with Connection: close), then ends the
    idle ones, and leaves as soon as the last busy one is done (or at
    ``graceful_timeout``)."""

    DRAIN_POLL = 0.05

    def load_wsgi(self):
        super().load_wsgi()
        cfg = getattr(self.wsgi, "config", None)
        self.limits = downstream.Limits.of(cfg)
        self.idle = set()           # connections waiting for their next request
        self.idle_closed = False
        self.parked = set()         # idle keep-alive connections without a greenlet
        self.idle_close_at = None   # when stopping: IDLE_GRACE after the stop began
        self.resumed = Pool()       # greenlets of connections back from parking
        self.stopping = Event()

    def run(self):
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for s in self.sockets:
            s.setblocking(1)
            server = Server(s, handle=partial(self.handle, s),
                            spawn=Pool(self.worker_connections), **ssl_args)
            if self.cfg.workers > 1:
                server.max_accept = 1       # spread connections over the workers
            server.start()
            servers.append(server)
        while self.alive:
            self.notify()
            self.sweep(time.monotonic())
            self.stopping.wait(1.0)
        for server in servers:
            server.close()              # stop accepting
        self.idle_close_at = time.monotonic() + min(IDLE_GRACE, self.cfg.graceful_timeout)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while len(self.resumed) or self.parked or any(server.pool.free_count() != server.pool.size
                                                      for server in servers):
            if time.monotonic() >= deadline:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                for server in servers:
                    server.stop(timeout=1)
                return
            self.notify()               # ends idle keep-alive connections after IDLE_GRACE
            self.sweep(time.monotonic())
            gevent.sleep(self.DRAIN_POLL)

    # Signals the arbiter sends a worker that has not yet set its handlers:
    # between the fork and init_signals they run the arbiter's handler,
    # inherited with the fork, which queues them in this process's copy of
    # the arbiter's queue, where nobody reads them (a QUIT then waits out
    # graceful_timeout and a SIGKILL).
    REDELIVER = (signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def init_signals(self):
        inherited = getattr(signal.getsignal(signal.SIGQUIT), "__self__", None)
        super().init_signals()
        pending = getattr(inherited, "SIG_QUEUE", None)
        while pending is not None:
            try:
                sig = pending.get_nowait()
            except (queue.Empty, AttributeError):
                break
            if sig in self.REDELIVER:
                os.kill(os.getpid(), sig)       # now to this worker's handler

    def handle_exit(self, sig, frame):
        self.alive = False
        if hasattr(self, "stopping"):       # not yet during load_wsgi: run() sees alive
            gevent.spawn(self.stopping.set)     # not from the signal handler itself

    def handle(self, listener, client, addr):
        client.setblocking(1)
        if client.family != socket.AF_UNIX:
            # nginx tcp_nodelay on: a small last write (a chunked terminator)
            # must not wait for the client's delayed ACK
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.serve(Connection(self, listener, client, addr))

    def serve(self, conn):
        parked = False
        try:
            parked = conn.serve()
        except Exception:
            self.log.exception("Error serving a connection")
        finally:
            if parked:
                self.park(conn)
            else:
                conn.close()

    # -- parked keep-alive connections: a watcher each, no greenlet ---------------

    def park(self, conn):
        # between two requests the parser holds no state: drop it (and the
        # empty queue) while parked, and make new ones on resume
        conn.parser = conn.ready = None
        if conn.watcher is None:
            conn.watcher = gevent.get_hub().loop.io(conn.sock.fileno(), 1)
        conn.watcher.start(self.resume, conn)
        self.parked.add(conn)

    def resume(self, conn):
        """Called by the hub when a parked connection has bytes (or closed)."""
        conn.watcher.stop()
        self.parked.discard(conn)
        conn.parser = httptools.HttpRequestParser(conn)
        conn.ready = collections.deque()
        self.resumed.spawn(self.serve, conn)

    def sweep(self, now):
        """Close parked connections past the keep-alive timeout (or all, when
        stopping); called once a second."""
        keepalive = self.limits.keepalive
        for conn in list(self.parked):
            if self.idle_grace_over(now) or now - conn.idle_since >= keepalive:
                conn.watcher.stop()
                self.parked.discard(conn)
                conn.close()

    def notify(self):
        super().notify()
        if self.idle_grace_over(time.monotonic()) and not self.idle_closed:
            # Stopping: idle keep-alive connections would hold the graceful
            # drain until graceful_timeout; end them now (nginx does too).
            self.idle_closed = True
            for conn in list(self.idle):
                conn.wake()

    def idle_grace_over(self, now):
        return not self.alive and self.idle_close_at is not None and now >= self.idle_close_at

    def request_done(self):
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False


class Connection:
    """One client connection: the llhttp parser's callbacks collect request
    heads and body pieces; ``serve`` answers the requests in order."""

    __slots__ = ("worker", "sock", "addr", "server", "limits", "parser", "ready",
                 "parsing", "error", "rest", "upgraded", "closed", "head_bytes", "head_fed",
                 "idle_since", "watcher", "environ_base")

    def __init__(self, worker, listener, sock, addr):
        self.worker = worker
        self.sock = sock
        self.addr = addr
        self.server = listener.getsockname()
        self.limits = worker.limits
        self.parser = httptools.HttpRequestParser(self)
        self.ready = collections.deque()    # parsed heads, answered in order
        self.parsing = None                 # the request llhttp is in
        self.error = None                   # Refused: what ends this connection
        self.rest = b""                     # bytes behind an upgrade/CONNECT head
        self.upgraded = False
        self.closed = False
        self.head_bytes = 0                 # of the head being parsed, as parsed
        self.head_fed = 0                   # fed while that head was unfinished
        self.idle_since = time.monotonic()  # waiting for a request since
        self.watcher = None                 # readable-watcher while parked
        self.environ_base = None            # downstream: this connection's part of an environ

    # -- llhttp callbacks (errors are raised as Refused and kept in .error) ----

    def on_message_begin(self):
        self.parsing = downstream.Request(self)
        self.head_bytes = self.head_fed = 0

    def on_url(self, url):
        r = self.parsing
        r.target_bytes += url
        self.head_bytes += len(url)
        if len(r.target_bytes) > self.limits.request_line:
            self.refuse(414, "request line too long")

    def on_header(self, name, value):
        r = self.parsing
        if len(r.raw_fields) >= self.limits.header_fields:
            self.refuse(431, "too many header fields")
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.header_block:
            self.refuse(431, "request header block too large")
        r.raw_fields.append((name, value))

    def on_headers_complete(self):
        r = self.parsing
        r.finish_head(self.parser)
        why = r.framing_error()
        if why is not None:
            self.refuse(*why)
        self.ready.append(r)

    def on_body(self, piece):
        self.parsing.pieces.append(piece)

    def on_message_complete(self):
        self.parsing.complete = True
        self.parsing = None

    def refuse(self, status, why):
        if self.error is None:
            self.error = Refused(status, why)
        raise self.error

    # -- reading -----------------------------------------------------------------

    def feed(self, data):
        """Parse ``data``; framing errors end up in ``self.error``."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # CONNECT or Upgrade: llhttp stops behind the head; what follows
            # belongs to the tunnel, if the application opens one.
            self.upgraded = True
            self.rest = data[e.args[0]:]
        except httptools.HttpParserError as e:
            if self.error is None:
                self.error = Refused(400, str(e) or type(e).__name__)
        r = self.parsing
        if r is not None and not r.head_done and self.error is None:
            # httptools holds a field until its end: bound what an
            # unfinished head may make it hold
            self.head_fed += len(data)
            if self.head_fed > self.limits.header_block + RECV:
                self.error = Refused(431, "request header block too large")

    def recv(self, timeout):
        """Bytes from the client, or b"" at its end; socket.timeout after
        ``timeout`` seconds."""
        sock = self.sock
        if sock.timeout != timeout:     # mostly the same; gevent's settimeout is Python code
            sock.settimeout(timeout)
        return sock.recv(RECV)

    def next_request(self):
        """The next request whose head is complete; PARK when the connection
        has been idle long enough to give up its greenlet; None when the
        connection is to end (closed, idle too long, refused: the refusal is
        sent)."""
        if self.ready:
            return self.ready.popleft()
        if self.error is not None or self.upgraded:
            return self.refused()
        deadline = None
        while not self.ready:
            if self.error is not None:
                return self.refused()
            if self.parsing is None:
                data = self.wait_idle()
                if data is None or data is PARK:
                    return data
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.limits.header_timeout
                try:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout
                    data = self.recv(left)
                except (socket.timeout, TimeoutError):
                    self.error = Refused(408, "request header timeout")
                    return self.refused()
                except OSError:
                    return None
                if not data:
                    self.error = Refused(400, "connection closed inside a request head")
                    return self.refused()
            self.feed(data)
        return self.ready.popleft()

    def wait_idle(self):
        """The first bytes of the next request; PARK after ``PARK_AFTER``
        seconds of waiting, None at the keep-alive timeout or the end."""
        worker = self.worker
        now = time.monotonic()
        if worker.idle_grace_over(now):
            return None
        left = self.idle_since + self.limits.keepalive - now
        if not worker.alive:            # stopping: wait IDLE_GRACE at most
            left = min(left, (worker.idle_close_at or now + IDLE_GRACE) - now)
        if left <= 0:
            return None
        worker.idle.add(self)
        try:
            data = self.recv(min(left, PARK_AFTER))
        except (socket.timeout, TimeoutError):
            return PARK if left > PARK_AFTER and worker.alive else None
        except OSError:
            return None
        finally:
            worker.idle.discard(self)
        return data or None

    def read_body(self, request):
        """More of ``request``'s body into its ``pieces``; False at its end.
        Raises Refused for broken framing, socket.timeout after the body
        timeout, ConnectionError when the client went away."""
        if self.error is not None:
            raise self.error
        if request.complete or self.upgraded:
            return False
        data = self.recv(self.limits.body_timeout)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "client closed inside the request body")
        self.feed(data)
        if self.error is not None and not request.pieces:
            raise self.error
        return True

    def refused(self):
        """Send the answer to a refused request; the connection ends."""
        e = self.error
        status = e.status
        body = f"{REASONS.get(status, 'Bad Request')}: {e}\n".encode("latin-1", "replace")
        self.worker.log.info("refused %s from %s: %s", status, self.addr[0] if self.addr else "-", e)
        head = (b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, REASONS.get(status, "Bad Request").encode(), SERVER.encode(),
                   http_date(), len(body)))
        try:
            self.sock.sendall(head + body)
        except OSError:
            pass
        self.linger()
        return None

    # -- the loop ------------------------------------------------------------------

    def serve(self):
        """Answer requests until the connection ends (False) or is parked
        (True: it waits for its next request without a greenlet)."""
        worker = self.worker
        while True:
            request = self.next_request()
            if request is None:
                return False
            if request is PARK:
                return True
            worker.request_done()
            keep = Response(self, request).run()
            if request.taken:
                return False
            if not keep:
                if not request.complete or self.ready or self.rest:
                    self.linger()   # unread input: a close now would reset the response
                return False
            self.idle_since = time.monotonic()

    def wake(self):
        """End an idle keep-alive wait (the worker is stopping)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def linger(self):
        """Half-close, then read and drop what the client still sends for a
        little while, so that closing does not reset our answer (nginx
        lingering_close)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_TIME
            n = 0
            while n < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                data = self.recv(min(left, 0.5))
                if not data:
                    break
                n += len(data)
        except OSError:
            pass

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


class Response:
    """One request's answer: calls the application and frames what it gives."""

    __slots__ = ("conn", "request", "status", "headers", "head", "chunked", "length",
                 "sent", "keep", "no_body", "head_sent")

    def __init__(self, conn, request):
        self.conn = conn
        self.request = request
        self.status = None
        self.head = None
        self.head_sent = False
        self.sent = 0

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None and self.head_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        code = int(status[:3])
        request = self.request
        self.status = code
        self.no_body = request.method == "HEAD" or code < 200 or code in NO_BODY_STATUS
        length = date = None
        out = ["\r\n"]
        for name, value in headers:
            n = len(name)
            if n == 14 and name.lower() == "content-length":
                length = int(value)
            elif n == 4 and name.lower() == "date":
                date = value    # a stored response keeps its Date (RFC 9110 6.6.1: caches)
                continue
            out.append(f"{name}: {value}\r\n")
        self.length = length
        self.chunked = length is None and not self.no_body and request.version == "HTTP/1.1"
        keep = request.keep_alive and self.conn.worker.alive and not self.conn.upgraded \
            and (length is not None or self.chunked or self.no_body)
        self.keep = keep
        first = _FIRST_LINES.get(status)
        if first is None:       # a status line is checked once, then kept
            if _unsafe(status):
                raise ValueError("CR, LF or NUL in a response header")
            first = f"HTTP/1.1 {status}\r\nServer: {SERVER}\r\nDate: ".encode("latin-1")
            if len(_FIRST_LINES) < 256:
                _FIRST_LINES[status] = first
        lines = [first, http_date() if date is None else date.encode("latin-1")]
        if self.chunked:
            out.append("Transfer-Encoding: chunked\r\n")
        if not keep or not request.complete:
            self.keep = False       # said once, kept to
            out.append("Connection: close\r\n")
        elif request.version == "HTTP/1.0":
            out.append("Connection: keep-alive\r\n")
        out.append("\r\n")
        block = "".join(out)
        # every item of ``out`` is one line: a CR, LF or NUL inside a name or
        # value shows as more of them than lines (one scan each, in C)
        if block.count("\r") != len(out) or block.count("\n") != len(out) or "\0" in block \
                or (date is not None and _unsafe(date)):
            raise ValueError("CR, LF or NUL in a response header")
        lines.append(block.encode("latin-1"))
        self.head = b"".join(lines)
        return self.write

    def write(self, data):
        """Send one body piece (the head first, with the first piece)."""
        if self.no_body:
            data = b""
        elif self.length is not None:
            room = self.length - self.sent
            if len(data) > room:
                data = data[:room]      # more than Content-Length: never sent
        self.sent += len(data)
        if self.chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if not self.head_sent:
            self.head_sent = True
            data = self.head + data
        if data:
            send_all(self.conn.sock, data)

    def finish(self):
        """After the last piece: the chunked terminator; whether the
        connection can serve another request."""
        if not self.head_sent:
            self.write(b"")
        if self.chunked:
            send_all(self.conn.sock, b"0\r\n\r\n")
        elif self.length is not None and self.sent < self.length and not self.no_body:
            return False            # shorter than announced: the client must see the cut
        return self.keep and self.request.complete

    def run(self):
        """Call the application, send its answer; True to keep the
        connection for the next request."""
        conn, request = self.conn, self.request
        environ = request.environ()
        try:
            result = conn.worker.wsgi(environ, self.start_response)
        except Exception:
            conn.worker.log.exception("Error handling request %s %s", request.method, request.target)
            return self.internal_error()
        try:
            if request.taken:
                return False
            pieces = iter(result)
            if self.status is None:
                first = next(pieces, b"")     # start_response may come with the first piece
                if self.status is None:
                    raise RuntimeError("the application did not call start_response")
                self.write(first)
            for piece in pieces:
                if piece:
                    self.write(piece)
            return self.finish()
        except (OSError, gevent.GreenletExit) as e:
            # the client went away, or the body broke off upstream: never
            # complete the response (no terminator, the socket is reset)
            if not isinstance(e, gevent.GreenletExit):
                self.abort()
            return False
        except Exception:
            conn.worker.log.exception("Error handling request %s %s", request.method, request.target)
            if self.head_sent:
                self.abort()
                return False
            return self.internal_error()
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def abort(self):
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def internal_error(self):
        if self.head_sent or self.request.taken:
            self.abort()
            return False
        body = b"Internal Server Error\n"
        self.head = None
        self.start_response("500 Internal Server Error",
                            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        self.keep = False
        try:
            self.write(body)
        except OSError:
            pass
        return False
