"""Live figures through real gunicorn with two workers: /status and /metrics
count what was sent, a killed worker leaves no gauge off, least_conn is
global, the access log lists every attempt, and the dump shows a held request."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gproxy import config, counters
from gproxy.errors import ConfigError
from servers import REPO, free_port, raw_request, wait_until, worker_of


def admin(port, path="/status"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    assert r.status == 200, f"GET {path}: got {r.status}, want 200: {body[:300]!r}"
    return json.loads(body) if r.getheader("Content-Type") == "application/json" else body.decode()


def request(g, path, method="GET", body=None):
    """One request on a new connection: (status, X-Backend, body)."""
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request(method, path, body=body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("X-Backend"), data


def hold(g, path):
    """Send a request and leave it in flight; the socket (close it to end it)."""
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def traffic(aport):
    return admin(aport)["traffic"]


def wait_workers(aport, n):
    """Until the admin endpoint answers and ``n`` workers publish figures."""
    def ready():
        try:
            return len(traffic(aport)["workers"]) == n
        except OSError:
            return False
    wait_until(ready, 10, f"{n} workers in /status")


def conf(aport, *upstreams, workers=2, extra=""):
    ups = "\n".join(f"  {name}:\n    balance: {bal}\n    retries: 1\n    backends: [{', '.join(repr(u) for u in urls)}]"
                    for name, bal, urls in upstreams)
    routes = "\n".join(f"  - {{path_prefix: /{name}/, upstream: {name}, name: {name}}}"
                       for name, _, _ in upstreams[1:])
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
admin: {{listen: "127.0.0.1:{aport}"}}
upstreams:
{ups}
routes:
{routes}
  - {{upstream: {upstreams[0][0]}, name: main}}
{extra}"""


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


def prometheus(aport):
    return {f.name: f for f in text_string_to_metric_families(admin(aport, "/metrics"))}


def samples(families, name, **labels):
    """The values of the samples called ``name`` whose labels include ``labels``."""
    fam = name.rsplit("_", 1)[0] if name.endswith(("_total", "_count", "_bucket", "_sum")) else name
    return [s.value for f in families.values() if f.name in (name, fam) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def proxy_of_two(gproxy, backends):
    """A gproxy of 2 workers round-robin over 2 backends, both publishing:
    (gproxy, admin port, backend 1, backend 2)."""
    b1, b2 = backends(2)
    aport = free_port()
    g = gproxy(conf(aport, ("web", "round_robin", [b1.url, b2.url])))
    wait_workers(aport, 2)
    return g, aport, b1, b2


def test_status_and_metrics_count_what_was_sent_and_a_killed_worker_leaves_no_gauge_off(gproxy, backends):
    g, aport, b1, b2 = proxy_of_two(gproxy, backends)
    for i in range(20):
        assert request(g, f"/n{i}")[0] == 200
    for _ in range(5):
        assert request(g, "/status/404")[0] == 404
    for _ in range(3):
        assert request(g, "/echo", "POST", b"x" * 100)[0] == 200
    tr = traffic(aport)
    assert tr["server"]["requests"]["2xx"] == 23 and tr["server"]["requests"]["4xx"] == 5, tr["server"]
    web = tr["upstreams"]["web"]["backends"]
    assert sum(b["requests"]["2xx"] for b in web) == 23, web
    assert sum(b["bytes_in"] for b in web) == 300, web
    assert sum(b["attempts"] for b in web) == 28, web
    assert all(b["p50_ms"] is not None and b["p50_ms"] <= b["p99_ms"] for b in web), web
    assert sum(w["requests"] for w in tr["workers"]) == 28, tr["workers"]

    m = prometheus(aport)
    assert sum(samples(m, "gproxy_requests_total", code_class="2xx")) == 23
    assert sum(samples(m, "gproxy_requests_total", code_class="4xx")) == 5
    for b in web:
        got = sum(samples(m, "gproxy_requests_total", backend=b["name"]))
        assert got == sum(b["requests"].values()), f"{b['name']}: got {got} in /metrics, /status says {b}"
    assert sum(samples(m, "gproxy_request_duration_seconds_count")) == 28
    assert sum(samples(m, "gproxy_request_bytes_total")) == 300
    assert samples(m, "gproxy_upstream_available_backends", upstream="web") == [2.0]
    assert sorted(samples(m, "gproxy_backend_up")) == [1.0, 1.0]
    assert samples(m, "gproxy_workers") == [2.0]

    # A worker killed with a request in flight: its counts stay, its gauges go.
    b1.gate.clear()
    b2.gate.clear()
    held = hold(g, "/chunks/2/1")       # the response starts, its last chunk waits on the gate
    wait_until(lambda: traffic(aport)["server"]["requests_active"] == 1, 5, "the held request active")
    victim = wait_until(lambda: worker_of(g, held), 5, "the worker holding the request")
    assert sum(b["active"] for b in traffic(aport)["upstreams"]["web"]["backends"]) == 1
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in [w["pid"] for w in traffic(aport)["workers"]], 10,
               "the killed worker retired")
    tr = traffic(aport)
    assert tr["server"]["requests_active"] == 0, tr["server"]
    assert [b["active"] for b in tr["upstreams"]["web"]["backends"]] == [0, 0], tr["upstreams"]
    assert tr["server"]["requests"]["2xx"] == 23, "counters never go backwards"
    assert sum(samples(prometheus(aport), "gproxy_requests_total")) == 28
    held.close()
    b1.gate.set()
    b2.gate.set()


