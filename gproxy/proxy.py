"""The WSGI application: one linear handler per request.

    environ -> classify -> route -> admit -> choose -> forward -> respond -> record

``ProxyApp.__call__`` reads top to bottom as that story; each step is a
method of about a screen. Errors carry their status (``errors``), so there is
one ``except ProxyError``. Decisions (routing, balancing) are pure modules;
the only I/O here goes through ``transport`` and ``accesslog``.
"""

import errno
import ipaddress
import logging
import os
import sys
import time

from . import accesslog, errors, forward as _forward, headers as H, stats, upgrade as _upgrade
from .balancer import make_policy
from .health import PassiveHealth
from .router import Router, upstream_target
from .transport import CHUNK, BodySource, Transport

log = logging.getLogger("gproxy.error")

# RFC 9110 9.2.2; nginx never re-sends POST, LOCK or PATCH (1.9.13).
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_TOKEN_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


class UpstreamState:
    """One upstream inside one worker: its backends, policy, in-flight counts
    and (created lazily, so after fork) its Transport."""

    def __init__(self, cfg, shared=None):
        self.cfg = cfg
        self.name = cfg.name
        self.backends = cfg.backends
        self.inflight = [0] * len(cfg.backends)
        self.policy = make_policy(cfg, self.inflight)
        self.passive = PassiveHealth(len(cfg.backends), cfg.passive.max_fails,
                                     cfg.passive.fail_timeout)
        # The supervisor's view (active checks, passive failures of every
        # worker, drains) and where to report failures; None without one.
        self.shared = shared.view(cfg.name, [b.name for b in cfg.backends]) if shared else None
        self.reporter = shared.reporter if shared else None
        self._transport = None

    @property
    def transport(self):
        if self._transport is None:
            self._transport = Transport(self.cfg)
        return self._transport

    def available(self, i, now):
        """Healthy (active), not ejected (passive: here or in any worker) and
        not drained."""
        return self.passive.usable(i, now) and (self.shared is None or self.shared.usable(i, now))

    def choose(self, key, tried):
        now = time.monotonic()
        i = self.policy.choose(lambda i: i not in tried and self.available(i, now), key)
        if i is not None:
            self.passive.chosen(i, now)
        return i

    def attempts(self, key, ex, fields):
        """The backends to try for one request: chosen by the policy, each at
        most once, at most ``1 + retries``; records which in ``ex`` and points
        Host at it unless the client's is kept (``fields[0]`` is Host)."""
        tried = set()
        for attempt in range(self.cfg.retries + 1):
            i = self.choose(key, tried)
            if i is None:
                return
            tried.add(i)
            ex.backend, ex.retries = self.backends[i].name, attempt
            if not self.cfg.preserve_host:
                fields[0] = ("Host", _backend_host(self, i))
            yield i

    def failed(self, i, kind="error"):
        # Eject here at once (nginx rules); tell the supervisor without waiting.
        self.passive.failure(i, time.monotonic())
        if self.reporter is not None:
            self.reporter.report(self.name, self.backends[i].name, kind)

    def succeeded(self, i):
        self.passive.success(i, time.monotonic())

    def ejected(self, name):
        """True when backend ``name`` is out of rotation now (passive health)."""
        now = time.monotonic()
        return any(b.name == name and not self.available(i, now) for i, b in enumerate(self.backends))


class Exchange:
    """What is known about one request, for the logs and metrics."""

    __slots__ = ("start", "method", "target", "protocol", "client", "host", "route",
                 "upstream", "backend", "status", "bytes_in", "bytes_out", "retries",
                 "request_id", "upstream_time", "error", "user_agent", "referer", "body",
                 "upstream_start", "connect_time")

    def __init__(self, environ):
        self.start = time.time()
        self.method = environ["REQUEST_METHOD"]
        self.target = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
        self.protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        self.client = environ.get("REMOTE_ADDR", "-")
        self.host = environ.get("HTTP_HOST", "")
        self.route = self.upstream = self.backend = None
        self.status = 0
        self.bytes_in = self.bytes_out = self.retries = 0
        self.request_id = ""
        self.upstream_time = None
        self.error = None
        self.user_agent = environ.get("HTTP_USER_AGENT", "")
        self.referer = environ.get("HTTP_REFERER", "")
        self.body = None
        self.upstream_start = None     # monotonic, when the answering attempt began
        self.connect_time = None       # seconds, when that attempt opened a connection

    def record(self):
        if self.body is not None:
            self.bytes_in = self.body.nbytes
        return {
            "time": self.start, "client": self.client, "method": self.method,
            "target": self.target, "protocol": self.protocol, "host": self.host,
            "status": self.status, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration": round(time.time() - self.start, 6),
            "upstream_time": None if self.upstream_time is None else round(self.upstream_time, 6),
            "route": self.route, "upstream": self.upstream, "backend": self.backend,
            "retries": self.retries, "request_id": self.request_id, "error": self.error,
            "user_agent": self.user_agent, "referer": self.referer,
        }


