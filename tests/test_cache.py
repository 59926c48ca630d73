"""The shared cache through real gunicorn with two workers: a response stored
by one worker is a hit in the other, concurrent misses reach the backend
once, eviction at max_size, a worker killed mid-write leaves no entry, the
body streams (RSS flat), revalidation, invalidation, purge, statistics.
"""

import email.utils
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from monitoring import StatsdListener
from servers import REPO, Backend, free_port, wait_until

BLOCK = hashlib.sha256(b"cache").digest() * 2048      # 64 KiB


class Origin(Backend):
    """A scripted backend: ``routes[path] = (status, [(name, value)], body)``
    (``body`` bytes, or a size to send in pattern blocks; ``fields`` may be
    a function of the request headers returning all three); ``hold[path]``
    is an Event the response waits on after ``hold_after`` bytes of body."""

    def __init__(self):
        super().__init__("origin")
        self.routes, self.hold, self.hold_after = {}, {}, 0
        self.handler = Origin._respond

    def requests(self, path):
        with self.lock:
            return [r for r in self.received if r.target.split("?")[0] == path]

    def count(self, path):
        return len(self.requests(path))

    def stop(self):
        for e in self.hold.values():
            e.set()
        super().stop()

    def _respond(self, req, conn):
        s, path = conn.sock, req.target.split("?")[0]
        status, fields, body = self.routes.get(path, (404, [], b"no route\n"))
        if callable(fields):
            status, fields, body = fields({n.lower(): v for n, v in req.headers})
        head = [f"HTTP/1.1 {status} X"] + [f"{n}: {v}" for n, v in fields]
        if isinstance(body, list):      # chunked, one chunk per item
            s.sendall(("\r\n".join(head + ["Transfer-Encoding: chunked"]) + "\r\n\r\n").encode()
                      + b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in body) + b"0\r\n\r\n")
            return True
        size = body if isinstance(body, int) else len(body)
        if status not in (204, 304):
            head.append(f"Content-Length: {size}")
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if req.method == "HEAD" or status in (204, 304):
            return True
        if isinstance(body, bytes):
            s.sendall(body)
            return True
        sent, gate = 0, self.hold.get(path)
        while sent < size:
            if gate is not None and sent >= self.hold_after:
                gate.wait(30)
                gate = None
            piece = BLOCK[:min(len(BLOCK), size - sent)]
            s.sendall(piece)
            sent += len(piece)
        return True


def big_digest(size):
    h = hashlib.sha256()
    for _ in range(size // len(BLOCK)):
        h.update(BLOCK)
    h.update(BLOCK[:size % len(BLOCK)])
    return h.hexdigest()


@pytest.fixture
def origin():
    o = Origin()
    yield o
    o.stop()


def conf(origin, cache_dir, route="cache: true", store="", workers=2, top=""):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
access_log: {{format: json}}
{top}
cache: {{path: {cache_dir}{store}}}
upstreams:
  o: {{backends: ["{origin.url}"], retries: 0, passive: {{max_fails: 0}}}}
routes:
  - {{path_prefix: /nocache/, upstream: o}}
  - {{upstream: o, {route}}}
"""


def get(g, path, method="GET", headers=None, conn=None):
    """(status, {lower name: value}, body) over a new connection (or ``conn``)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def serving_worker(g, conn):
    """The pid of the gproxy worker holding ``conn``'s server side (from
    /proc/net/tcp and the workers' file descriptors)."""
    local = conn.sock.getsockname()[1]
    want = f"0100007F:{g.port:04X} 0100007F:{local:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f:
            cols = line.split()
            if f"{cols[1]} {cols[2]}" == want:
                inode = cols[9]
    assert inode, f"no server socket for client port {local}"
    for pid in g.worker_pids():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    raise AssertionError(f"no worker holds socket {inode}")


def cache_cli(g, *args):
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "cache", *args, "--config", g.config_path],
                       capture_output=True, text=True, cwd=REPO, timeout=30,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- sharing, collapsing, eviction, crashes ---------------------------------------

