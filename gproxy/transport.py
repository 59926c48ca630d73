"""Transport: send one request to one backend and stream the answer back.

Every upstream exchange goes through here and ``h1`` (http and https
backends, Upgrade requests, the forward proxy's origins, the supervisor's
health checks). Its interface is small on purpose (``Transport.send`` ->
``Response``), and each upstream keeps a pooled ``requests.Session`` with
gproxy's ``Adapter`` mounted for both schemes, so what sits under the
Session can be measured and swapped without the handlers noticing.

Rules:
1. Transparent: nothing is added to the request but its framing (no
   User-Agent, Accept-Encoding, cookies, .netrc credentials or environment
   proxies); no redirect is followed; the request target is sent byte-exact.
2. Bodies stream both ways in pieces of at most ``CHUNK`` bytes; a body is
   never decoded (gzip stays gzip) and never buffered whole.
3. Every failure leaves as a ``ProxyError`` subclass that says what failed
   (connect, timeout, reset, invalid response) and whether the request
   certainly never reached the backend (``never_sent``), which is what makes
   a retry of a non-idempotent request safe.
4. One Session per upstream per worker, created after fork: a pool of
   keep-alive connections per backend, sized from the config.
"""

import http.client
import socket
import ssl
import time
from collections import OrderedDict
from http.cookiejar import DefaultCookiePolicy

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from . import errors, h1, netaddr

CHUNK = 65536   # 64 KiB reads: large enough for 1+ GiB/s on loopback


def _next_read_timeout(deadline, idle):
    """The socket timeout for the next body read: the idle limit, cut short
    by the total deadline; past the deadline, a 504."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.UpstreamTimeout("total timeout")
    return min(idle, left)


class Response:
    """The status, every header field in order (repeats kept), and the body."""

    __slots__ = ("status", "reason", "headers", "completed", "_conn", "_pool",
                 "_mode", "_length", "_keep", "_idle", "_deadline", "connect_time")

    def __init__(self, conn, pool, status, reason, fields, mode, length, keep, idle, deadline):
        self.status, self.reason, self.headers = status, reason, fields
        self._conn, self._pool = conn, pool
        self._mode, self._length, self._keep = mode, length, keep
        self._idle, self._deadline = idle, deadline
        self.completed = mode == "none"
        self.connect_time = conn.connect_time   # seconds, when this request opened the connection
        conn.sock.settimeout(idle)          # between body reads, not total

    def body(self):
        """Yield the body as it arrives; raise a ProxyError if it breaks off."""
        mode = self._mode
        if mode == "none":
            return
        b = h1.Body(self._conn, CHUNK, self._check_deadline)
        pieces = b.length(self._length) if mode == "length" else \
            b.chunked() if mode == "chunked" else b.until_close()
        try:
            yield from pieces
        except (socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"idle for more than {self._idle:g}s mid-body") from e
        except (h1.Broken, OSError) as e:
            raise errors.UpstreamReset(f"body broke off: {_describe(e)}") from e
        self.completed = True

    def _check_deadline(self):
        if self._deadline is not None:
            self._conn.sock.settimeout(_next_read_timeout(self._deadline, self._idle))

    def detach(self):
        """(socket, bytes the backend sent behind its head): the connection
        after a 101, for the tunnel; it never goes back to the pool."""
        conn, self._conn = self._conn, None
        return conn.detach()

    def close(self):
        """Give the connection back to the pool when the response was read
        to its end, nothing follows it and the backend keeps it open."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.completed and self._keep and not conn.buf and self.status != 101:
            self._pool.put(conn)
        else:
            conn.close()


class BodySource:
    """The downstream request body as an iterator that remembers whether it
    started (then it cannot be replayed) and whether the client broke off."""

    __slots__ = ("chunks", "started", "failed", "nbytes", "limit")

    def __init__(self, chunks, limit=None):
        self.chunks = chunks
        self.started = False
        self.failed = None
        self.nbytes = 0
        self.limit = limit

    def __iter__(self):
        self.started = True
        try:
            for piece in self.chunks:
                self.nbytes += len(piece)
                if self.limit is not None and self.nbytes > self.limit:
                    self.failed = errors.BodyTooLarge()
                    raise self.failed
                yield piece
        except errors.ProxyError as e:
            self.failed = e
            raise
        except Exception as e:     # the client went away or sent a broken body
            self.failed = errors.ClientAbort(f"request body: {_describe(e)}")
            raise self.failed from e