def test_least_conn_is_global_across_workers(gproxy, backends):
    a, b = backends(2)
    aport = free_port()
    g = gproxy(conf(aport, ("web", "least_conn", [a.url, b.url])))
    wait_workers(aport, 2)
    a.gate.clear()
    b.gate.clear()
    held = hold(g, "/chunks/2/1")
    busy = wait_until(lambda: [x for x in (a, b) if x.requests_for("/chunks/")], 5, "the held request")[0]
    free = b if busy is a else a
    holder = wait_until(lambda: worker_of(g, held), 5, "the worker holding the request")
    served = {}                         # worker pid -> backends its requests went to
    for _ in range(200):
        if len(served) == 2 and all(len(v) >= 3 for v in served.values()):
            break
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        c.connect()
        pid = wait_until(lambda: worker_of(g, c.sock), 5, "the accepting worker")
        c.request("GET", "/x")
        r = c.getresponse()
        r.read()
        c.close()
        served.setdefault(pid, []).append(r.getheader("X-Backend"))
    assert len(served) == 2, f"the kernel gave every connection to one worker: {served}"
    other = [pid for pid in served if pid != holder]
    assert other, served
    for pid, names in served.items():
        assert set(names) == {free.name}, (
            f"worker {pid} ({'holds' if pid == holder else 'does not hold'} the slow request) "
            f"sent requests to {names}, want only {free.name}")
    held.close()
    a.gate.set()
    b.gate.set()