class ProxyApp:
    def __init__(self, config, shared=None):
        self.config = config
        self.router = Router(config.routes)
        self.upstreams = {name: UpstreamState(u, shared) for name, u in config.upstreams.items()}
        self.trusted = tuple(config.trusted_proxies)
        self.format_access = accesslog.setup(config.access_log)
        self._trust_cache = {}
        self.stats = stats.Stats(config.statsd)
        self.forward_proxy = _forward.ForwardProxy(self, config)
        self.upgrades = _upgrade.Upgrades(self, config.tunnel)

    # -- the story -----------------------------------------------------------

    def __call__(self, environ, start_response):
        ex = Exchange(environ)
        self.stats.request_started()
        if self.forward_proxy.handles(ex):      # absolute-form and CONNECT
            return self.forward_proxy(environ, start_response, ex)
        try:
            route = self.classify_and_route(environ, ex)
            up = self.upstreams[route.upstream]
            body = self.admit(environ, route, ex)
            fields = self.upstream_headers(environ, ex, up)
            target = upstream_target(route, ex.target)
            if self.upgrades.requested(environ):    # WebSocket: a tunnel after the 101
                return self.upgrades.relay(environ, start_response, ex, up, target, fields, body,
                                           self.hash_key(environ, ex, up))
            resp = self.forward(ex, up, target, fields, body, self.hash_key(environ, ex, up))
        except errors.ProxyError as e:
            return self.fail(e, ex, start_response)
        ex.status = resp.status
        try:
            start_response(f"{resp.status} {resp.reason}", H.strip_hop_by_hop(resp.headers, H.RESPONSE_DROP))
        except Exception as e:  # the server refuses a header it cannot write (e.g. a control byte)
            Streamer(self, ex, up, resp).release()
            return self.fail(errors.InvalidResponse(f"unwritable response header: {e!r}"), ex,
                             start_response, sys.exc_info())
        return Streamer(self, ex, up, resp)

    def classify_and_route(self, environ, ex):
        target = ex.target
        if not target.startswith("/"):
            # absolute-form and CONNECT belong to the forward proxy
            raise errors.BadRequest("the request target must be a path")
        path = target.split("?", 1)[0]
        route = self.router.match(ex.host, path, ex.method)
        if route is None:
            raise errors.NoRoute()
        ex.route, ex.upstream = route.name, route.upstream
        return route

    def admit(self, environ, route, ex):
        """The request body as a BodySource (or None); 413/501 refusals."""
        te = environ.get("HTTP_TRANSFER_ENCODING")
        wsgi_input = environ["wsgi.input"]
        if te is not None:
            if te.strip().lower() != "chunked":
                raise errors.UnsupportedCoding()    # gunicorn lets "gzip, chunked" through
            ex.body = BodySource(_chunked_pieces(wsgi_input), route.max_body)
            return ex.body
        length = environ.get("CONTENT_LENGTH")
        if not length:
            return None
        n = int(length)     # gunicorn has validated it
        if route.max_body is not None and n > route.max_body:
            raise errors.BodyTooLarge()
        if n == 0:
            return None
        ex.body = BodySource(_length_pieces(wsgi_input, n))
        return ex.body

    def upstream_headers(self, environ, ex, up):
        """The request fields for the backend, Host first (``forward`` may
        replace it), then the client's in order, then the forwarding ones."""
        raw = environ.get("gproxy.headers") or getattr(environ["wsgi.input"], "gproxy_headers", None)
        if raw is not None:
            fields = [(H.title(n), v) for n, v in raw]
        else:
            fields = _environ_fields(environ)
        fields = H.strip_hop_by_hop(fields, H.REQUEST_DROP)
        host = None
        out = [None]
        for field in fields:
            if field[0] == "Host":
                host = field[1]
            else:
                out.append(field)
        if not up.cfg.preserve_host or host is None:
            host = None
        out[0] = ("Host", host if host is not None else _backend_host(up, 0))
        peer = ex.client
        trusted = self.is_trusted(peer)
        incoming_xff = environ.get("HTTP_X_FORWARDED_FOR")
        out.append(("X-Forwarded-For", H.forwarded_for(incoming_xff, peer, trusted)))
        if trusted:
            ex.client = H.client_address(incoming_xff, peer, self.is_trusted)
        out.append(("X-Forwarded-Proto", (trusted and environ.get("HTTP_X_FORWARDED_PROTO"))
                    or environ.get("wsgi.url_scheme", "http")))
        out.append(("X-Forwarded-Host", (trusted and environ.get("HTTP_X_FORWARDED_HOST")) or ex.host))
        rid = environ.get("HTTP_X_REQUEST_ID", "")
        if not (0 < len(rid) <= 128 and all(c in _TOKEN_OK for c in rid)):
            rid = os.urandom(12).hex()
        ex.request_id = rid
        out.append(("X-Request-Id", rid))
        return out

    def forward(self, ex, up, target, fields, body, key):
        """Send to a backend chosen by the policy; on a failure that is safe to
        retry, try another backend (nginx ``proxy_next_upstream error timeout``)."""
        method = ex.method
        replayable = body is None and method in IDEMPOTENT
        last = None
        for i in up.attempts(key, ex, fields):
            backend = up.backends[i]
            up.inflight[i] += 1
            t0 = time.monotonic()
            try:
                resp = up.transport.send(backend, method, target, fields, body, replayable)
            except errors.ProxyError as e:
                up.inflight[i] -= 1
                ex.upstream_time = time.monotonic() - t0
                if not e.backend_fault:
                    raise
                up.failed(i, e.kind)
                self.upstream_failed(ex, e, ex.upstream_time)
                last = e
                if not ((e.never_sent and not (body and body.started)) or replayable):
                    raise
                continue
            ex.upstream_time = time.monotonic() - t0
            ex.upstream_start, ex.connect_time = t0, resp.connect_time
            resp.index = i
            if resp.status in up.cfg.passive.fail_status:
                up.failed(i, f"status_{resp.status}")   # counted, still relayed (no retry)
            return resp
        raise last or errors.NoBackend(f"no available backend in upstream {up.name}")

    def respond_error_body(self, e):
        return (e.body + "\n").encode() if e.body else b""

    def fail(self, e, ex, start_response, exc_info=None):
        ex.status = e.status
        ex.error = ex.error or e.kind
        if isinstance(e, errors.ClientAbort):
            # Nothing can reach the client; answer 400 on the wire, log 499.
            status_line, body = "400 Bad Request", b""
        else:
            status_line, body = e.status_line, self.respond_error_body(e)
        start_response(status_line, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body)))], exc_info)
        ex.bytes_out = len(body)
        return Finished(self, ex, body)

    # -- helpers ---------------------------------------------------------------

    def upstream_failed(self, ex, e, elapsed):
        ex.error = e.kind
        log.warning("upstream %s: route=%s upstream=%s backend=%s after=%.3fs request_id=%s: %s",
                    e.kind, ex.route, ex.upstream, ex.backend, elapsed, ex.request_id, e,
                    extra={"fields": {"event": "upstream_failed", "kind": e.kind, "route": ex.route,
                                      "upstream": ex.upstream, "backend": ex.backend,
                                      "after": round(elapsed, 6), "request_id": ex.request_id}})
        up = self.upstreams.get(ex.upstream)     # None for the forward proxy
        self.stats.attempt_failed(ex.upstream, ex.backend, e.kind,
                                  up is not None and up.ejected(ex.backend))

    def is_trusted(self, addr):
        if not self.trusted:
            return False
        hit = self._trust_cache.get(addr)
        if hit is None:
            try:
                ip = ipaddress.ip_address(addr)
                hit = any(ip in net for net in self.trusted)
            except ValueError:
                hit = False
            if len(self._trust_cache) < 10000:
                self._trust_cache[addr] = hit
        return hit

    def hash_key(self, environ, ex, up):
        hk = up.cfg.hash_key
        if hk is None:
            return None
        if hk.kind == "header":
            v = environ.get("HTTP_" + hk.name.upper().replace("-", "_"), "")
        elif hk.kind == "cookie":
            v = _cookie(environ.get("HTTP_COOKIE", ""), hk.name)
        elif hk.kind == "client_ip":
            v = ex.client
        elif hk.kind == "path":
            v = ex.target.split("?", 1)[0]
        else:
            v = ex.target
        return v.encode("utf-8", "surrogateescape") if v else None

    def record(self, ex):
        if self.format_access is not None:
            accesslog.access(self.format_access(ex.record()))
        self.stats.record(ex)


