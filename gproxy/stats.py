"""StatsD metrics: Graphite-style dotted names under one prefix.

An adapter, and the only module that imports ``statsd``. The names are a
contract with the operator's dashboards: the README's "Metrics" table lists
every one, and ``ops/monitoring/`` graphs them.

Rule 1: one client per process, created after fork (each worker builds its
        own ProxyApp, the supervisor its own ``Stats``); a UDP socket is never
        shared between processes.
Rule 2: metrics never fail or slow a request. The socket is non-blocking
        (a full buffer drops the datagram instead of waiting) and connected,
        so that "nobody listens on the StatsD port" comes back as
        ECONNREFUSED instead of vanishing. A failed send is dropped and the
        first failure in a process is logged, once. A host that does not
        resolve at start turns metrics off in that process, logged once.
Rule 3: one batch of lines per request, queued when the request is recorded
        and sent when the queue fills a datagram (``max_udp_size``) or has
        waited ``FLUSH_EVERY``, so several requests share one sendto() (it
        was a third of the per-request cost of StatsD); StatsD aggregates
        over its 10 s flush, so 0.1 s of delay changes no figure; a worker
        that exits sends what is queued (atexit), one killed loses at most
        those 0.1 s. A failed
        upstream attempt, which is rare, sends its own pipeline at once. The
        per-request batch is formatted here from names built once, not
        through the package's per-metric calls, which cost three times as
        much (bench/metrics_cost.py).
Rule 4: route, upstream and backend names are sanitised by ``sanitize``:
        every character other than ``A-Z a-z 0-9 _ -`` becomes ``_``, so a
        name is always one Graphite path segment (``127.0.0.1:8081`` ->
        ``127_0_0_1_8081``).
Rule 5: every gauge is an absolute value with one writer, the supervisor:
        active connections, active requests per backend and tunnels are
        summed from the workers' live counters (``counters``) and sent
        every second, so a worker killed mid-request or a restarted StatsD
        daemon cannot leave them off for good (``+1``/``-1`` deltas from
        every worker did). Workers send counters and timers only.
"""

import atexit
import logging
import re
import threading
import time

import statsd

from . import errors

log = logging.getLogger("gproxy.error")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

# Failures that are the backend's fault; they are counted per attempt by
# ``attempt_failed`` (with the backend), so ``record`` does not count them again.
BACKEND_KINDS = frozenset(c.kind for c in (
    errors.UpstreamConnectError, errors.UpstreamTimeout, errors.UpstreamReset,
    errors.InvalidResponse))
# Per-request failures that also belong to the upstream the route points at.
UPSTREAM_KINDS = frozenset((errors.NoBackend.kind, errors.ClientAbort.kind))

_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
FLUSH_EVERY = 0.1       # seconds a queued line may wait for a fuller datagram

# The gateway's refusals, also counted per route: kind -> the route's counter.
ROUTE_REFUSALS = {errors.TooManyRequests.kind: "rate_limited",
                  errors.Unauthorized.kind: "auth_refused",
                  errors.ConsumerForbidden.kind: "auth_refused"}


def sanitize(name):
    """One Graphite path segment for a route, upstream or backend name."""
    return _UNSAFE.sub("_", str(name)) or "_"


