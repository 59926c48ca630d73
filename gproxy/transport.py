"""Transport: send one request to one backend and stream the answer back.

The only module that touches ``requests``/``urllib3``. Its interface is small
on purpose (``Transport.send`` -> ``UpstreamResponse``), so what sits under
the Session (the mounted adapter) can be measured and swapped without the
proxy noticing.

Rules:
1. Transparent: no User-Agent, Accept-Encoding, Accept, cookies, .netrc
   credentials or environment proxies are added (``trust_env`` off, an empty
   cookie policy, ``SKIP_HEADER``); no redirect is followed; the request
   target is sent byte-exact (requests would re-quote it: psf/requests#4003).
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
import logging
import socket
import time
from collections import OrderedDict
from http.cookiejar import DefaultCookiePolicy

import requests
import urllib3
from requests.adapters import BaseAdapter, HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError, IncompleteRead, InvalidChunkLength, NewConnectionError,
    ProtocolError, ReadTimeoutError,
)
from urllib3 import HTTPHeaderDict
from urllib3.util import SKIP_HEADER

from . import errors, h1

CHUNK = 65536   # 64 KiB reads: large enough for 1+ GiB/s on loopback

# A pool that is full is normal under bursts (block=False opens and then
# discards the extra connection); one warning per request would flood the log.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _next_read_timeout(deadline, idle):
    """The socket timeout for the next body read: the idle limit, cut short
    by the total deadline; past the deadline, a 504."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.UpstreamTimeout("total timeout")
    return min(idle, left)


class UpstreamResponse:
    """The status, every header field in order (repeats kept), and the body."""

    __slots__ = ("status", "reason", "headers", "_resp", "_raw", "_deadline",
                 "_idle", "completed", "index", "_conn", "connect_time")

    def __init__(self, resp, idle, deadline):
        self._resp = resp
        self._raw = raw = resp.raw
        self.status = raw.status
        self.reason = raw.reason or http.client.responses.get(raw.status, "")
        self.headers = list(raw.headers.items())
        self._idle = idle
        self._deadline = deadline
        self.completed = False
        self.index = None
        self.connect_time = None    # seconds, when this request opened a new connection
        self._conn = conn = raw.connection
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(idle)     # between body reads, not total

    def body(self):
        """Yield the body as it arrives; raise a ProxyError if it breaks off."""
        raw = self._raw
        try:
            if raw.chunked and raw.supports_chunked_reads():
                # urllib3 removes the chunk framing; gunicorn adds its own.
                for piece in raw.read_chunked(CHUNK, decode_content=False):
                    self._check_deadline()
                    yield piece
            else:
                read1 = raw.read1
                while True:
                    self._check_deadline()
                    # read1, not read: hand on what has arrived instead of
                    # waiting for a full CHUNK (streams, server-sent events).
                    piece = read1(CHUNK, decode_content=False)
                    if not piece:
                        break
                    yield piece
        except (ReadTimeoutError, socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"idle for more than {self._idle:g}s mid-body") from e
        except (IncompleteRead, InvalidChunkLength, ProtocolError, http.client.HTTPException) as e:
            raise errors.UpstreamReset(f"body broke off: {_describe(e)}") from e
        except OSError as e:
            raise errors.UpstreamReset(f"body broke off: {_describe(e)}") from e
        self.completed = True

    def _check_deadline(self):
        if self._deadline is not None:
            wait = _next_read_timeout(self._deadline, self._idle)
            conn = self._raw.connection
            if conn is not None and conn.sock is not None:
                conn.sock.settimeout(wait)

    def close(self):
        """Give the connection back to the pool, or drop it if the body was
        not read to its end (its framing is then unknown)."""
        raw = self._raw
        if not self.completed:
            raw.close()
        if self._conn is not None:
            # read by ExactAdapter.send (the body's end may have returned it already)
            self._conn.idle_since = time.monotonic()
        raw.release_conn()


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
        except errors.ProxyError:
            raise
        except Exception as e:     # the client went away or sent a broken body
            self.failed = errors.ClientAbort(f"request body: {_describe(e)}")
            raise self.failed from e


