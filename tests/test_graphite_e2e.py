"""End to end with the real components: gproxy -> the StatsD daemon (npm
``statsd`` on Node) -> Graphite's carbon-cache -> whisper files, read back
with whisper-fetch. Both daemons run with ops/monitoring's configs (1 s
flush for the test), on free loopback ports, with a temporary whisper tree.
"""

import json
import os
import re
import time

import pytest

from gproxy import config, stats
from monitoring import Carbon, NodeStatsd, settle, wait_until
from servers import REPO, free_port, get_status


@pytest.fixture
def graphite(tmp_path):
    carbon = Carbon(tmp_path / "carbon")
    daemon = None
    try:
        carbon.start()
        daemon = NodeStatsd(tmp_path, carbon).start()
        yield carbon, daemon
    finally:
        if daemon is not None:
            daemon.stop()
        carbon.stop()


def test_metrics_reach_graphite_whisper_files(gproxy, backends, graphite):
    carbon, daemon = graphite
    live, healthy = backends(2)
    flaky = backends(1)[0]
    since = time.time()
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 2
statsd: {{port: {daemon.port}, prefix: gproxy}}
upstreams:
  api:
    backends: ["{live.url}"]
    timeouts: {{response_header: 300ms}}
    retries: 0
  pool:
    backends: ["{flaky.url}", "{healthy.url}"]
    passive: {{max_fails: 1, fail_timeout: 30s}}
  down:
    backends: ["http://127.0.0.1:{free_port()}"]
routes:
  - {{path_prefix: /pool/, upstream: pool, name: pool}}
  - {{path_prefix: /down/, upstream: down, name: down}}
  - {{path_prefix: /, upstream: api, name: api.v1}}
""")
    assert [get_status(g, "/ok") for _ in range(10)] == [200] * 10
    assert get_status(g, "/status/404") == 404
    assert get_status(g, "/sleep/1000") == 504
    assert [get_status(g, "/pool/a") for _ in range(4)] == [200] * 4
    flaky.stop()                        # a backend goes away: ejected, traffic moves on
    assert [get_status(g, "/pool/b") for _ in range(6)] == [200] * 6
    assert get_status(g, "/down/x") == 502    # its one backend refuses connections

    def total(metric):
        return sum(v for _, v in carbon.fetch(metric, since))

    c = "stats.counters.gproxy."
    want = {
        c + "route.api_v1.requests.2xx.count": 10,
        c + "route.api_v1.requests.4xx.count": 1,
        c + "route.api_v1.requests.5xx.count": 1,
        c + "route.down.requests.5xx.count": 1,
        c + "route.pool.requests.2xx.count": 10,
        c + "server.responses.2xx.count": 20,
        c + "server.responses.5xx.count": 2,
        c + "server.errors.timeout.count": 1,
        c + "upstream.api.errors.timeout.count": 1,
        c + "upstream.down.errors.connect_error.count": 1,
    }
    got = settle(lambda: {m: total(m) for m in want}, want, 30)
    assert got == want, (got, carbon.metrics(), daemon.log(), carbon.log())
    flaky_name = f"upstream.pool.backend.127_0_0_1_{flaky.port}"
    ejected = wait_until(lambda: total(c + flaky_name + ".ejected.count"), 20, "the ejection")
    assert 1 <= ejected <= 2, ejected     # once per worker that met the dead backend
    # a pooled connection finds it gone (reset), a new one is refused (connect_error)
    failures = sum(total(f"{c}{flaky_name}.errors.{kind}.count") for kind in ("reset", "connect_error"))
    assert failures == ejected, (failures, ejected)
    assert total(c + "upstream.pool.retries.count") == ejected, "each failure was retried"
    t = "stats.timers.gproxy.upstream.api."
    wait_until(lambda: carbon.fetch(t + "ttfb.upper_99", since), 10, "the ttfb percentiles")
    ttfb_count = total(t + "ttfb.count")
    assert ttfb_count == 11, ttfb_count          # 10 x 200 + the 404
    p99 = max(v for _, v in carbon.fetch(t + "ttfb.upper_99", since))
    assert 0 < p99 < 1000, f"p99 time to first byte {p99} ms"
    backend_ttfb = f"stats.timers.gproxy.upstream.api.backend.127_0_0_1_{live.port}.ttfb.count"
    assert total(backend_ttfb) == 11
    assert carbon.fetch("stats.timers.gproxy.route.api_v1.duration.median", since)
    gauge = "stats.gauges.gproxy.server.connections.active"
    wait_until(lambda: carbon.fetch(gauge, since), 10, "the active connections gauge")
    assert carbon.fetch(gauge, since)[-1][1] == 0, "every request ended"
    bytes_out = total(c + "server.bytes_out.count")
    assert bytes_out > 0


def dashboard_patterns():
    """Every metric path the dashboard queries, as a regex over stored names."""
    with open(os.path.join(REPO, "ops", "monitoring", "dashboard.json")) as f:
        targets = [t for graph in json.load(f) for t in graph["target"]]
    node = r"(?:[A-Za-z0-9_*]+|\{[A-Za-z0-9_,]+\})"
    paths = {m for t in targets for m in re.findall(rf"stats\.{node}(?:\.{node})*", t)}
    out = {}
    for path in paths:
        rx = re.escape(path).replace(r"\*", "[^.]*")
        rx = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(?:" + m.group(1).replace(",", "|") + ")", rx)
        out[path] = re.compile(rx + "$")
    return out


def test_dashboard_queries_match_stored_series(gproxy, backends, graphite):
    """Every series ops/monitoring/dashboard.json graphs exists after real
    traffic, plus the health and tunnel metrics sent the way the supervisor
    and the tunnel code send them."""
    carbon, daemon = graphite
    b, = backends(1)
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
statsd: {{port: {daemon.port}}}
upstreams: {{api: {{backends: ["http://127.0.0.1:{free_port()}", "{b.url}"]}}}}
routes: [{{upstream: api, name: api}}]
""")
    # the first request meets the dead backend: error, ejection, retry
    assert [get_status(g, "/ok"), get_status(g, "/status/503")] == [200, 503]
    supervisor = stats.Stats(config.parse(f"statsd: {{port: {daemon.port}}}").statsd)
    supervisor.health_available("api", 1)
    supervisor.health_state_changed("api", b.url[7:], False)
    supervisor.health_check_latency("api", b.url[7:], 0.004)
    supervisor.tunnel_opened()
    supervisor.tunnel_closed(100, 2000, 0.5)
    supervisor.close()
    patterns = dashboard_patterns()
    assert len(patterns) >= 14, sorted(patterns)
    g.stop()        # no more traffic; what was sent is flushed within a second

    def missing():
        names = carbon.metrics()
        return sorted(p for p, rx in patterns.items() if not any(rx.match(n) for n in names))
    left = settle(missing, [], 20)
    assert left == [], f"dashboard series with no data: {left}"