def _describe(e):
    """A short, one-line name for a low-level failure."""
    while isinstance(e, (h1.ConnectFailed, h1.Stale)) and isinstance(e.__cause__, BaseException):
        e = e.__cause__
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Adapter(BaseAdapter):
    """gproxy's requests adapter, mounted for http:// and https://: ``h1``
    connections, what a proxy needs of HTTP/1.1 and nothing else.
    ``Transport.send`` calls ``exchange`` directly (the handlers need the
    field list and the streaming body, not a ``requests.Response``);
    ``Session.send`` works too (the supervisor's health checks)."""

    def __init__(self, pool, timeouts, max_pools=None, tls=None):
        super().__init__()
        self.timeouts = timeouts
        self.max_idle, self.idle_timeout = pool.max_idle_per_backend, pool.idle_timeout
        self.pools = OrderedDict()      # backend name -> h1.Pool, least recently used first
        self.max_pools = max_pools      # None: one per configured backend, never evicted
        self.tls = tls                  # upstream TLS settings (config.Tls), None: defaults
        self._context = None

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        """``Session.send``: the request's URL names the backend."""
        backend = backend_of(request.url)
        target = request.path_url
        t = self.timeouts
        header_wait = timeout[1] if isinstance(timeout, tuple) else (timeout or t.response_header)
        body = None
        if request.body:
            data = request.body if isinstance(request.body, bytes) else request.body.encode()
            body = BodySource(iter((data,)))
        fields = [("Host", request.headers.get("Host") or backend.name)]
        fields += [(n, v) for n, v in request.headers.items() if n.lower() != "host"]
        deadline = time.monotonic() + t.total if t.total else None
        resp = self.exchange(backend, request.method, target, fields, body, True, t,
                             header_wait, deadline)
        out = requests.Response()
        out.status_code, out.reason = resp.status, resp.reason
        out.headers = CaseInsensitiveDict(resp.headers)
        out.url, out.request, out.raw = request.url, request, resp
        if not stream:
            out._content = b"".join(resp.body())
            resp.close()
        return out

    def close(self):
        for p in self.pools.values():
            while p.idle:
                p.idle.pop().close()

    def context(self):
        """The TLS context for https backends: verified, system CAs (or the
        configured file), made once."""
        if self._context is None:
            tls = self.tls
            ctx = ssl.create_default_context(cafile=tls.ca_file if tls else None)
            if tls is not None and not tls.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._context = ctx
        return self._context

    def pool(self, backend):
        pools = self.pools
        p = pools.get(backend.name)
        if p is None:
            tls = self.context() if backend.scheme == "https" else None
            name = self.tls.server_name if self.tls is not None and self.tls.server_name else None
            p = pools[backend.name] = h1.Pool(backend.host, backend.port, max(self.max_idle, 1),
                                              self.idle_timeout, tls, name)
            if self.max_pools is not None and len(pools) > self.max_pools:
                _, old = pools.popitem(last=False)      # the least recently used
                while old.idle:
                    old.idle.pop().close()
        elif self.max_pools is not None:
            pools.move_to_end(backend.name)
        return p

    def exchange(self, backend, method, target, fields, body, replayable, t, header_wait, deadline):
        pool = self.pool(backend)
        has_length = any(n.lower() == "content-length" for n, _ in fields)
        chunked = body is not None and not has_length
        if body is None and method in h1.BODY_METHODS and not has_length:
            fields = fields + [("Content-Length", "0")]
        head = h1.request_head(method, target, fields, chunked)
        for attempt in (1, 2):
            # a replay after a dead pooled connection takes a new one: the
            # next pooled one may have been closed by the backend too
            conn = self._connect(pool, t.connect, fresh=attempt == 2)
            try:
                return self._roundtrip(conn, pool, head, method, body, chunked, header_wait,
                                       t.idle, deadline)
            except h1.Stale as e:
                conn.close()
                if body is not None and body.failed is not None:
                    raise body.failed from e
                if conn.reused and attempt == 1 and replayable and not (body and body.started):
                    continue
                raise errors.UpstreamReset(str(e)) from e
            except BaseException:
                conn.close()
                raise

    @staticmethod
    def _connect(pool, timeout, fresh=False):
        try:
            return pool.get(timeout, fresh)
        except h1.ConnectFailed as e:
            cause = e.__cause__
            if isinstance(cause, (socket.timeout, TimeoutError)):
                raise errors.UpstreamConnectTimeout(f"connect: {_describe(cause)}") from e
            raise errors.UpstreamConnectError(_describe(e)) from e

    @staticmethod
    def _roundtrip(conn, pool, head, method, body, chunked, header_wait, idle, deadline):
        sock = conn.sock
        sock.settimeout(header_wait)
        try:
            h1.send_all(sock, head)
            if body is not None:
                h1.send_body(sock, body, chunked)
        except errors.ProxyError:
            raise
        except (BrokenPipeError, ConnectionResetError) as e:
            # The backend stopped reading (it may have answered early, e.g.
            # 413): read its response, as urllib3 does.
            if body is not None and body.failed is not None:
                raise body.failed from e
            if body is None or not body.started:
                raise h1.Stale(_describe(e)) from e
        except (socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"sending the request: {_describe(e)}") from e
        try:
            status, reason, version, fields = h1.read_head(conn)
            mode, length, keep = h1.framing(method, status, version, fields)
        except (socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"no response header within {header_wait:g}s") from e
        except h1.Invalid as e:
            raise errors.InvalidResponse(str(e)) from e
        except h1.Broken as e:
            raise errors.UpstreamReset(str(e)) from e
        except h1.Stale:
            raise
        except OSError as e:
            raise errors.UpstreamReset(_describe(e)) from e
        if mode == "chunked":
            # RFC 9112 6.3: a Content-Length beside Transfer-Encoding is
            # removed before forwarding (the body is re-framed downstream)
            fields = [f for f in fields if f[0].lower() != "content-length"]
        return Response(conn, pool, status, reason or http.client.responses.get(status, ""),
                        fields, mode, length, keep, idle, deadline)