def _describe(e):
    """A short, one-line name for a low-level failure."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException):
            inner = e.__cause__ or e.__context__
        if not isinstance(inner, BaseException) or isinstance(e, errors.ProxyError):
            break
        if not isinstance(e, (urllib3.exceptions.HTTPError, requests.exceptions.RequestException)):
            break
        e = inner
    text = str(e)
    if text.startswith("<") and ">: " in text:
        text = text.split(">: ", 1)[1]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# Failures of a reused keep-alive connection before any response byte: the
# backend closed it while idle (psf/requests#3458). Safe to replay once on a
# fresh connection, for requests that may be replayed at all.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class ExactAdapter(HTTPAdapter):
    """A requests adapter that sends the request target byte-exact and maps
    every failure to a ProxyError.

    ``HTTPAdapter.send`` goes through ``urlopen``, which re-quotes the target
    (``%2f`` -> ``%2F``, ``%zz`` -> ``%25zz``); this one takes a connection
    from the same pool and writes the target as given.
    """

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        connect_timeout, read_timeout = timeout
        backend = request.backend
        pool = self.poolmanager.connection_from_host(backend.host, backend.port, backend.scheme)
        body = request.body
        chunked = body is not None and "Content-Length" not in request.headers
        for attempt in (1, 2):
            conn = pool._get_conn()
            reused = conn.sock is not None
            if reused and time.monotonic() - getattr(conn, "idle_since", time.monotonic()) > self.idle_timeout:
                conn.close()        # idle longer than pool.idle_timeout: a fresh one
                reused = False
            try:
                raw = self._exchange(pool, conn, request, connect_timeout, read_timeout, chunked)
                break
            except _STALE as e:
                conn.close()
                pool._put_conn(conn)
                if body is not None and body.failed is not None:
                    raise body.failed from e
                if reused and attempt == 1 and request.replayable and not (body and body.started):
                    continue
                raise errors.UpstreamReset(_describe(e)) from e
            except BaseException:
                conn.close()
                pool._put_conn(conn)
                raise
        return self.build_response(request, raw)

    @staticmethod
    def _exchange(pool, conn, request, connect_timeout, read_timeout, chunked):
        body = request.body
        if conn.sock is None:
            conn.timeout = connect_timeout
            t0 = time.monotonic()
            try:
                conn.connect()
            except NewConnectionError as e:
                raise errors.UpstreamConnectError(_describe(e)) from e
            except (ConnectTimeoutError, socket.timeout, TimeoutError) as e:
                raise errors.UpstreamConnectTimeout(f"connect: {_describe(e)}") from e
            except OSError as e:
                raise errors.UpstreamConnectError(_describe(e)) from e
            request.connect_time = time.monotonic() - t0
        try:
            conn.request(request.method, request.target, body=body, headers=request.headers,
                         chunked=chunked, preload_content=False, decode_content=False,
                         enforce_content_length=True)
        except errors.ProxyError:
            raise
        except (BrokenPipeError, ConnectionResetError):
            # The backend stopped reading (it may have answered early, e.g.
            # 413): read its response, as urllib3 does.
            if body is not None and body.failed is not None:
                raise body.failed
        conn.timeout = read_timeout
        conn.sock.settimeout(read_timeout)
        try:
            raw = conn.getresponse()
        except _STALE:
            raise
        except (socket.timeout, TimeoutError) as e:
            raise errors.UpstreamTimeout(f"no response header within {read_timeout:g}s") from e
        except (http.client.HTTPException, ValueError) as e:
            raise errors.InvalidResponse(_describe(e)) from e
        except OSError as e:
            raise errors.UpstreamReset(_describe(e)) from e
        raw._connection = conn
        raw._pool = pool
        return raw


class LeanResponse:
    """An UpstreamResponse read by ``h1`` (same interface)."""

    __slots__ = ("status", "reason", "headers", "completed", "index", "_conn", "_pool",
                 "_mode", "_length", "_keep", "_idle", "_deadline", "connect_time")

    def __init__(self, conn, pool, status, reason, fields, mode, length, keep, idle, deadline):
        self.status, self.reason, self.headers = status, reason, fields
        self._conn, self._pool = conn, pool
        self._mode, self._length, self._keep = mode, length, keep
        self._idle, self._deadline = idle, deadline
        self.completed = mode == "none"
        self.index = None
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

    def close(self):
        """Give the connection back to the pool when the response was read
        to its end, nothing follows it and the backend keeps it open."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.completed and self._keep and not conn.buf:
            self._pool.put(conn)
        else:
            conn.close()


