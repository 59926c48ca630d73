"""The WSGI application: one linear handler per request.

    environ -> classify -> route -> admit -> choose -> forward -> respond -> record

``ProxyApp.__call__`` reads top to bottom as that story; each step is a
method of about a screen. Errors carry their status (``errors``), so there is
one ``except ProxyError``. Decisions (routing, balancing) are pure modules;
the request's exchange with the backends (attempts, streaming, records) is
``exchange``; the request's raw parts come from ``downstream``. The WSGI
environ stops here: the forward and upgrade handlers beside this one, and
everything below, take the ``downstream.Request``.
"""

import time
from random import randbytes

from . import cache as _cache, downstream, errors, exchange, forward as _forward, gateway, headers as H, instance, observe, stats
from . import upgrade as _upgrade
from .balancer import make_policy
from .exchange import Exchange
from .health import PassiveHealth
from .router import Router, upstream_target
from .transport import Transport

_TOKEN_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:+/=")


class UpstreamState(exchange.BackendSet):
    """One upstream inside one worker: its backends, policy, in-flight counts
    and (created lazily, so after fork) its Transport."""

    def __init__(self, cfg, shared=None, live=None):
        self.cfg = cfg
        self.name = cfg.name
        self.backends = cfg.backends
        self.inflight = observe.inflight(live, cfg)
        self.policy = make_policy(cfg, observe.load(live, cfg, self.inflight))
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

    def started(self, i):
        self.inflight[i] += 1

    def finished(self, i):
        self.inflight[i] -= 1

    def failed(self, i, kind):
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