def test_a_response_stored_by_one_worker_is_a_hit_in_the_other(gproxy, origin, tmp_path):
    date = email.utils.formatdate(usegmt=True)
    origin.routes["/a"] = (200, [("Cache-Control", "max-age=60"), ("ETag", '"1"'), ("Date", date)],
                           b"shared body")
    g = gproxy(conf(origin, tmp_path / "c"))
    first = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    status, h, body = get(g, "/a", conn=first)
    assert (status, h["x-cache-status"], body) == (200, "MISS", b"shared body")
    storer = serving_worker(g, first)
    for _ in range(60):
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        status, h, body = get(g, "/a", conn=c)
        other = serving_worker(g, c) != storer
        c.close()
        assert (status, h["x-cache-status"], body) == (200, "HIT", b"shared body")
        if other:
            break
    else:
        pytest.fail("60 connections all went to the worker that stored the response")
    first.close()
    assert origin.count("/a") == 1, f"the backend saw {origin.count('/a')} requests, want 1"
    assert int(h["age"]) >= 0
    assert h["date"] == date, "a stored response is sent with its own Date (RFC 9110 6.6.1)"


def test_concurrent_misses_reach_the_backend_once(gproxy, origin, tmp_path):
    origin.routes["/slow"] = (200, [("Cache-Control", "max-age=60")], 200_000)
    origin.hold["/slow"] = gate = threading.Event()
    # waiting for the lock is bounded by lock_timeout (nginx: then it goes
    # upstream itself); this test is about the collapsing, so the bound is
    # far above the time a loaded machine takes to start six clients
    g = gproxy(conf(origin, tmp_path / "c", store=", lock_timeout: 60s"))
    results = []

    def client():
        results.append(get(g, "/slow"))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: origin.count("/slow") >= 1, 10, "the first request at the backend")
    wait_until(lambda: _established(g.port) >= 6, 10, "six client connections to gproxy")
    gate.set()
    for t in threads:
        t.join(30)
    assert origin.count("/slow") == 1, f"the backend saw {origin.count('/slow')} requests, want 1"
    want = big_digest(200_000)
    assert [(s, hashlib.sha256(b).hexdigest()) for s, _, b in results] == [(200, want)] * 6
    assert sorted(h["x-cache-status"] for _, h, _ in results) == ["HIT"] * 5 + ["MISS"]


def _established(port):
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f:
            cols = line.split()
            if cols[1].endswith(f":{port:04X}") and cols[3] == "01":
                n += 1
    return n


def test_eviction_at_max_size_drops_the_least_recently_used(gproxy, origin, tmp_path):
    for i in range(5):
        origin.routes[f"/e{i}"] = (200, [("Cache-Control", "max-age=60")], bytes([65 + i]) * 3000)
    g = gproxy(conf(origin, tmp_path / "c", store=", max_size: 10KB"))
    for i in range(5):
        assert get(g, f"/e{i}")[1]["x-cache-status"] == "MISS"
    stats = json.loads(cache_cli(g, "stats", "--json"))
    assert stats["bytes"] <= 10 * 1024 and stats["entries"] == 3, stats
    assert get(g, "/e4")[1]["x-cache-status"] == "HIT"
    status, h, body = get(g, "/e0")
    assert (h["x-cache-status"], body) == ("MISS", b"A" * 3000)
    assert origin.count("/e0") == 2