def status_class(status):
    """``200`` -> ``2xx``; 499 (client went away) is a ``4xx``."""
    return _CLASSES.get(status // 100, "other")


class _Client(statsd.StatsClient):
    """``statsd.StatsClient`` on a connected, non-blocking socket whose
    first send failure is logged (the package swallows every one)."""

    def __init__(self, host, port, max_udp_size):
        super().__init__(host, port, prefix=None, maxudpsize=max_udp_size, ipv6=":" in host)
        self.where = f"{host}:{port}"
        self.failed = False
        self._sock.setblocking(False)
        self._sock.connect(self._addr)
        self.queued, self.queued_size = [], 0
        # A greenlet in a gevent worker (threading is patched), a thread in
        # the supervisor; the lock is uncontended but for those two.
        self.lock = threading.Lock()
        self.flusher = None
        atexit.register(self.flush)     # a worker's last batches go out as it exits

    def send_lines(self, lines):
        """Queue StatsD lines; send full datagrams now, the rest within FLUSH_EVERY."""
        data = "\n".join(lines)
        with self.lock:
            if self.queued_size + len(data) >= self._maxudpsize:
                self._flush()
            self.queued.append(data)
            self.queued_size += len(data) + 1
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush_every, name="statsd_flush", daemon=True)
            self.flusher.start()

    def _flush_every(self):
        while True:
            time.sleep(FLUSH_EVERY)
            with self.lock:
                if self._sock is None:
                    return          # closed
                if self.queued:
                    self._flush()

    def _flush(self):
        queued, self.queued, self.queued_size = self.queued, [], 0
        if len(queued) == 1 and len(queued[0]) > self._maxudpsize:
            self._send_split(queued[0].split("\n"))
        else:
            self._send("\n".join(queued))

    def flush(self):
        with self.lock:
            if self.queued and self._sock is not None:
                self._flush()

    def close(self):
        self.flush()
        atexit.unregister(self.flush)
        super().close()

    def _send_split(self, lines):
        """Lines packed into datagrams of at most max_udp_size."""
        limit = self._maxudpsize
        chunk, size = [], 0
        for line in lines:
            if chunk and size + len(line) >= limit:
                self._send("\n".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        self._send("\n".join(chunk))

    def _send(self, data):
        try:
            self._sock.send(data.encode("ascii"))
        except OSError as e:
            if not self.failed:
                self.failed = True
                log.error("statsd %s: send failed: %s; metrics are dropped while it lasts "
                          "(further failures in this process are not logged)", self.where, e)


def connect(cfg):
    """A client for the ``statsd`` config section, or None (off, or the host
    does not resolve: logged once)."""
    if not cfg.enabled:
        return None
    try:
        return _Client(cfg.host, cfg.port, cfg.max_udp_size)
    except (OSError, UnicodeError) as e:
        log.error("statsd %s:%s: cannot resolve or open: %s; metrics are off in this process",
                  cfg.host, cfg.port, e)
        return None


class Stats:
    """The metrics of one process. Every method is cheap and returns at once
    when metrics are off (``client`` None)."""

    def __init__(self, cfg):
        self.client = connect(cfg)
        p = cfg.prefix + "."
        self.p = p
        self.responses = {c: f"{p}server.responses.{c}" for c in (*_CLASSES.values(), "other")}
        self.bytes_in, self.bytes_out = p + "server.bytes_in", p + "server.bytes_out"
        self.active = p + "server.connections.active"
        self._routes, self._upstreams, self._backends = {}, {}, {}

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- names (built once per route / upstream / backend) ----------------------

    def route_names(self, route):
        names = self._routes.get(route)
        if names is None:
            base = f"{self.p}route.{sanitize(route)}."
            names = self._routes[route] = (
                {c: f"{base}requests.{c}" for c in self.responses}, base + "duration")
        return names

    def upstream_name(self, upstream):
        name = self._upstreams.get(upstream)
        if name is None:
            name = self._upstreams[upstream] = f"{self.p}upstream.{sanitize(upstream)}."
        return name

    def backend_name(self, upstream, backend):
        key = (upstream, backend)
        name = self._backends.get(key)
        if name is None:
            name = self._backends[key] = f"{self.upstream_name(upstream)}backend.{sanitize(backend)}."
        return name

    # -- requests (workers) -----------------------------------------------------

    def request_started(self):
        """Nothing to send: the supervisor sends the active gauge (Rule 5)."""

    def record(self, ex):
        """Everything about one finished request, in one batch. ``ex`` is the
        proxy's Exchange (read, never changed)."""
        if self.client is None:
            return
        cls = status_class(ex.status)
        lines = [self.responses[cls] + ":1|c"]
        if ex.route is not None:
            requests, duration = self.route_names(ex.route)
            lines.append(requests[cls] + ":1|c")
            lines.append(f"{duration}:{(time.time() - ex.start) * 1000.0:.3f}|ms")
        nbytes = ex.body.nbytes if ex.body is not None else ex.bytes_in
        if nbytes:
            lines.append(f"{self.bytes_in}:{nbytes}|c")
        if ex.bytes_out:
            lines.append(f"{self.bytes_out}:{ex.bytes_out}|c")
        kind = ex.error
        if kind is not None and kind not in BACKEND_KINDS:
            lines.append(f"{self.p}server.errors.{kind}:1|c")
            if ex.upstream is not None and kind in UPSTREAM_KINDS:
                lines.append(f"{self.upstream_name(ex.upstream)}errors.{kind}:1|c")
            if ex.route is not None and kind in ROUTE_REFUSALS:
                lines.append(f"{self.p}route.{sanitize(ex.route)}.{ROUTE_REFUSALS[kind]}:1|c")
        if ex.upstream is not None:
            self._upstream_timings(lines, ex)
        if ex.cache_status is not None:
            lines.append(f"{self.p}cache.{ex.cache_status.lower()}:1|c")
        self.client.send_lines(lines)

    def _upstream_timings(self, lines, ex):
        up = self.upstream_name(ex.upstream)
        if ex.retries:
            lines.append(f"{up}retries:{ex.retries}|c")
        if ex.upstream_start is None:
            return          # no response header came back
        total = f"total:{(time.monotonic() - ex.upstream_start) * 1000.0:.3f}|ms"
        ttfb = f"ttfb:{ex.upstream_time * 1000.0:.3f}|ms"
        connect = None if ex.connect_time is None else f"connect:{ex.connect_time * 1000.0:.3f}|ms"
        for base in (up, self.backend_name(ex.upstream, ex.backend)):
            if connect is not None:
                lines.append(base + connect)
            lines.append(base + ttfb)
            lines.append(base + total)

    def attempt_failed(self, upstream, backend, kind, ejected):
        """One failed attempt on ``backend`` (a retry may follow). ``ejected``:
        this failure took the backend out of rotation in this worker."""
        if self.client is None:
            return
        with self.client.pipeline() as pipe:
            pipe.incr(f"{self.p}server.errors.{kind}")
            if upstream is None:        # the forward proxy: no upstream, no backend names
                return
            base = self.backend_name(upstream, backend)
            pipe.incr(f"{self.upstream_name(upstream)}errors.{kind}")
            pipe.incr(f"{base}errors.{kind}")
            if ejected:
                pipe.incr(base + "ejected")

    def rate_limit_store_error(self):
        """One rate-limit decision the store (Redis) failed to make."""
        if self.client is not None:
            self.client.incr(self.p + "rate_limit_store.errors")

    # -- tunnels (CONNECT, WebSocket; workers) -----------------------------------

    def tunnel_opened(self):
        if self.client is not None:
            self.client.incr(self.p + "tunnel.opened")

    def tunnel_closed(self, bytes_up, bytes_down, seconds):
        """``bytes_up`` client to destination, ``bytes_down`` back."""
        if self.client is not None:
            with self.client.pipeline() as pipe:
                if bytes_up:
                    pipe.incr(self.p + "tunnel.bytes_up", bytes_up)
                if bytes_down:
                    pipe.incr(self.p + "tunnel.bytes_down", bytes_down)
                pipe.timing(self.p + "tunnel.duration", seconds * 1000.0)

    # -- gauges (the supervisor: the one writer of these) -------------------------

    def active_gauges(self, requests, tunnels, backends):
        """Absolute server-wide gauges; ``backends``: {(upstream, backend): n}."""
        if self.client is None:
            return
        lines = [f"{self.active}:{requests}|g", f"{self.p}tunnel.active:{tunnels}|g"]
        lines += [f"{self.backend_name(u, b)}active:{n}|g" for (u, b), n in backends.items()]
        self.client.send_lines(lines)


    def health_available(self, upstream, n):
        """How many backends of ``upstream`` are available (absolute gauge)."""
        if self.client is not None:
            self.client.gauge(self.upstream_name(upstream) + "backends.available", n)

    def health_state_changed(self, upstream, backend, up):
        """``backend`` went up (True) or down (False)."""
        if self.client is not None:
            state = "up" if up else "down"
            self.client.incr(f"{self.backend_name(upstream, backend)}health.{state}")

    def health_check_latency(self, upstream, backend, seconds):
        if self.client is not None:
            self.client.timing(self.backend_name(upstream, backend) + "health.check", seconds * 1000.0)
