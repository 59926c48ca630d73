"""The Redis rate-limit store against a real redis-server: the Lua script
decides exactly as gproxy/ratelimit.py; two gproxy instances share buckets;
Redis paused or stopped mid-run is decided by on_error within the timeout,
logged once per interval and counted in a metric."""

import http.client
import os
import shutil
import signal
import subprocess
import time

import pytest

from monitoring import StatsdListener
from servers import free_port, wait_until
from test_ratelimit_unit import TRANSCRIPT_10S_BURST2

from gproxy import config, ratelimit
from gproxy.ratestore import RedisStore

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server missing: run .ci/install")


class RedisServer:
    """redis-server on a free loopback port, no persistence, in a temp dir."""

    def __init__(self, workdir, port=None):
        self.port = port or free_port()
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir],
            stdout=open(os.path.join(self.workdir, "redis.log"), "ab"), stderr=subprocess.STDOUT)
        wait_until(self.ping, 10, f"redis-server on port {self.port}")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def ping(self):
        import socket
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    servers = []

    def start(port=None):
        servers.append(RedisServer(tmp_path / f"redis{len(servers)}", port))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()


def store_cfg(url, **kw):
    extra = "".join(f", {k}: {v}" for k, v in kw.items())
    return config.parse(f'rate_limit_store: {{url: "{url}"{extra}}}').rate_limit_store


def test_lua_script_decides_exactly_as_the_python_module(redis_server):
    r = redis_server()
    store = RedisStore(store_cfg(r.url, timeout="2s"), lambda: None)
    p = ratelimit.policy(10, 1, burst=2)
    t0 = 10**15     # microseconds, the order of Redis TIME
    got = [(ms, store.decide(b"t|10/1|2", p, b"k", now=t0 + ms * 1000).allowed)
           for ms, _ in TRANSCRIPT_10S_BURST2]
    assert got == TRANSCRIPT_10S_BURST2
    keys = store.client.keys("gproxy:rl:*")
    assert len(keys) == 1 and b"k" not in keys[0].split(b":")[-1], keys   # stored as a digest
    assert 0 < store.client.pttl(keys[0]) <= 401, "a bucket expires once it would be full again"
    store.close()


def conf(b, url, on_error="allow", statsd_port=None, timeout="2s"):
    statsd = f"statsd: {{port: {statsd_port}}}" if statsd_port else ""
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 2
{statsd}
rate_limit_store: {{url: "{url}", timeout: {timeout}, on_error: {on_error}}}
upstreams:
  api: {{backends: ["{b.url}"]}}
routes:
  - {{path_prefix: /free/, upstream: api}}
  - {{path_prefix: /, upstream: api, name: shared, rate_limit: {{rate: 1/m, burst: 2, key: route}}}}
"""


def timed_status(g, path):
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    t0 = time.monotonic()
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status, time.monotonic() - t0


def status(g, path="/"):
    return timed_status(g, path)[0]


def test_two_instances_share_buckets_through_redis(gproxy, backends, redis_server):
    b, = backends(1)
    r = redis_server()
    g1, g2 = gproxy(conf(b, r.url)), gproxy(conf(b, r.url))
    got = [status(g1), status(g2), status(g1), status(g2), status(g1)]
    assert got == [200, 200, 200, 429, 429], got
    assert len(b.received) == 3


def test_redis_paused_then_stopped_is_decided_by_on_error_within_the_timeout(gproxy, backends,
                                                                             redis_server):
    b, = backends(1)
    r = redis_server()
    lst = StatsdListener()
    try:
        allow = gproxy(conf(b, r.url, "allow", lst.port, timeout="250ms"))
        deny = gproxy(conf(b, r.url.replace("/0", "/1"), "deny", timeout="250ms"))
        for g in (allow, deny):
            assert [status(g) for _ in range(4)] == [200, 200, 200, 429]
        os.kill(r.proc.pid, signal.SIGSTOP)         # Redis hangs: connections open, no answers
        hung = [timed_status(allow, "/") for _ in range(3)] + [timed_status(deny, "/") for _ in range(3)]
        assert [s for s, _ in hung] == [200] * 3 + [503] * 3, hung
        # each waited for the 250 ms timeout, and not much longer (the slack is
        # for a loaded 2-core box; without the bound they would hang for good)
        assert all(0.2 < t < 1.5 for _, t in hung), hung
        assert timed_status(allow, "/free/x")[0] == 200
        r.stop()                                    # Redis gone: connections refused
        gone = [status(allow) for _ in range(3)] + [status(deny) for _ in range(3)]
        assert gone == [200] * 3 + [503] * 3, gone
        wait_until(lambda: lst.counters("gproxy.rate_limit_store.errors").get(
            "gproxy.rate_limit_store.errors", 0) >= 6, 5, "six store errors counted")
        assert lst.counters("gproxy.rate_limit_store.errors") == {"gproxy.rate_limit_store.errors": 6}
    finally:
        lst.close()
    for g in (allow, deny):
        lines = [x for x in g.stderr().splitlines() if "rate_limit_store redis://" in x]
        # at most one line per worker per 10 s, though six decisions failed
        assert 1 <= len(lines) <= 2, lines
    recs = [x for x in deny.access_records(at_least=10) if x["status"] == 503]
    assert len(recs) == 6 and all(x["reason"] == "rate_limit_store_error" for x in recs), recs
    # Redis back (empty): limiting resumes
    r2 = redis_server(port=r.port)
    assert r2.port == r.port
    wait_until(lambda: status(deny) == 200, 5, "deny instance admitting again once Redis is back")