def test_a_worker_killed_mid_write_leaves_no_entry(gproxy, origin, tmp_path):
    size = 8 << 20
    origin.routes["/big"] = (200, [("Cache-Control", "max-age=60")], size)
    origin.hold["/big"] = gate = threading.Event()
    origin.hold_after = 1 << 20
    g = gproxy(conf(origin, tmp_path / "c"))
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request("GET", "/big")
    r = c.getresponse()
    assert r.getheader("X-Cache-Status") == "MISS"
    r.read(512 << 10)
    victim = serving_worker(g, c)
    wait_until(lambda: os.listdir(tmp_path / "c" / "tmp"), 5, "the body being written")
    os.kill(victim, signal.SIGKILL)
    gate.set()
    c.close()
    wait_until(lambda: victim not in g.worker_pids() and len(g.worker_pids()) == 2, 15,
               "the arbiter to replace the killed worker")
    status, h, body = get(g, "/big")
    assert (status, h["x-cache-status"]) == (200, "MISS"), "a truncated body was indexed"
    assert hashlib.sha256(body).hexdigest() == big_digest(size)
    status, h, body = get(g, "/big")
    assert (h["x-cache-status"], hashlib.sha256(body).hexdigest()) == ("HIT", big_digest(size))
    stats = json.loads(cache_cli(g, "stats", "--json"))     # opening the store sweeps dead writers
    assert (stats["entries"], stats["bytes"]) == (1, size), stats
    assert os.listdir(tmp_path / "c" / "tmp") == []


def test_a_200_mib_response_streams_through_and_out_of_the_store_with_flat_rss(gproxy, origin, tmp_path):
    size = 200 << 20
    origin.routes["/huge"] = (200, [("Cache-Control", "max-age=60")], size)
    g = gproxy(conf(origin, tmp_path / "c", store=", max_size: 1GB, max_object_size: 512MB"))
    get(g, "/small-warmup")
    base = {pid: _rss(pid) for pid in g.worker_pids()}
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid in peak:
                peak[pid] = max(peak[pid], _rss(pid))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    for want in ("MISS", "HIT"):
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
        c.request("GET", "/huge")
        r = c.getresponse()
        assert r.getheader("X-Cache-Status") == want
        h, n = hashlib.sha256(), 0
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            h.update(piece)
            n += len(piece)
        c.close()
        assert (n, h.hexdigest()) == (size, big_digest(size))
    done.set()
    growth = max(peak[p] - base[p] for p in base)
    assert growth < 32 << 20, f"a worker's RSS grew by {growth >> 20} MiB on a 200 MiB body"


def _rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the protocol through the proxy ------------------------------------------------

def test_revalidation_head_vary_and_invalidation(gproxy, origin, tmp_path):
    def etagged(h):
        if h.get("if-none-match") == '"v1"':
            return 304, [("Cache-Control", "max-age=0, must-revalidate"), ("ETag", '"v1"'),
                         ("X-Fresh", "2")], b""
        return 200, [("Cache-Control", "max-age=0, must-revalidate"), ("ETag", '"v1"'),
                     ("X-Fresh", "1")], b"validated body"
    origin.routes["/v"] = (0, etagged, b"")
    origin.routes["/lang"] = (0, lambda h: (200, [("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")],
                                            f"in {h.get('accept-language')}".encode()), b"")
    origin.routes["/doc"] = (200, [("Cache-Control", "max-age=60")], b"doc")
    origin.routes["/chunked"] = (200, [("Cache-Control", "max-age=60")], [b"one ", b"two ", b"three"])
    g = gproxy(conf(origin, tmp_path / "c"))

    assert get(g, "/v")[1]["x-cache-status"] == "MISS"
    status, h, body = get(g, "/v")
    assert (status, h["x-cache-status"], h["x-fresh"], body) == (200, "REVALIDATED", "2", b"validated body")
    assert origin.requests("/v")[1].header("If-None-Match") == '"v1"'
    assert get(g, "/v", headers={"If-None-Match": '"v1"'})[0] == 304

    status, h, body = get(g, "/chunked")
    assert (h["x-cache-status"], body) == ("MISS", b"one two three")
    status, h, body = get(g, "/chunked")      # at once: stored before the client had it all
    assert (h["x-cache-status"], body) == ("HIT", b"one two three")
    assert origin.count("/chunked") == 1

    assert get(g, "/doc")[1]["x-cache-status"] == "MISS"
    status, h, body = get(g, "/doc", method="HEAD")
    assert (status, h["x-cache-status"], h["content-length"], body) == (200, "HIT", "3", b"")
    status, h, body = get(g, "/doc", headers={"Range": "bytes=1-"})
    assert (status, h["content-range"], body) == (206, "bytes 1-2/3", b"oc")

    en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
    assert get(g, "/lang", headers=en)[1]["x-cache-status"] == "MISS"
    assert get(g, "/lang", headers=fr)[1]["x-cache-status"] == "MISS"
    assert get(g, "/lang", headers=en)[2] == b"in en"
    status, h, body = get(g, "/lang", headers=fr)
    assert (h["x-cache-status"], body) == ("HIT", b"in fr")

    status, h, _ = get(g, "/doc", method="POST")
    assert h["x-cache-status"] == "BYPASS"
    assert get(g, "/doc")[1]["x-cache-status"] == "MISS", "a POST did not invalidate the URI"
    assert [r.method for r in origin.requests("/doc")] == ["GET", "POST", "GET"]