class ProxyApp:
    def __init__(self, config, shared=None):
        self.config = config
        self.router = Router(config.routes)
        self.live = observe.live_counters(config, shared)
        self.upstreams = {name: UpstreamState(u, shared, self.live) for name, u in config.upstreams.items()}
        self.trusted = config.trusted_proxies
        self.stats = observe.metrics(stats.Stats(config.statsd), self.live)
        self.recorder = exchange.Recorder(config.access_log, self.stats)
        self.forward_proxy = _forward.ForwardProxy(self.recorder, config)
        self.upgrades = _upgrade.Upgrades(self.recorder, config.tunnel)
        self.gate = gateway.Gate(config, self.stats, self.is_trusted, shared and shared.runtime_dir)
        self.lb_health = instance.HealthPath(config)     # health_path for the LB in front
        self.cache = _cache.Cache(config, self.recorder) if any(r.cache for r in config.routes) else None

    # -- the story -----------------------------------------------------------

    def __call__(self, environ, start_response):
        if self.lb_health.matches(environ.get("RAW_URI", "")):
            return self.lb_health(environ["REQUEST_METHOD"], start_response)
        ex = Exchange(environ)
        self.stats.request_started()
        request = downstream.request(environ)
        ex.request_id = request_id(environ)
        try:
            route, target = self.classify_and_route(environ, ex, request)
            if route is None:                       # absolute-form elsewhere, CONNECT
                return self.forward_proxy(request, start_response, ex)
            up = self.upstreams[route.upstream]
            body = self.admit(request, route, ex)
            if route.cache is not None and body is None:    # a fresh hit is answered here
                hit = self.cache.fresh(environ, ex, route, request, start_response)
                if hit is not None:     # logged as upstream_headers would have it
                    ex.client = H.client_address(environ.get("HTTP_X_FORWARDED_FOR"), ex.client,
                                                 self.is_trusted)
                    return hit
            fields = self.upstream_headers(environ, request, ex, up)
            key = self.hash_key(environ, ex, up)
            if self.upgrades.requested(environ):    # WebSocket: a tunnel after the 101
                return self.upgrades.relay(request, start_response, ex, up, target, fields,
                                           body, key)
            def send(f, ex=ex, body=body):
                return exchange.send(self.recorder, ex, up, key, target, f, body,
                                     up.cfg.passive.fail_status)
            plan = self.cache.lookup(environ, ex, route, fields) if self.cache else None
            sent = plan.forward(send) if plan is not None else send(fields)
            if sent is None:    # answered from the cache (HIT, STALE, UPDATING; 504 only-if-cached)
                return plan.serve(start_response, send)
            attempt, resp = sent
        except errors.ProxyError as e:
            return self.fail(e, ex, start_response)
        return exchange.respond(self.recorder, ex, attempt, resp, start_response)

    def classify_and_route(self, environ, ex, request):
        """(route, upstream target), or (None, None) for the forward proxy.

        RFC 9112 3.2.2: a server MUST accept the absolute-form; its authority
        replaces Host. It is a reverse request when the forward proxy is off,
        or when a route names that host; otherwise the forward proxy's."""
        target = ex.target
        if ex.method == "CONNECT":
            return None, None
        if not target.startswith("/"):
            authority, path = _split_absolute(target)
            if authority is None:
                raise errors.BadRequest("the request target must be a path or an absolute URI")
            if self.forward_proxy.cfg.enabled and not self.router.names_host(authority):
                return None, None
            ex.host, target = authority, path
        route = self.router.match(ex.host, target.split("?", 1)[0], ex.method)
        if route is None:
            raise errors.NoRoute()
        ex.route, ex.upstream = route.name, route.upstream
        return route, upstream_target(route, target)

    def admit(self, request, route, ex):
        """The request body as a BodySource (or None); 401/403/429 (the
        gateway) and 413 refusals, all before the body is read."""
        self.gate.admit(route, request, ex)
        return exchange.request_body(request, route.max_body, ex)

    def upstream_headers(self, environ, request, ex, up):
        """The request fields for the backend, Host first (``exchange.send``
        may replace it), then the client's in order, byte-exact, then the
        forwarding ones."""
        host = ex.host if up.cfg.preserve_host and ex.host else _backend_host(up, 0)
        out = [("Host", host)] + H.strip_hop_by_hop(request.fields, H.REQUEST_DROP)
        peer = ex.client
        trusted = self.is_trusted(peer)
        incoming_xff = environ.get("HTTP_X_FORWARDED_FOR")
        out.append(("X-Forwarded-For", H.forwarded_for(incoming_xff, peer, trusted)))
        if trusted:
            ex.client = H.client_address(incoming_xff, peer, self.is_trusted)
        out.append(("X-Forwarded-Proto", (trusted and environ.get("HTTP_X_FORWARDED_PROTO"))
                    or environ.get("wsgi.url_scheme", "http")))
        out.append(("X-Forwarded-Host", (trusted and environ.get("HTTP_X_FORWARDED_HOST")) or ex.host))
        out.append(("X-Request-Id", ex.request_id))
        return out

    def fail(self, e, ex, start_response, exc_info=None):
        return exchange.fail(self.recorder, e, ex, start_response, exc_info)

    # -- helpers ---------------------------------------------------------------

    def is_trusted(self, addr):
        return self.trusted.match(addr)

    def hash_key(self, environ, ex, up):
        hk = up.cfg.hash_key
        if hk is None:
            return None
        if hk.kind == "header":
            v = environ.get("HTTP_" + hk.name.upper().replace("-", "_"), "")
        elif hk.kind == "cookie":
            v = H.cookie(environ.get("HTTP_COOKIE", ""), hk.name)
        elif hk.kind == "client_ip":
            v = ex.client
        elif hk.kind == "path":
            v = ex.target.split("?", 1)[0]
        else:
            v = ex.target
        return v.encode("utf-8", "surrogateescape") if v else None


def request_id(environ):
    """The client's X-Request-Id when it is a sane token, else a new one."""
    rid = environ.get("HTTP_X_REQUEST_ID", "")
    if 0 < len(rid) <= 128 and all(c in _TOKEN_OK for c in rid):
        return rid
    return randbytes(12).hex()      # random reseeds in each worker after fork


def _split_absolute(target):
    """(authority, origin-form target) of an absolute-form http(s) URI, or
    (None, None)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None, None
    authority, slash, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    path, q, query = (slash + path).partition("?")
    path = path or "/"
    if not authority:
        return None, None
    return authority, path + q + query


def _backend_host(up, i):
    b = up.backends[i]
    default = 443 if b.scheme == "https" else 80
    return b.host if b.port == default else b.name
