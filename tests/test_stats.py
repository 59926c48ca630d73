"""gproxy.stats on its own: names, sanitising, and the exact packets each
call sends to a real UDP listener on 127.0.0.1."""

import logging
import socket
import time

import pytest

from gproxy import config, stats
from monitoring import StatsdListener, free_udp_port, wait_until


@pytest.fixture
def listener():
    lst = StatsdListener()
    yield lst
    lst.close()


def make(port, prefix="gproxy", **kw):
    extra = "".join(f"\n  {k}: {v}" for k, v in kw.items())
    cfg = config.parse(f"statsd:\n  host: 127.0.0.1\n  port: {port}\n  prefix: {prefix}{extra}\n")
    return stats.Stats(cfg.statsd)


@pytest.mark.parametrize("name, want", [
    ("api", "api"),
    ("api.v1", "api_v1"),
    ("127.0.0.1:8081", "127_0_0_1_8081"),
    ("[::1]:8080", "___1__8080"),
    ("backend-2_b", "backend-2_b"),
    ("sp ace/é", "sp_ace__"),
    ("0", "0"),
    ("", "_"),
])
def test_sanitize(name, want):
    assert stats.sanitize(name) == want, f"got {stats.sanitize(name)!r}, want {want!r}"


@pytest.mark.parametrize("status, want", [(101, "1xx"), (200, "2xx"), (304, "3xx"), (404, "4xx"),
                                          (499, "4xx"), (502, "5xx"), (0, "other"), (600, "other")])
def test_status_class(status, want):
    assert stats.status_class(status) == want


def test_names_are_built_once_under_the_prefix(listener):
    s = make(listener.port, prefix="prod.edge-1")
    assert s.route_names("api.v1")[0]["2xx"] == "prod.edge-1.route.api_v1.requests.2xx"
    assert s.route_names("api.v1")[1] == "prod.edge-1.route.api_v1.duration"
    assert s.route_names("api.v1") is s.route_names("api.v1")
    assert s.backend_name("web.pool", "127.0.0.1:8081") == \
        "prod.edge-1.upstream.web_pool.backend.127_0_0_1_8081."


def test_health_and_tunnel_packets(listener):
    s = make(listener.port)
    s.health_available("api", 2)
    s.health_state_changed("api", "127.0.0.1:8081", False)
    s.health_state_changed("api", "127.0.0.1:8081", True)
    s.health_check_latency("api", "127.0.0.1:8081", 0.0125)
    s.tunnel_opened()
    s.tunnel_closed(bytes_up=300, bytes_down=4000, seconds=1.5)
    s.tunnel_opened()
    s.tunnel_closed(bytes_up=0, bytes_down=0, seconds=0.25)
    s.active_gauges(3, 0, {("api", "127.0.0.1:8081"): 2})
    want = [
        "gproxy.upstream.api.backends.available:2|g",
        "gproxy.upstream.api.backend.127_0_0_1_8081.health.down:1|c",
        "gproxy.upstream.api.backend.127_0_0_1_8081.health.up:1|c",
        "gproxy.upstream.api.backend.127_0_0_1_8081.health.check:12.500000|ms",
        "gproxy.tunnel.opened:1|c",
        "gproxy.tunnel.bytes_up:300|c",
        "gproxy.tunnel.bytes_down:4000|c", "gproxy.tunnel.duration:1500.000000|ms",
        "gproxy.tunnel.opened:1|c",
        "gproxy.tunnel.duration:250.000000|ms",
        # the supervisor's absolute gauges (no +1/-1 deltas that could drift)
        "gproxy.server.connections.active:3|g", "gproxy.tunnel.active:0|g",
        "gproxy.upstream.api.backend.127_0_0_1_8081.active:2|g",
    ]
    wait_until(lambda: len(listener.lines()) >= len(want), 5, "the packets")
    assert listener.lines() == want


def test_disabled_sends_nothing_and_costs_no_socket(listener):
    cfg = config.parse(f"statsd: {{enabled: false, port: {listener.port}}}\n").statsd
    s = stats.Stats(cfg)
    assert s.client is None
    s.request_started()
    s.health_available("api", 1)
    s.tunnel_opened()
    time.sleep(0.2)     # nothing is expected: give a stray datagram time to arrive
    assert listener.lines() == []
    assert stats.Stats(config.parse("workers: 1").statsd).client is None, "metrics must be off without a statsd section"