def test_stale_while_revalidate_and_stale_if_error(gproxy, origin, tmp_path):
    served = []

    def versioned(h):
        served.append(1)
        # v1 goes stale after a second; the refreshed v2 stays fresh however
        # slowly a loaded machine gets to the next request
        max_age = 1 if len(served) == 1 else 600
        return 200, [("Cache-Control", f"max-age={max_age}, stale-while-revalidate=60")], \
            f"v{len(served)}".encode()
    origin.routes["/swr"] = (0, versioned, b"")
    origin.routes["/sie"] = (200, [("Cache-Control", "max-age=1")], b"kept")
    g = gproxy(conf(origin, tmp_path / "c", route="cache: {stale_if_error: 60s}"))
    assert get(g, "/swr")[2] == b"v1"
    assert get(g, "/sie")[1]["x-cache-status"] == "MISS"
    wait_until(lambda: get(g, "/swr")[1]["x-cache-status"] == "UPDATING", 5, "the entry to go stale")
    wait_until(lambda: origin.count("/swr") == 2, 5, "the background revalidation")
    status, h, body = wait_until(lambda: (lambda r: r if r[1]["x-cache-status"] == "HIT" else None)(
        get(g, "/swr")), 5, "the refreshed entry")
    assert body == b"v2"
    wait_until(lambda: get(g, "/sie", headers={"Cache-Control": "max-stale"})[1]["x-cache-status"] == "STALE",
               5, "/sie to go stale")
    origin.stop()
    status, h, body = get(g, "/sie")
    assert (status, h["x-cache-status"], body) == (200, "STALE", b"kept")


def test_entries_survive_a_restart_and_purge_by_url_and_prefix(gproxy, origin, tmp_path):
    for p in ("/p/1", "/p/2", "/q"):
        origin.routes[p] = (200, [("Cache-Control", "max-age=600")], p.encode())
    aport = free_port()
    top = f'admin: {{listen: "127.0.0.1:{aport}"}}'
    text = conf(origin, tmp_path / "c", top=top)
    host = "app.test"      # one Host before and after the restart (the port changes)
    g = gproxy(text)
    for p in ("/p/1", "/p/2", "/q"):
        assert get(g, p, headers={"Host": host})[1]["x-cache-status"] == "MISS"
    g.stop()
    g = gproxy(text)
    assert get(g, "/q", headers={"Host": host})[1]["x-cache-status"] == "HIT", \
        "the entry did not survive a restart"
    wait_until(lambda: _admin(aport, "GET", "/cache")[0] == 200, 15, "the admin endpoint")
    assert _admin(aport, "POST", f"/cache/purge?prefix=http://{host}/p/") == (200, {
        "purged": 2, "prefix": f"http://{host}/p/"})
    assert _admin(aport, "POST", f"/cache/purge?url=http://{host}/q")[1]["purged"] == 1
    assert _admin(aport, "POST", "/cache/purge?url=/relative")[0] == 400
    assert [get(g, p, headers={"Host": host})[1]["x-cache-status"]
            for p in ("/p/1", "/p/2", "/q")] == ["MISS"] * 3
    assert "entries   3" in cache_cli(g, "stats")