def test_access_log_lists_every_attempt(gproxy, backends):
    live, = backends(1)
    dead = dead_url()
    aport = free_port()
    g = gproxy(conf(aport, ("web", "round_robin", [dead, live.url]), workers=1))
    assert request(g, "/retried")[0] == 200
    rec = g.access_records(1)[-1]
    dead_name, live_name = dead.split("//")[1], live.url.split("//")[1]
    assert [(x["backend"], x["status"], x["error"]) for x in rec["attempts"]] == [
        (dead_name, None, "connect_error"), (live_name, 200, None)], rec["attempts"]
    assert all(x["time"] >= 0 for x in rec["attempts"]) and rec["retries"] == 1
    assert request(g, "/plain")[0] == 200
    rec = wait_until(lambda: [r for r in g.access_records(2) if r["target"] == "/plain"], 5, "the record")[0]
    assert [x["backend"] for x in rec["attempts"]] == [live_name]
    got = raw_request(g.port, b"GET /cut/100 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and len(got.partition(b"\r\n\r\n")[2]) == 100, got
    rec = wait_until(lambda: [r for r in g.access_records(3) if r["target"] == "/cut/100"], 5, "the cut record")[0]
    assert [(x["backend"], x["status"], x["error"]) for x in rec["attempts"]] == [
        (live_name, 200, "reset")], rec["attempts"]


def test_access_log_field_list(gproxy, backends):
    live, = backends(1)
    dead = dead_url()
    aport = free_port()
    g = gproxy(conf(aport, ("web", "round_robin", [dead, live.url]), workers=1, extra="""
access_log:
  format: fields
  fields: [request, status, upstream_addr, upstream_status, upstream_response_time, route]
"""))
    assert request(g, "/f?q=1")[0] == 200
    line = wait_until(lambda: [x for x in g.stdout().splitlines() if "/f?q=1" in x], 5, "the log line")[0]
    dead_name, live_name = dead.split("//")[1], live.url.split("//")[1]
    head = f'"GET /f?q=1 HTTP/1.1" 200 "{dead_name}, {live_name}" "connect_error, 200" "'
    assert line.startswith(head), f"got {line!r}, want it to start {head!r}"
    assert line.endswith('" main'), line


def test_dump_shows_each_worker_and_the_held_request(gproxy, backends):
    b, = backends(1)
    aport = free_port()
    g = gproxy(conf(aport, ("web", "round_robin", [b.url])))
    wait_workers(aport, 2)
    b.gate.clear()
    held = hold(g, "/chunks/2/1")
    holder = wait_until(lambda: worker_of(g, held), 5, "the worker holding the request")
    # the response head is relayed, its last chunk waits at the backend
    d = wait_until(lambda: (x := admin(aport, "/dump")) and
                   [r for w in x["workers"] for r in w.get("requests", ())
                    if r["phase"] == "sending response body"] and x, 5, "the held request in its body")
    pids = sorted(w["pid"] for w in d["workers"])
    assert pids == sorted(g.worker_pids()), f"got workers {pids}, want {sorted(g.worker_pids())}"
    w = [w for w in d["workers"] if w["pid"] == holder][0]
    r, = w["requests"]
    assert (r["target"], r["route"], r["upstream"], r["backend"]) == (
        "/chunks/2/1", "main", "web", b.url.split("//")[1]), r
    assert r["phase"] == "sending response body" and r["age_s"] >= 0, r
    assert "dump_server" in w["greenlets"] and "__iter__" in w["greenlets"], w["greenlets"][:2000]
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "gproxy.cli", "dump", "--brief", "--admin", f"127.0.0.1:{aport}"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"worker {holder}: 1 requests in flight" in out.stdout, out.stdout
    assert "sending response body" in out.stdout and "GET /chunks/2/1" in out.stdout, out.stdout
    held.close()
    b.gate.set()


def test_status_command_prints_traffic_table(gproxy, backends):
    b, = backends(1)
    aport = free_port()
    g = gproxy(conf(aport, ("web", "round_robin", [b.url]), workers=2))
    wait_workers(aport, 2)
    for _ in range(4):
        assert request(g, "/t")[0] == 200
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "gproxy.cli", "status", "--admin", f"127.0.0.1:{aport}"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("web ")]
    traffic_row = [r for r in rows if len(r) == 14]
    assert traffic_row and traffic_row[0][2:8] == ["0", "4", "4", "0", "0", "0"], out.stdout


# --- the counters files, without gunicorn --------------------------------------------

CFG = """
upstreams:
  api: {balance: least_conn, backends: ["http://127.0.0.1:1", "http://127.0.0.1:2"]}
routes: [{upstream: api, name: r}]
"""


class FakeExchange:
    def __init__(self, status, backend, nbytes=0, route="r", upstream="api", error=None):
        import time
        self.start, self.route, self.upstream, self.backend = time.time() - 0.02, route, upstream, backend
        self.status, self.error, self.body, self.bytes_in, self.bytes_out = status, error, None, nbytes, 7
        self.retries, self.upstream_start = 0, 1.0


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_dead_worker_counts_are_retired_and_survive_a_supervisor_restart(tmp_path):
    cfg = config.parse(CFG)
    live = counters.WorkerCounters(cfg, str(tmp_path))
    gone = counters.WorkerCounters(cfg, str(tmp_path), pid=dead_pid())
    for w, status in ((live, 200), (gone, 200), (gone, 503)):
        w.request_started()
        w.record(FakeExchange(status, "127.0.0.1:1", nbytes=10))
    gone.inflight("api")[1] += 1        # a request in flight when it died
    totals = counters.Totals(str(tmp_path))
    totals.refresh()
    assert not os.path.exists(gone.path), "the dead worker's file is removed"
    sums = totals.sums()
    assert sums[("requests", "r", "api", "127.0.0.1:1", "2xx")] == 2
    assert sums[("requests", "r", "api", "127.0.0.1:1", "5xx")] == 1
    assert sums[("bytes_in", "r", "api", "127.0.0.1:1")] == 30
    assert ("active", "api", "127.0.0.1:2") not in sums, "a dead worker's gauge is dropped"
    again = counters.Totals(str(tmp_path))          # a restarted supervisor
    again.refresh()
    assert again.sums() == sums