class LeanAdapter(BaseAdapter):
    """A requests adapter for plain-http backends on ``h1`` connections:
    what the proxy needs of HTTP/1.1 and nothing else (see ``h1``).
    ``Transport.send`` calls ``exchange`` directly; ``Session.send`` and
    ``build_response`` (cookie extraction, header dictionaries) are skipped."""

    def __init__(self, pool, timeouts, max_pools=None):
        super().__init__()
        self.timeouts = timeouts
        self.max_idle, self.idle_timeout = pool.max_idle_per_backend, pool.idle_timeout
        self.pools = OrderedDict()      # backend name -> h1.Pool, least recently used first
        self.max_pools = max_pools      # None: one per configured backend, never evicted

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        """For ``Session.send`` of a request prepared as ``Transport.send``
        does for ExactAdapter; returns a LeanResponse, not a requests.Response."""
        t = self.timeouts
        return self.exchange(request.backend, request.method, request.target,
                             list(request.headers.items()), request.body, request.replayable,
                             t, t.response_header, None)

    def close(self):
        for p in self.pools.values():
            while p.idle:
                p.idle.pop().close()

    def pool(self, backend):
        pools = self.pools
        p = pools.get(backend.name)
        if p is None:
            p = pools[backend.name] = h1.Pool(backend.host, backend.port,
                                              max(self.max_idle, 1), self.idle_timeout)
            if self.max_pools is not None and len(pools) > self.max_pools:
                _, old = pools.popitem(last=False)      # the least recently used
                while old.idle:
                    old.idle.pop().close()
        elif self.max_pools is not None:
            pools.move_to_end(backend.name)
        return p

    def exchange(self, backend, method, target, fields, body, replayable, t, header_wait, deadline):
        pool = self.pool(backend)
        chunked = body is not None and not any(n.lower() == "content-length" for n, _ in fields)
        if body is None and method in h1.BODY_METHODS and \
                not any(n.lower() == "content-length" for n, _ in fields):
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
            raise errors.UpstreamConnectError(_describe(cause)) from e

    @staticmethod
    def _roundtrip(conn, pool, head, method, body, chunked, header_wait, idle, deadline):
        sock = conn.sock
        sock.settimeout(header_wait)
        try:
            if body is None:
                sock.sendall(head)
            else:
                sock.sendall(head)
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
        return LeanResponse(conn, pool, status, reason or http.client.responses.get(status, ""),
                            fields, mode, length, keep, idle, deadline)


class Transport:
    """Pooled keep-alive connections to the backends of one upstream."""

    def __init__(self, upstream, pools=None):
        """``pools``: how many per-backend pools to keep (an LRU; the least
        recently used is closed first); default one per configured backend."""
        self.timeouts = upstream.timeouts
        s = requests.Session()
        s.trust_env = False                 # no env proxies, no .netrc
        s.headers.clear()                   # no default User-Agent, Accept, ...
        s.max_redirects = 0
        s.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # store nothing
        adapter = ExactAdapter(pool_connections=pools or max(len(upstream.backends), 1),
                               pool_maxsize=max(upstream.pool.max_idle_per_backend, 1),
                               pool_block=False, max_retries=0)
        adapter.idle_timeout = upstream.pool.idle_timeout
        s.mount("https://", adapter)
        s.mount("http://", LeanAdapter(upstream.pool, upstream.timeouts, pools))
        self.session = s
        self.lean = s.get_adapter("http://")

    def send(self, backend, method, target, headers, body=None, replayable=False):
        """Send ``method target`` to ``backend``; return an UpstreamResponse
        once the response header is in, or raise a ProxyError.

        ``headers`` is a list of (name, value) pairs, repeats kept, in order;
        ``body`` None or a BodySource; ``replayable`` whether the request may
        be sent again if a reused connection turns out to be dead."""
        t = self.timeouts
        deadline = time.monotonic() + t.total if t.total else None
        header_wait = min(t.response_header, t.total) if t.total else t.response_header
        if backend.scheme == "http":
            return self.lean.exchange(backend, method, target, headers, body, replayable,
                                      t, header_wait, deadline)
        headers = HTTPHeaderDict(headers)
        for name in ("User-Agent", "Accept-Encoding"):
            if name not in headers:
                headers[name] = SKIP_HEADER    # urllib3/http.client add none
        prep = requests.PreparedRequest()
        prep.method = method
        prep.url = backend.url + target
        prep.target = target                # what goes on the wire, byte-exact
        prep.backend = backend
        prep.replayable = replayable
        prep.headers = headers
        prep.body = body
        prep.hooks = {"response": []}
        prep._cookies = None
        prep._body_position = None
        prep.connect_time = None
        resp = self.session.send(prep, stream=True, timeout=(t.connect, header_wait),
                                 allow_redirects=False)
        out = UpstreamResponse(resp, t.idle, deadline)
        out.connect_time = prep.connect_time
        return out