def _admin(port, method, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None, None


def test_status_is_in_the_access_log_and_statsd(gproxy, origin, tmp_path):
    listener = StatsdListener()
    origin.routes["/m"] = (200, [("Cache-Control", "max-age=60")], b"m")
    origin.routes["/nocache/x"] = (200, [("Cache-Control", "max-age=60")], b"x")
    top = f"statsd: {{host: 127.0.0.1, port: {listener.port}, prefix: gp}}"
    g = gproxy(conf(origin, tmp_path / "c", top=top))
    # a record is written when its response ends, and a HIT (answered
    # early, perhaps by the other worker) can end before the MISS before
    # it is logged: records are matched to requests by their id
    for i, path in enumerate(("/m", "/m", "/nocache/x")):
        get(g, path, headers={"X-Request-Id": f"r{i}"})
    get(g, "/m", method="DELETE", headers={"X-Request-Id": "r3"})
    assert "x-cache-status" not in get(g, "/nocache/x", headers={"X-Request-Id": "r4"})[1]
    recs = {r["request_id"]: r["cache_status"] for r in g.access_records(at_least=5)}
    assert [recs.get(f"r{i}") for i in range(5)] == ["MISS", "HIT", None, "BYPASS", None], recs
    counters = wait_until(lambda: (lambda c: c if len(c) == 3 else None)(listener.counters("gp.cache.")),
                          5, "three cache counters")
    assert counters == {"gp.cache.miss": 1, "gp.cache.hit": 1, "gp.cache.bypass": 1}
    listener.close()


def test_a_hit_still_passes_the_rate_limit_and_logs_the_client_after_trusted_proxies(
        gproxy, origin, tmp_path):
    """A fresh hit is answered early (right after the gateway), not before it."""
    origin.routes["/r"] = (200, [("Cache-Control", "max-age=60")], b"r")
    g = gproxy(conf(origin, tmp_path / "c", top='trusted_proxies: ["127.0.0.1/32"]',
                    route="cache: true, rate_limit: {rate: 1/m, burst: 1, key: client_ip}"))
    got = [get(g, "/r", headers={"X-Forwarded-For": "198.51.100.7", "X-Request-Id": f"q{i}"})
           for i in range(3)]
    assert [(s, h.get("x-cache-status")) for s, h, _ in got] == [(200, "MISS"), (200, "HIT"), (429, None)], got
    assert origin.count("/r") == 1
    assert get(g, "/r", headers={"X-Forwarded-For": "198.51.100.8"})[1]["x-cache-status"] == "HIT"
    recs = {r["request_id"]: r for r in g.access_records(at_least=4)}
    hit = recs["q1"]
    assert (hit["cache_status"], hit["client"], hit["status"]) == ("HIT", "198.51.100.7", 200), hit
    assert (recs["q2"]["status"], recs["q2"]["reason"]) == (429, "rate_limit"), recs["q2"]


def test_bad_cache_config_names_the_key(tmp_path):
    from gproxy import config
    from gproxy.errors import ConfigError
    base = "upstreams: {o: {backends: [http://127.0.0.1:9]}}\n"
    cases = {
        "routes: [{upstream: o, cache: {key: [host, nope]}}]": "routes[0].cache.key[1]",
        "routes: [{upstream: o, cache: {stale_if_error: soon}}]": "routes[0].cache.stale_if_error",
        "cache: {path: /proc/1/nope}\nroutes: [{upstream: o, cache: true}]": "cache.path",
        "cache: {max_size: 0}\nroutes: [{upstream: o}]": "cache.max_size",
    }
    for text, key in cases.items():
        with pytest.raises(ConfigError) as e:
            config.parse(base + text, "g.yaml")
        assert f": {key}:" in str(e.value) and "g.yaml:" in str(e.value), str(e.value)
    cfg = config.parse(base + f"cache: {{path: {tmp_path}/c}}\nroutes: [{{upstream: o, cache: {{default_ttl: off}}}}]")
    assert cfg.routes[0].cache.default_ttl is None