def backend_of(url):
    """A ``config.Backend`` for a URL (``Session.send`` callers)."""
    from urllib.parse import urlsplit
    from .config import Backend
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    name = netaddr.join(host, port)
    return Backend(url=f"{parts.scheme}://{name}", scheme=parts.scheme, host=parts.hostname,
                   port=port, name=name)


def session(upstream, pools=None):
    """A requests Session with gproxy's adapter mounted for both schemes:
    no environment proxies or .netrc, no default headers, no cookies kept,
    no redirects."""
    s = requests.Session()
    s.trust_env = False
    s.headers.clear()
    s.max_redirects = 0
    s.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # store nothing
    adapter = Adapter(upstream.pool, upstream.timeouts, pools, getattr(upstream, "tls", None))
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


class Transport:
    """Pooled keep-alive connections to the backends of one upstream."""

    def __init__(self, upstream, pools=None):
        """``pools``: how many per-backend pools to keep (an LRU; the least
        recently used is closed first); default one per configured backend."""
        self.timeouts = upstream.timeouts
        self.session = session(upstream, pools)
        self.adapter = self.session.get_adapter("http://")

    def send(self, backend, method, target, headers, body=None, replayable=False):
        """Send ``method target`` to ``backend``; return a Response once the
        response header is in, or raise a ProxyError.

        ``headers`` is a list of (name, value) pairs, repeats kept, in order;
        ``body`` None or a BodySource; ``replayable`` whether the request may
        be sent again if a reused connection turns out to be dead."""
        t = self.timeouts
        deadline = time.monotonic() + t.total if t.total else None
        header_wait = min(t.response_header, t.total) if t.total else t.response_header
        return self.adapter.exchange(backend, method, target, headers, body, replayable,
                                     t, header_wait, deadline)