class Streamer:
    """The response body iterable handed to gunicorn. Its ``close()`` (called
    by gunicorn in every case) returns the connection and writes the log."""

    __slots__ = ("app", "ex", "up", "resp")

    def __init__(self, app, ex, up, resp):
        self.app, self.ex, self.up, self.resp = app, ex, up, resp

    def __iter__(self):
        ex = self.ex
        try:
            for piece in self.resp.body():
                ex.bytes_out += len(piece)
                yield piece
        except errors.ProxyError as e:
            self.up.failed(self.resp.index, e.kind)
            self.app.upstream_failed(ex, e, time.time() - ex.start)
            # Never complete a broken response (nginx closes the connection).
            # An OSError makes gunicorn close the socket without the final
            # chunk and without logging a traceback for it.
            raise ConnectionResetError(errno.ECONNRESET, f"upstream {e.kind} mid-body") from e

    def release(self):
        self.resp.close()
        self.up.inflight[self.resp.index] -= 1

    def close(self):
        ex, resp = self.ex, self.resp
        self.release()
        if resp.completed:
            self.up.succeeded(resp.index)
        elif ex.error is None:
            ex.status, ex.error = 499, "client_abort"   # the client went away
        self.app.record(ex)


class Finished:
    """A short body the proxy wrote itself (errors)."""

    __slots__ = ("app", "ex", "body")

    def __init__(self, app, ex, body):
        self.app, self.ex, self.body = app, ex, body

    def __iter__(self):
        yield self.body

    def close(self):
        self.app.record(self.ex)


