"""The supervisor's live figures for operators: the ``traffic`` part of
``/status`` and the Prometheus exposition of ``/metrics``.

Both read one snapshot of the workers' summed counters (``counters.Totals``)
and the health state; neither touches a worker.

Why a custom collector and not prometheus_client's multiprocess mode: that
mode takes a lock and writes an mmap'd file per metric on every increment
(1.5 us a counter, 3.1 us a histogram observation, against 0.23 us for a
slot of ``counters``), and a scrape reads and merges every worker's files.
The figures are summed here already, so the collector only formats them
(the numbers are in bench/README.md).
"""

import time

from .counters import BOUNDS, CLASSES, percentile

QUANTILES = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99))


def _quantiles(counts):
    out = {}
    for name, q in QUANTILES:
        v = percentile(counts, q) if counts else None
        out[name] = None if v is None else round(v * 1000.0, 3)
    return out


def _add(into, counts):
    if counts is None:
        return into
    return counts[:] if into is None else [a + b for a, b in zip(into, counts)]


def traffic(cfg, sums, window, workers, window_s):
    """The figures of /status: per upstream and backend, per route, server."""
    get = sums.get
    ups = {}
    for up in cfg.upstreams.values():
        backends = []
        for b in up.backends:
            hist = None
            requests = dict.fromkeys(CLASSES, 0)
            nbytes = [0, 0]
            for r in cfg.routes:
                if r.upstream != up.name:
                    continue
                key = (r.name, up.name, b.name)
                hist = _add(hist, window.get(key))
                for c in CLASSES:
                    requests[c] += get(("requests", *key, c), 0)
                nbytes[0] += get(("bytes_in", *key), 0)
                nbytes[1] += get(("bytes_out", *key), 0)
            errors = {n[3]: v for n, v in sums.items()
                      if n[0] == "errors" and n[1] == up.name and n[2] == b.name and v}
            backends.append({"name": b.name, "active": get(("active", up.name, b.name), 0),
                             "attempts": get(("attempts", up.name, b.name), 0),
                             "requests": requests, "errors": errors,
                             "bytes_in": nbytes[0], "bytes_out": nbytes[1], **_quantiles(hist)})
        errors = {n[3]: v for n, v in sums.items()
                  if n[0] == "errors" and n[1] == up.name and n[2] == "" and v}
        ups[up.name] = {"retries": get(("retries", up.name), 0), "errors": errors, "backends": backends}
    routes = {}
    for r in cfg.routes:
        keys = [(r.name, r.upstream, b.name) for b in cfg.upstreams[r.upstream].backends]
        keys.append((r.name, r.upstream, ""))
        hist = None
        for key in keys:
            hist = _add(hist, window.get(key))
        routes[r.name] = {"upstream": r.upstream,
                          "requests": {c: sum(get(("requests", *k, c), 0) for k in keys) for c in CLASSES},
                          **_quantiles(hist)}
    total = dict.fromkeys(CLASSES, 0)
    for n, v in sums.items():
        if n[0] == "requests":
            total[n[4]] += v
    return {
        "window_s": window_s,
        "server": {"requests": total, "requests_active": get(("requests_active",), 0),
                   "tunnels_active": get(("tunnels_active",), 0), "tunnels": get(("tunnels",), 0),
                   "errors": {n[3]: v for n, v in sums.items() if n[0] == "errors" and n[1] == "" and v}},
        "upstreams": ups, "routes": routes, "workers": workers,
    }


# --- Prometheus ------------------------------------------------------------------

class Collector:
    """A prometheus_client collector over one snapshot of the supervisor."""

    def __init__(self, sup):
        self.sup = sup

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        sums, _, workers = self.sup.live.snapshot()
        fam = {
            "requests": CounterMetricFamily(
                "gproxy_requests", "Requests answered, by route, upstream, backend and status class",
                labels=("route", "upstream", "backend", "code_class")),
            "bytes_in": CounterMetricFamily(
                "gproxy_request_bytes", "Request body bytes received from clients",
                labels=("route", "upstream", "backend")),
            "bytes_out": CounterMetricFamily(
                "gproxy_response_bytes", "Response body bytes sent to clients",
                labels=("route", "upstream", "backend")),
            "attempts": CounterMetricFamily(
                "gproxy_upstream_attempts", "Attempts sent to a backend (a retry is one more)",
                labels=("upstream", "backend")),
            "errors": CounterMetricFamily(
                "gproxy_errors", "Failures by kind (per attempt for backend faults)",
                labels=("upstream", "backend", "kind")),
            "retries": CounterMetricFamily(
                "gproxy_upstream_retries", "Requests retried on another backend",
                labels=("upstream",)),
            "active": GaugeMetricFamily(
                "gproxy_backend_active_requests", "Requests in flight to a backend, all workers",
                labels=("upstream", "backend")),
        }
        hist = HistogramMetricFamily(
            "gproxy_request_duration_seconds", "Time from request to the end of the response",
            labels=("route", "upstream", "backend"))
        buckets = {}
        for name, v in sums.items():
            f = fam.get(name[0])
            if f is not None:
                f.add_metric(list(map(str, name[1:])), v)
            elif name[0] == "duration_bucket":
                buckets.setdefault(name[1:4], [0] * (len(BOUNDS) + 1))[name[4]] += v
        for key, counts in sorted(buckets.items()):
            cum, acc = [], 0
            for le, c in zip([*map(repr, BOUNDS), "+Inf"], counts):
                acc += c
                cum.append((le, acc))
            hist.add_metric(list(key), cum, sums.get(("duration_sum_us", *key), 0) / 1e6)
        yield from fam.values()
        yield hist
        yield from self.server(sums, workers)
        yield from self.health()

    def server(self, sums, workers):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        yield GaugeMetricFamily("gproxy_active_requests", "Requests in progress, all workers",
                                value=sums.get(("requests_active",), 0))
        yield GaugeMetricFamily("gproxy_tunnels_active", "Open CONNECT and WebSocket tunnels",
                                value=sums.get(("tunnels_active",), 0))
        yield CounterMetricFamily("gproxy_tunnels", "Tunnels opened", value=sums.get(("tunnels",), 0))
        t = CounterMetricFamily("gproxy_tunnel_bytes", "Tunnel bytes, by direction", labels=("direction",))
        t.add_metric(["up"], sums.get(("tunnel_bytes_up",), 0))
        t.add_metric(["down"], sums.get(("tunnel_bytes_down",), 0))
        yield t
        yield GaugeMetricFamily("gproxy_workers", "Workers publishing live figures", value=len(workers))

    def health(self):
        from prometheus_client.core import GaugeMetricFamily
        from . import __version__
        sup = self.sup
        up = GaugeMetricFamily("gproxy_backend_up", "1 when the backend is available (healthy, "
                               "not ejected, not drained)", labels=("upstream", "backend"))
        avail = GaugeMetricFamily("gproxy_upstream_available_backends",
                                  "Available backends of an upstream", labels=("upstream",))
        with sup.lock:
            now = time.monotonic()
            counts = {}
            for (u, b), bh in sup.backends.items():
                ok = bh.state(now) == "up"
                up.add_metric([u, b], 1 if ok else 0)
                counts[u] = counts.get(u, 0) + ok
        for u, n in counts.items():
            avail.add_metric([u], n)
        info = GaugeMetricFamily("gproxy_info", "gproxy version", labels=("version",))
        info.add_metric([__version__], 1)
        yield from (up, avail, info)


def exposition(sup):
    """The /metrics body (Prometheus text format 0.0.4) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(sup))
    return generate_latest(registry), CONTENT_TYPE_LATEST
