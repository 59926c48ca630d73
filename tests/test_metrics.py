"""Metrics through real gunicorn: a UDP listener in the test receives the
exact StatsD packets for a scripted sequence of requests."""

import http.client
import os

import pytest

from monitoring import StatsdListener, free_udp_port, settle, wait_until
from servers import free_port


@pytest.fixture
def listener():
    lst = StatsdListener()
    yield lst
    lst.close()


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


def get(g, path, method="GET", body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def metrics_conf(port, live, pair_live, extra_statsd=""):
    """web.pool: one live backend with a 300 ms header timeout; pair: a dead
    and a live backend (round robin tries the dead one first); gone: two
    dead backends; every name has a dot or colon to sanitise."""
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
statsd: {{host: 127.0.0.1, port: {port}, prefix: gp.test{extra_statsd}}}
upstreams:
  web.pool:
    backends: ["{live.url}"]
    timeouts: {{response_header: 300ms}}
    retries: 0
  pair:
    backends: ["{dead_url()}", "{pair_live.url}"]
  gone:
    backends: ["{dead_url()}", "{dead_url()}"]
routes:
  - {{path_prefix: /pair/, upstream: pair, name: pair}}
  - {{path_prefix: /gone/, upstream: gone, name: gone}}
  - {{path_prefix: /, upstream: web.pool, name: main.v1}}
"""


def test_scripted_requests_send_exact_metrics(gproxy, backends, listener):
    live, pair_live = backends(2)
    g = gproxy(metrics_conf(listener.port, live, pair_live))
    sent_out = 0
    script = [
        ("GET", "/echo", None, 200),
        ("POST", "/echo", b"x" * 100, 200),
        ("GET", "/status/404", None, 404),
        ("GET", "/sleep/1500", None, 504),     # no response header within 300 ms
        ("GET", "/pair/a", None, 200),          # dead backend ejected, retried on the live one
        ("GET", "/gone/a", None, 502),          # both dead: both ejected
        ("GET", "/gone/b", None, 503),          # nothing left to choose
    ]
    for method, path, body, want in script:
        status, data = get(g, path, method, body)
        assert status == want, f"{method} {path}: got {status}, want {want}"
        sent_out += len(data)
    p = "gp.test."
    wait_until(lambda: sum(v for k, v in listener.counters(p + "server.responses.").items()) >= 7,
               10, "7 recorded responses")
    backend = "backend.127_0_0_1_" + str(live.port)
    pair_backend = "backend.127_0_0_1_" + str(pair_live.port)
    counters = listener.counters(p)
    errors = {k: v for k, v in counters.items() if ".errors." in k or k.endswith(".ejected")}
    dead_pair = [k for k in errors if k.startswith(p + "upstream.pair.backend.")]
    assert len(dead_pair) == 2, errors     # errors.connect_error and ejected of the dead one
    gone = sorted(k for k in errors if k.startswith(p + "upstream.gone.backend."))
    assert len(gone) == 4, errors          # two backends x (errors.connect_error, ejected)
    assert all(errors[k] == 1 for k in dead_pair + gone), errors
    # the supervisor's view of the same failures: only the dead backends go down
    health = {k: v for k, v in counters.items() if ".health." in k}
    assert all(k.endswith(".health.down") for k in health), health
    assert not any(f"127_0_0_1_{b.port}" in k for k in health for b in (live, pair_live)), health
    rest = {k: v for k, v in counters.items() if k not in dead_pair + gone and k not in health}
    assert rest == {
        p + "server.responses.2xx": 3, p + "server.responses.4xx": 1, p + "server.responses.5xx": 3,
        p + "route.main_v1.requests.2xx": 2, p + "route.main_v1.requests.4xx": 1,
        p + "route.main_v1.requests.5xx": 1, p + "route.pair.requests.2xx": 1,
        p + "route.gone.requests.5xx": 2,
        p + "server.bytes_in": 100, p + "server.bytes_out": sent_out,
        p + "server.errors.timeout": 1, p + "server.errors.connect_error": 3,
        p + "server.errors.no_backend": 1,
        p + "upstream.web_pool.errors.timeout": 1, p + f"upstream.web_pool.{backend}.errors.timeout": 1,
        p + "upstream.pair.errors.connect_error": 1, p + "upstream.pair.retries": 1,
        p + "upstream.gone.errors.connect_error": 2, p + "upstream.gone.retries": 1,
        p + "upstream.gone.errors.no_backend": 1,
    }, counters
    timers = {k: len(v) for k, v in listener.timers(p).items()}
    # The first request opened the one connection to web.pool's backend and
    # the other three reused it (a connect timer only for a new connection);
    # the timed-out attempt has no timings.
    assert live.connections == 1 and pair_live.connections == 1
    assert timers == {
        p + "route.main_v1.duration": 4, p + "route.pair.duration": 1, p + "route.gone.duration": 2,
        p + "upstream.web_pool.connect": 1, p + "upstream.web_pool.ttfb": 3,
        p + "upstream.web_pool.total": 3,
        p + f"upstream.web_pool.{backend}.connect": 1, p + f"upstream.web_pool.{backend}.ttfb": 3,
        p + f"upstream.web_pool.{backend}.total": 3,
        p + "upstream.pair.connect": 1, p + "upstream.pair.ttfb": 1, p + "upstream.pair.total": 1,
        p + f"upstream.pair.{pair_backend}.connect": 1, p + f"upstream.pair.{pair_backend}.ttfb": 1,
        p + f"upstream.pair.{pair_backend}.total": 1,
    }, timers
    t = listener.timers(p)
    assert all(v >= 0 for vs in t.values() for v in vs)
    assert t[p + "upstream.web_pool.ttfb"][0] <= t[p + "upstream.web_pool.total"][0]
    assert max(t[p + "route.main_v1.duration"]) >= 300, "the 504 waited 300 ms"
    wait_until(lambda: p + "upstream.web_pool.backends.available" in listener.gauges(p), 10,
               "the supervisor's gauge of available backends")
    gauges = listener.gauges(p)
    # the supervisor's absolute gauges of available backends per upstream
    available = {k: v for k, v in gauges.items() if k.endswith(".backends.available")}
    assert set(available) <= {p + f"upstream.{u}.backends.available" for u in ("web_pool", "pair", "gone")}
    assert available[p + "upstream.web_pool.backends.available"][-1] == "1"
    gauges = {k: v for k, v in gauges.items() if k not in available}
    # active gauges are absolute values from the supervisor, never deltas
    assert p + "server.connections.active" in gauges and p + "tunnel.active" in gauges, gauges
    assert all(v.isdigit() for vs in gauges.values() for v in vs), gauges
    active = (p + "server.connections.active", p + f"upstream.web_pool.{backend}.active")
    wait_until(lambda: all(listener.gauges(p)[k][-1] == "0" for k in active), 5,
               "the active gauges back to 0 (sent every second)")
    assert "statsd" not in g.stderr(), g.stderr()


@pytest.mark.parametrize("stop", ["term", "quit", "hup"])
def test_a_stopping_worker_sends_the_sums_it_holds(gproxy, backends, listener, stop):
    """Counters are summed per worker and timers queued for flush_interval
    (here a minute); a worker that exits (graceful stop, fast stop, or
    replaced by a reload) sends them first, so no count is lost."""
    b, other = backends(2)
    g = gproxy(metrics_conf(listener.port, b, other, extra_statsd=", flush_interval: 60s"))
    sent_out = 0
    for _ in range(5):
        status, data = get(g, "/x")
        assert status == 200, f"got {status}, want 200"
        sent_out += len(data)
    p = "gp.test."
    assert listener.counters(p + "server.") == {}, "sent before the flush interval"
    if stop == "hup":
        g.hup()
    else:
        g.stop(graceful=stop == "term")
    want = {p + "server.responses.2xx": 5, p + "route.main_v1.requests.2xx": 5,
            p + "server.bytes_out": sent_out}
    got = settle(lambda: {k: v for k, v in listener.counters(p).items() if k in want}, want, 10)
    assert got == want, got
    # summed in the worker: one line per counter, not one per request
    lines = listener.parsed(p + "server.responses.")
    assert lines == [(p + "server.responses.2xx", "5", "c")], lines
    timers = {k: len(v) for k, v in listener.timers(p + "route.").items()}
    assert timers == {p + "route.main_v1.duration": 5}, timers


def test_a_busy_worker_sends_a_sample_of_its_timers_with_the_rate(gproxy, backends, listener):
    """timer_samples: 1 a second over a 5 s interval: a worker keeps 5
    requests' timer values per template and sends them with their rate,
    from which StatsD counts the 20 requests again; the counters are exact."""
    b, other = backends(2)
    g = gproxy(metrics_conf(listener.port, b, other, extra_statsd=", flush_interval: 5s, timer_samples: 1"))
    for _ in range(20):
        assert get(g, "/x")[0] == 200
    g.stop()
    p = "gp.test."
    assert listener.counters(p + "server.responses.") == {p + "server.responses.2xx": 20}
    lines = [ln for ln in listener.lines() if ln.startswith(p + "route.main_v1.duration:")]
    # A request that opened a connection (the first, at least) has connect
    # lines: a template of its own, so at most 5 + 5 lines, at least 5 rated.
    rated = [ln for ln in lines if "|@" in ln]
    assert len(lines) <= 10 and len(rated) >= 5, lines
    counted = sum(1 / float(ln.rsplit("@", 1)[1]) if "|@" in ln else 1 for ln in lines)
    assert round(counted, 3) == 20, f"StatsD would count {counted} requests"


def test_gunicorn_metrics_live_under_their_own_branch(gproxy, backends, listener):
    b, other = backends(2)
    g = gproxy(metrics_conf(listener.port, b, other, extra_statsd=", gunicorn: true"))
    for _ in range(3):
        assert get(g, "/x")[0] == 200
    wait_until(lambda: listener.counters("gp.test.server.responses.2xx").get(
        "gp.test.server.responses.2xx") == 3, 10, "gproxy's 3 responses")
    wait_until(lambda: any(n == "gp.test.gunicorn.workers" for n, _, _ in listener.parsed()), 10,
               "gunicorn's workers gauge")
    names = {n for n, _, _ in listener.parsed()}
    theirs = {n for n in names if n.startswith("gp.test.gunicorn.")}
    ours = names - theirs
    # gproxy serves HTTP itself: gunicorn's per-request metrics are gproxy's server.* ones
    assert not any(n.startswith("gp.test.gunicorn.request") for n in theirs), sorted(theirs)
    assert all(n.startswith(("gp.test.server.", "gp.test.route.", "gp.test.upstream.", "gp.test.tunnel."))
               for n in ours), sorted(ours)


def test_statsd_unreachable_requests_succeed_and_it_is_logged_once(gproxy, backends):
    b, = backends(1)
    port = free_udp_port()      # nothing listens there
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
statsd: {{host: 127.0.0.1, port: {port}}}
upstreams:
  web: {{backends: ["{b.url}"]}}
routes: [{{upstream: web}}]
""")
    for i in range(30):
        status, data = get(g, f"/n{i}")
        assert status == 200, f"request {i}: got {status}"
    assert len(b.received) == 30
    worker = str(g.worker_pids()[0])

    def worker_logged():
        # The refusal (ICMP) comes back on the send after the first: the
        # worker sends once per flush interval, so keep it sending.
        assert get(g, "/more")[0] == 200
        return f"[{worker}] [ERROR] gproxy.error: statsd" in g.stderr()
    wait_until(worker_logged, 5, "the worker's statsd failure in the error log")
    lines = [line for line in g.stderr().splitlines() if "statsd" in line]
    # once per process: the worker (its counters) and the supervisor (the gauges)
    pids = [line.split("] [")[1] for line in lines]
    assert len(pids) == len(set(pids)) <= 2 and worker in pids, lines
    assert all(f"127.0.0.1:{port}" in line and "refused" in line.lower() for line in lines), lines
    sent = len(b.received)      # every request got its answer: the backend saw them all
    assert sent > 30 and len(g.access_records(sent)) == sent
    assert os.path.exists(g.config_path)