def test_global_load_sums_every_live_worker(tmp_path):
    cfg = config.parse(CFG)
    mine = counters.WorkerCounters(cfg, str(tmp_path))
    other = counters.WorkerCounters(cfg, str(tmp_path), pid=os.getppid())
    other.inflight("api")[0] += 2
    mine.inflight("api")[1] += 1
    load = counters.GlobalLoad(mine.inflight("api"), counters.Peers(str(tmp_path), mine.pid),
                                "api", ["127.0.0.1:1", "127.0.0.1:2"])
    assert [load[0], load[1]] == [2, 1]


@pytest.mark.parametrize("counts,q,want", [
    ([0] * counters.BUCKETS, 0.5, None),
    ([0, 0, 0, 10] + [0] * (counters.BUCKETS - 4), 0.5, 0.0075),      # 5-10 ms bucket, halfway
    ([10] + [0] * (counters.BUCKETS - 1), 0.99, 0.00099),
    ([0] * (counters.BUCKETS - 1) + [3], 0.5, 60.0),                  # +Inf: the last bound
])
def test_percentile_interpolates_inside_the_bucket(counts, q, want):
    got = counters.percentile(counts, q)
    assert got == pytest.approx(want) if want is not None else got is None, f"got {got}, want {want}"


@pytest.mark.parametrize("text,message", [
    ("access_log: {fields: [status]}\n", "b.yaml:1: access_log.fields: a field list needs 'format: fields'"),
    ("access_log: {format: fields}\n", "b.yaml:1: access_log.format: format 'fields' needs a 'fields' list"),
    ("access_log: {format: fields, fields: [stauts]}\n", "b.yaml:1: access_log.fields[0]: expected one of"),
    ("live_stats: {window: 0s}\n", "b.yaml:1: live_stats.window: must be between 1s and 1h"),
    ("live_stats: {prom: true}\n", "b.yaml:1: live_stats.prom: unknown key"),
])
def test_bad_config_names_file_line_and_key(text, message):
    with pytest.raises(ConfigError) as e:
        config.parse(text, "b.yaml")
    assert str(e.value).startswith(message), f"got {e.value}, want {message}"


def test_combined_line_lists_attempts_only_after_a_retry():
    from gproxy import accesslog
    rec = {"time": 0.0, "client": "10.1.2.3", "method": "GET", "target": "/a", "protocol": "HTTP/1.1",
           "host": "x", "status": 200, "bytes_in": 0, "bytes_out": 5, "duration": 0.01,
           "upstream_time": 0.005, "route": "r", "upstream": "u", "backend": "b:2", "retries": 1,
           "request_id": "id", "error": "connect_error", "user_agent": "", "referer": "",
           "attempts": [{"backend": "b:1", "status": None, "error": "connect_error", "time": 0.001},
                        {"backend": "b:2", "status": 200, "error": None, "time": 0.009}]}
    line = accesslog.format_combined(rec)
    assert line.endswith(" upstreams=b:1:connect_error:0.001,b:2:200:0.009"), line
    one = dict(rec, attempts=rec["attempts"][1:], retries=0, error=None)
    assert "upstreams=" not in accesslog.format_combined(one)
    fields = accesslog.fields_format(("upstream_addr", "upstream_status", "upstream_response_time", "error"))
    assert fields(rec) == '"b:1, b:2" "connect_error, 200" "0.001, 0.009" connect_error'
    assert fields(dict(rec, attempts=None, error=None)) == "- - - -"


def test_a_json_line_is_one_line_of_valid_json_even_with_a_lone_surrogate():
    """orjson refuses a lone surrogate (a target decoded with
    surrogateescape); the line is then written by json, escaped."""
    from gproxy import accesslog
    plain = accesslog.json_line({"target": "/caf\u00e9", "status": 200})
    assert plain == '{"target":"/caf\u00e9","status":200}\n'.encode()
    odd = accesslog.json_line({"target": "/a\udc80", "status": 200})
    assert odd.endswith(b"\n") and odd.count(b"\n") == 1, odd
    assert json.loads(odd) == {"target": "/a\udc80", "status": 200}
    combined = accesslog.line_of(accesslog.fields_format(("target",)))({"target": "/a\udc80"})
    assert combined == b"/a\\udc80\n", combined