def test_unresolvable_host_turns_metrics_off_logged_once(caplog):
    # A label longer than 63 characters fails in the IDNA encoder, before
    # any DNS query leaves the machine.
    bad = "x" * 64 + ".invalid"
    cfg = config.parse(f"statsd: {{host: {bad}, port: 8125}}\n").statsd
    with caplog.at_level(logging.ERROR, logger="gproxy.error"):
        s = stats.Stats(cfg)
        s.request_started()
        s.health_available("api", 1)
    assert s.client is None
    msgs = [r.getMessage() for r in caplog.records if "statsd" in r.getMessage()]
    assert len(msgs) == 1 and "metrics are off" in msgs[0], msgs


def test_nobody_listening_is_logged_once_and_never_raises(caplog):
    port = free_udp_port()      # nothing listens: the kernel answers ICMP port unreachable
    s = make(port)
    with caplog.at_level(logging.ERROR, logger="gproxy.error"):
        for _ in range(50):
            s.health_available("api", 1)
            s.tunnel_opened()
            time.sleep(0.002)
    msgs = [r.getMessage() for r in caplog.records if "statsd" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert f"127.0.0.1:{port}" in msgs[0] and "refused" in msgs[0].lower(), msgs[0]


def test_a_full_socket_buffer_drops_instead_of_waiting(listener):
    s = make(listener.port)
    s.client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t0 = time.perf_counter()
    for _ in range(5000):
        s.health_check_latency("api", "b", 0.001)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"5000 sends took {elapsed:.2f}s"
    assert listener.lines(), "nothing arrived"


def _answered(route="api", upstream="web", backend="127.0.0.1:8081"):
    from gproxy.exchange import Exchange
    ex = Exchange({"REQUEST_METHOD": "GET", "RAW_URI": "/", "REMOTE_ADDR": "127.0.0.1"})
    ex.route, ex.upstream, ex.backend, ex.status = route, upstream, backend, 200
    ex.upstream_time, ex.upstream_start = 0.001, time.monotonic() - 0.002
    return ex


def test_timers_beyond_timer_samples_are_a_reservoir_sent_with_their_rate(listener, monkeypatch):
    """keep = timer_samples x flush_interval = 2. Requests 1 and 2 are kept;
    request n > 2 replaces kept slot int(draw * n) when that is under 2. With
    the draws below, request 3 replaces slot 0 (0.1 * 3), request 4 is
    dropped (0.9 * 4 = 3), request 5 replaces slot 1 (0.3 * 5 = 1): sent are
    requests 3 and 5 with rate 2/5, and the counters count all five."""
    draws = iter([0.1, 0.9, 0.3])
    monkeypatch.setattr(stats, "_random", lambda: next(draws))
    s = make(listener.port, timer_samples=20, flush_interval="100ms")
    assert s.client.keep == 2
    s.client.start_flusher = lambda: None       # flushed by hand below
    s.client.flusher = True
    for ms in (1, 2, 3, 4, 5):
        ex = _answered()
        ex.start = time.time() - ms / 1000.0
        s.record(ex)
    s.client.flush()
    wait_until(lambda: listener.counters("gproxy.server.") and listener.timers("gproxy.route."), 5,
               "the flushed lines")
    assert listener.counters("gproxy.server.responses.") == {"gproxy.server.responses.2xx": 5}
    lines = [ln for ln in listener.lines() if ln.startswith("gproxy.route.api.duration:")]
    assert [ln.split("|", 1)[1] for ln in lines] == ["ms|@0.400000"] * 2, lines
    assert [round(float(ln.split(":")[1].split("|")[0])) for ln in lines] == [3, 5], lines
    backend = [ln for ln in listener.lines() if ".backend.127_0_0_1_8081.ttfb:" in ln]
    assert backend == ["gproxy.upstream.web.backend.127_0_0_1_8081.ttfb:1.000|ms|@0.400000"] * 2, backend


def test_timers_within_timer_samples_all_go_without_a_rate(listener):
    s = make(listener.port, timer_samples=1000, flush_interval="100ms")
    s.client.start_flusher = lambda: None
    s.client.flusher = True
    for _ in range(30):
        s.record(_answered())
    s.client.flush()
    wait_until(lambda: len(listener.timers("gproxy.route.").get("gproxy.route.api.duration", [])) == 30, 5,
               "30 duration lines")
    assert not any("|@" in ln for ln in listener.lines()), listener.lines()
