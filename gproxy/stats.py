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
Rule 3: counting costs a request no lock and no syscall. ``record`` adds
        its counts to this worker's sums (a dict item each) and keeps its
        timer values (one tuple per route and backend, not yet
        formatted); every ``flush_interval`` (0.1 s) the worker sends each
        counter once, as its sum (``name:N|c``: StatsD adds the values of
        a counter's lines, so Graphite sees the same totals), and the
        timer lines, formatted from a template built once per route and
        backend and packed into datagrams of ``max_udp_size``. A template
        keeps at most ``timer_samples`` a second of values (50 per 0.1 s
        by default): beyond, a uniform sample of the interval's requests
        (reservoir sampling), sent with its rate (``|ms|@0.125``), from
        which StatsD counts every request again (etsy statsd, Telegraf and
        DogStatsD all divide by it). Counters stay exact; a busy worker
        formats and sends a bounded number of timer lines, whatever its
        traffic. Counts and values are added by the worker's greenlets and
        sent by them or its flusher greenlet, all in one thread, and a
        flush does not yield, so nothing locks. A worker that exits (TERM,
        QUIT, max_requests, a reload) sends what it holds (atexit); one
        killed loses at most one interval. Failed attempts and tunnel
        events, which are rare, are sent at once. The lines are formatted
        here from names built once, not through the package's per-metric
        calls, which cost three times as much (bench/metrics_cost.py).
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
import random
import re
import threading
import time

import statsd

from . import errors

log = logging.getLogger("gproxy.error")

_random = random.random

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

# Failures that are the backend's fault; they are counted per attempt by
# ``attempt_failed`` (with the backend), so ``record`` does not count them again.
BACKEND_KINDS = frozenset(c.kind for c in (
    errors.UpstreamConnectError, errors.UpstreamTimeout, errors.UpstreamReset,
    errors.InvalidResponse))
# Per-request failures that also belong to the upstream the route points at.
UPSTREAM_KINDS = frozenset((errors.NoBackend.kind, errors.ClientAbort.kind))

_CLASSES = {n: f"{n}xx" for n in range(1, 6)}

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
    first send failure is logged (the package swallows every one), plus
    this worker's summed counters and queued timer samples (Rule 3)."""

    def __init__(self, host, port, max_udp_size, flush_interval, timer_samples):
        super().__init__(host, port, prefix=None, maxudpsize=max_udp_size, ipv6=":" in host)
        self.where = f"{host}:{port}"
        self.failed = False
        self._sock.setblocking(False)
        self._sock.connect(self._addr)
        self.counts = {}                # name -> sum since the last flush
        self.timed = {}                 # template -> [requests, kept value tuples]
        self.keep = max(1, round(timer_samples * flush_interval))
        self.flush_interval = flush_interval
        self.flusher = None
        atexit.register(self.flush)     # a worker's last sums go out as it exits

    def count(self, name, n=1):
        counts = self.counts
        counts[name] = counts.get(name, 0) + n

    def slot(self, template):
        """Where one more request's timer values for ``template`` go: (list,
        index) of the kept ones, or None when they are not kept. The first
        ``keep`` of an interval are kept; the n-th after them replaces a
        kept one with chance keep/n, which keeps the kept ones a uniform
        sample of all (reservoir sampling; Rule 3). A request not kept
        computes no values."""
        entry = self.timed.get(template)
        if entry is None:
            entry = self.timed[template] = [0, []]
        n = entry[0] = entry[0] + 1
        kept = entry[1]
        if n <= self.keep:
            kept.append(None)
            return kept, n - 1
        j = int(_random() * n)
        return (kept, j) if j < self.keep else None

    def start_flusher(self):
        # A greenlet in a gevent worker (threading is patched).
        self.flusher = threading.Thread(target=self._flush_every, name="statsd_flush", daemon=True)
        self.flusher.start()

    def _flush_every(self):
        while self._sock is not None:
            time.sleep(self.flush_interval)
            self.flush()

    def flush(self):
        """Send the summed counters and the kept timer samples, the latter
        with their rate when they are a part of the requests."""
        counts, self.counts = self.counts, {}
        timed, self.timed = self.timed, {}
        lines = [f"{name}:{n}|c" for name, n in counts.items()]
        for template, (n, kept) in timed.items():
            if n > len(kept):
                template = template.replace("|ms", f"|ms|@{max(len(kept) / n, 1e-6):.6f}")
            lines += [template % values for values in kept if values is not None]
        if lines and self._sock is not None:
            self.send_lines(lines)

    def close(self):
        self.flush()
        atexit.unregister(self.flush)
        super().close()

    def send_lines(self, lines):
        """Lines packed into datagrams of at most max_udp_size, sent now."""
        limit = self._maxudpsize
        chunk, size = [], 0
        for line in lines:
            if len(line) >= limit and "\n" in line:      # a block larger than a datagram
                self.send_lines(line.split("\n"))
                continue
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
        return _Client(cfg.host, cfg.port, cfg.max_udp_size, cfg.flush_interval, cfg.timer_samples)
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
        self._templates = {}    # (route, upstream, backend, connected) -> timer lines

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
        """Everything about one finished request: counts added to the sums,
        timer lines queued (Rule 3). ``ex`` is the proxy's Exchange (read,
        never changed)."""
        client = self.client
        if client is None:
            return
        if client.flusher is None:
            client.start_flusher()
        counts, count = client.counts, client.count     # the first inline, for every request
        cls = status_class(ex.status)
        name = self.responses[cls]
        counts[name] = counts.get(name, 0) + 1
        if ex.route is not None:
            name = (self._routes.get(ex.route) or self.route_names(ex.route))[0][cls]
            counts[name] = counts.get(name, 0) + 1
        nbytes = ex.body.nbytes if ex.body is not None else ex.bytes_in
        if nbytes:
            count(self.bytes_in, nbytes)
        if ex.bytes_out:
            name = self.bytes_out
            counts[name] = counts.get(name, 0) + ex.bytes_out
        kind = ex.error
        if kind is not None and kind not in BACKEND_KINDS:
            count(f"{self.p}server.errors.{kind}")
            if ex.upstream is not None and kind in UPSTREAM_KINDS:
                count(f"{self.upstream_name(ex.upstream)}errors.{kind}")
            if ex.route is not None and kind in ROUTE_REFUSALS:
                count(f"{self.p}route.{sanitize(ex.route)}.{ROUTE_REFUSALS[kind]}")
        if ex.retries and ex.upstream is not None:
            count(self.upstream_name(ex.upstream) + "retries", ex.retries)
        if ex.cache_status is not None:
            count(f"{self.p}cache.{ex.cache_status.lower()}")
        self._timers(client, ex)

    def _timers(self, client, ex):
        """The route's duration and, when a backend answered, the upstream's
        and the backend's [connect,] ttfb and total: one block of lines from
        a template built once per route, backend and connect (five float
        formats in one ``%`` cost a third of five f-strings)."""
        answered = ex.upstream is not None and ex.upstream_start is not None
        connected = answered and ex.connect_time is not None
        key = (ex.route, ex.upstream if answered else None, ex.backend if answered else None, connected)
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = self._template(*key)
        if not template:
            return
        where = client.slot(template)
        if where is None:
            return
        values = ((time.time() - ex.start) * 1000.0,) if ex.route is not None else ()
        if answered:
            attempt = (ex.upstream_time * 1000.0, (time.monotonic() - ex.upstream_start) * 1000.0)
            if connected:
                attempt = (ex.connect_time * 1000.0,) + attempt
            values += attempt + attempt       # the upstream's, then the backend's
        kept, i = where
        kept[i] = values

    def _template(self, route, upstream, backend, connected):
        names = [] if route is None else [self.route_names(route)[1]]
        if upstream is not None:
            for base in (self.upstream_name(upstream), self.backend_name(upstream, backend)):
                names += [base + t for t in ("connect", "ttfb", "total")[0 if connected else 1:]]
        return "\n".join(f"{name}:%.3f|ms" for name in names)

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