# -- request bodies and headers ------------------------------------------------

def _chunked_pieces(wsgi_input):
    """Each chunk as it arrives. ``Body.read(n)`` would wait for n bytes
    (benoitc/gunicorn#605), so iterate gunicorn's chunk parser when it has one
    (gunicorn 27.0; pinned), else fall back to read()."""
    parser = getattr(getattr(wsgi_input, "reader", None), "parser", None)
    if parser is not None and hasattr(parser, "__next__"):
        for piece in parser:
            if piece:
                yield piece
        return
    if hasattr(wsgi_input, "chunk_length"):
        # gevent.pywsgi.Input: read(n) would also wait for n bytes; ask for
        # the rest of the current chunk (1 byte at a chunk boundary).
        while True:
            left = wsgi_input.chunk_length - wsgi_input.position
            piece = wsgi_input.read(min(left, CHUNK) if left > 0 else 1)
            if not piece:
                return
            yield piece
    while True:
        piece = wsgi_input.read(CHUNK)
        if not piece:
            return
        yield piece


def _length_pieces(wsgi_input, n):
    while n > 0:
        piece = wsgi_input.read(min(CHUNK, n))
        if not piece:
            raise errors.ClientAbort("request body ended early")
        n -= len(piece)
        yield piece


def _environ_fields(environ):
    """Request header fields from a plain WSGI environ (repeats already joined)."""
    out = []
    for k, v in environ.items():
        if k.startswith("HTTP_"):
            out.append((H.title(k[5:].replace("_", "-")), v))
    if environ.get("CONTENT_TYPE"):
        out.append(("Content-Type", environ["CONTENT_TYPE"]))
    if environ.get("CONTENT_LENGTH"):
        out.append(("Content-Length", environ["CONTENT_LENGTH"]))
    return out


def _backend_host(up, i):
    b = up.backends[i]
    default = 443 if b.scheme == "https" else 80
    return b.host if b.port == default else b.name


def _cookie(header, name):
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""
