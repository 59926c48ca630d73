"""The supervisor end to end: real gunicorn (2 workers), real backends on
127.0.0.1, the admin endpoint over real sockets.

"Every worker" is checked, not hoped for: each client request stays open
until the test has found, through /proc, which worker holds its connection.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from servers import (REPO, GProxy, alive, children, cmdline, free_port, local_non_loopback_ipv4,
                     supervisor_pid, worker_of, wait_until)

INTERVAL, RISE, FALL = 0.2, 2, 2
SLACK = 2.0             # a shared 2-core box: scheduling, Python start-up


def conf(*backends, admin_port, health=True, passive="", top="", workers=2):
    urls = ", ".join(f'"{b.url}"' for b in backends)
    hc = (f"    health_check: {{path: /health, interval: {int(INTERVAL * 1000)}ms, "
          f"rise: {RISE}, fall: {FALL}}}\n") if health else ""
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: {workers}
admin: {{listen: "127.0.0.1:{admin_port}"}}
{top}
upstreams:
  web:
    backends: [{urls}]
    retries: 1
{hc}{passive}
routes:
  - upstream: web
"""


def start(gproxy, text, aport):
    """A started gproxy whose supervisor answers on the admin port."""
    g = gproxy(text)
    wait_for("the admin endpoint", lambda: status_or_none(aport), timeout=15)
    # Every worker has booted: a worker that gets TERM before it installed
    # its handlers ignores it (gunicorn), which would slow the teardown.
    cover_workers(g, "/warmup", rounds=1)
    return g


def hup(g):
    """Reload and wait until only new workers serve."""
    g.hup()
    cover_workers(g, "/warmup", rounds=1)


def request(g, path="/x", timeout=10):
    """(status, X-Backend, body, worker pid) for one request on a new connection."""
    with socket.create_connection(("127.0.0.1", g.port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        body = resp.read()
        pid = worker_of(g, s)       # the keep-alive connection is still open
        return resp.status, resp.getheader("X-Backend"), body, pid


def cover_workers(g, path="/x", rounds=3, max_requests=300):
    """Requests until every worker has served ``rounds`` of them."""
    workers = set(g.worker_pids())
    seen, out = {}, []
    for _ in range(max_requests):
        r = request(g, path)
        out.append(r)
        if r[3] is not None:
            seen[r[3]] = seen.get(r[3], 0) + 1
        if set(seen) >= workers and min(seen[w] for w in workers) >= rounds:
            return out
    raise AssertionError(f"requests did not reach every worker: got {seen}, want {sorted(workers)}")


def admin(port, method="GET", path="/status", source=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                   source_address=(source, 0) if source else None)
    c.request(method, path)
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.getheader("Content-Type", "").startswith("application/json"):
        return r.status, json.loads(data)
    return r.status, data.decode()


def wait_for(what, cond, timeout=10.0):
    return wait_until(cond, timeout, what, interval=0.02)


def status_or_none(port):
    """/status, or None while the admin endpoint is not listening yet."""
    try:
        return admin(port)[1]
    except OSError:
        return None


def backend_state(port, name, upstream="web"):
    st = status_or_none(port)
    if st is None:
        return None
    for b in st["upstreams"][upstream]["backends"]:
        if b["name"] == name:
            return b
    raise AssertionError(f"backend {name} not in /status")


def hits(backend, exclude=()):
    """Proxied requests the backend received (health checks not counted)."""
    skip = ("/health",) + tuple(exclude)
    return sum(1 for r in list(backend.received) if not r.target.startswith(skip))


def name(b):
    return f"127.0.0.1:{b.port}"


# --- active checks ------------------------------------------------------------------

def test_active_check_takes_backend_out_of_every_worker_and_back(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = start(gproxy, conf(b1, b2, admin_port=aport), aport)
    wait_for("b2 checked up", lambda: (backend_state(aport, name(b2)) or {}).get("active", {}).get("consecutive_successes", 0) >= 1)
    assert {r[1] for r in cover_workers(g)} == {"b1", "b2"}

    b2.health_status = 500
    t0 = time.monotonic()
    bound = INTERVAL * FALL + SLACK
    late_hits = []
    while time.monotonic() < t0 + bound + 1.0:         # keep every worker busy past the bound
        before = hits(b2)
        for status, _, _, _ in cover_workers(g, rounds=1):
            assert status == 200, f"got {status}, want 200 while b2 goes down"
        if hits(b2) > before:
            late_hits.append(time.monotonic() - t0)
    assert not [t for t in late_hits if t > bound], \
        f"b2 got requests {late_hits} s after its /health failed, want none after {bound:.1f}s"
    st = backend_state(aport, name(b2))
    assert st["state"] == "down" and "status 500" in st["reason"], st
    before = hits(b2)
    assert {r[1] for r in cover_workers(g)} == {"b1"}
    assert hits(b2) == before

    b2.health_status = 200
    t1 = time.monotonic()
    wait_for("b2 back in rotation", lambda: request(g)[1] == "b2", timeout=INTERVAL * RISE + SLACK + 2)
    assert time.monotonic() - t1 <= INTERVAL * RISE + SLACK + 2
    assert {r[1] for r in cover_workers(g)} == {"b1", "b2"}


def test_all_backends_down_answers_503_at_once(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = start(gproxy, conf(b1, b2, admin_port=aport), aport)
    b1.health_status = b2.health_status = 503
    wait_for("both down", lambda: (status_or_none(aport) or {}).get("upstreams", {}).get("web", {}).get("available") == 0)
    for status, _, body, _ in cover_workers(g):
        assert status == 503 and b"No server is available" in body, (status, body)
    t0 = time.monotonic()
    assert request(g)[0] == 503
    assert time.monotonic() - t0 < 1.0, "503 must not wait on a timeout"


# --- passive health, shared by every worker ---------------------------------------------

def connect_errors(g, backend_name):
    """Failed attempts on the backend, from the workers' error log (the first
    may be a reset: the stopped listener's last accept)."""
    return len(re.findall(rf"upstream \w+: route=.* backend={re.escape(backend_name)} ", g.stderr()))


def test_passive_failures_eject_in_every_worker(gproxy, backends):
    b1, b2 = backends(2)
    dead = name(b2)
    b2.stop()                           # the listener is gone: connect refused
    aport = free_port()
    fail_timeout = 3.0
    g = start(gproxy, conf(b1, b2, admin_port=aport, health=False,
                    passive=f"    passive: {{max_fails: 2, fail_timeout: {fail_timeout:g}s}}\n"), aport)
    for _ in range(100):
        status, via, _, _ = request(g)
        assert (status, via) == (200, "b1"), f"got {status} via {via}, want 200 via b1 (retried)"
        st = backend_state(aport, dead)
        if st["passive"]["ejected"]:
            break
    else:
        raise AssertionError("the dead backend was never ejected")
    t_eject = time.monotonic()
    attempts = connect_errors(g, dead)
    assert 2 <= attempts <= 3, f"got {attempts} attempts before ejection, want max_fails=2 (+1 in flight)"

    while time.monotonic() < t_eject + fail_timeout - 0.5:
        assert {r[1] for r in cover_workers(g, rounds=2)} == {"b1"}
    assert connect_errors(g, dead) == attempts, "a worker tried the ejected backend within fail_timeout"

    # After fail_timeout it is offered again (and fails again).
    wait_for("a new attempt after fail_timeout",
             lambda: request(g) and connect_errors(g, dead) > attempts, timeout=fail_timeout + SLACK + 3)
    assert time.monotonic() - t_eject >= fail_timeout - 0.5


def test_5xx_counts_only_when_listed(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    b2.handler = lambda be, req, conn: not req.target.startswith("/health") and (
        conn.sock.sendall(b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n") or True)
    g = start(gproxy, conf(b1, b2, admin_port=aport, health=False,
                    passive="    passive: {max_fails: 1, fail_timeout: 30s, fail_status: [503]}\n"), aport)
    statuses = [r[0] for r in cover_workers(g, rounds=2)]
    assert statuses.count(503) <= 2, f"got {statuses.count(503)} 503s, want at most one per worker"
    st = backend_state(aport, name(b2))
    assert st["state"] == "ejected" and "status_503" in st["reason"], st


# --- the supervisor's own lifecycle ----------------------------------------------------

def test_supervisor_sigkill_is_back_within_a_second_with_its_state(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = start(gproxy, conf(b1, b2, admin_port=aport), aport)
    assert admin(aport, "POST", f"/upstreams/web/backends/{name(b2)}/drain")[0] == 200
    old = supervisor_pid(g)
    failures, done = [], threading.Event()

    def load():
        while not done.is_set():
            try:
                status, via, _, _ = request(g)
                if status != 200 or via != "b1":
                    failures.append((status, via))
            except OSError as e:
                failures.append(repr(e))

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        new = wait_for("a new supervisor", lambda: (p := supervisor_pid(g)) and p != old and p, timeout=5)
        back = time.monotonic() - t0
        wait_for("the admin endpoint", lambda: backend_state(aport, name(b2)), timeout=5)
        st = admin(aport)[1]
        assert st["pid"] == new
        assert backend_state(aport, name(b2))["state"] == "drained", "the drain was forgotten"
        cover_workers(g)
    finally:
        done.set()
        t.join(10)
    assert back <= 1.0 + SLACK / 2, f"supervisor back after {back:.2f}s, want about 1s"
    assert failures == [], f"client requests failed meanwhile: {failures[:5]}"
    assert f"({old}) is gone" in g.stderr() or f"pid {old}" in g.stderr()


def test_hup_adds_a_backend_and_a_broken_config_keeps_the_old_one(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = start(gproxy, conf(b1, admin_port=aport), aport)
    assert {r[1] for r in cover_workers(g)} == {"b1"}
    with open(g.config_path, "w") as f:
        f.write(conf(b1, b2, admin_port=aport).replace("{port}", str(g.port)))
    hup(g)
    wait_for("b2 receives traffic", lambda: request(g)[1] == "b2", timeout=10)
    wait_for("the supervisor knows b2", lambda: backend_state(aport, name(b2)) is not None, timeout=5)

    with open(g.config_path, "w") as f:
        f.write(conf(b1, b2, admin_port=aport).replace("{port}", str(g.port))
                + "  - upstream: nowhere\n")
    hup(g)
    assert {r[1] for r in cover_workers(g)} == {"b1", "b2"}
    with open(g.config_path) as f:
        line = f.read().splitlines().index("  - upstream: nowhere") + 1
    want = f"{g.config_path}:{line}: routes[1].upstream: no upstream named 'nowhere'"
    assert f"reload failed, keeping the previous configuration: {want}" in g.stderr()
    err = wait_for("the supervisor's reload error", lambda: admin(aport)[1]["config"]["reload_error"])
    assert err == want


def test_arbiter_sigkill_leaves_no_process(gproxy, backends):
    b1, = backends(1)
    aport = free_port()
    g = start(gproxy, conf(b1, admin_port=aport), aport)
    sup = wait_for("the supervisor", lambda: supervisor_pid(g))
    st = wait_for("the admin endpoint", lambda: backend_state(aport, name(b1)) and admin(aport)[1])
    pids = set(children(g.proc.pid))
    assert sup in pids and len(pids) == 3, pids
    g.proc.send_signal(signal.SIGKILL)
    g.proc.wait(5)
    wait_for("every gproxy process gone", lambda: not any(alive(p) for p in pids), timeout=8)
    rdir = st["runtime_dir"]
    wait_for("the runtime directory removed", lambda: not os.path.exists(rdir), timeout=5)
    assert "cannot remove" not in g.stderr(), g.stderr()


def test_term_stops_the_supervisor_and_removes_the_runtime_dir(gproxy, backends):
    b1, = backends(1)
    aport = free_port()
    g = start(gproxy, conf(b1, admin_port=aport), aport)
    sup = wait_for("the supervisor", lambda: supervisor_pid(g))
    rdir = wait_for("the admin endpoint", lambda: backend_state(aport, name(b1)) and admin(aport)[1])["runtime_dir"]
    g.stop(graceful=True)
    assert g.proc.returncode == 0
    assert not alive(sup)
    assert not os.path.exists(rdir)
    assert f"supervisor (pid {sup}) exiting: signal SIGTERM" in g.stderr()


class ScriptGProxy(GProxy):
    """gproxy started through the ``gunicorn`` script: USR2 re-executes
    ``sys.argv``, and under ``python -m gunicorn`` that runs
    gunicorn/__main__.py as a script, whose directory then shadows the
    stdlib ``http`` package in the new arbiter."""

    def command(self):
        return [sys.executable, os.path.join(os.path.dirname(sys.executable), "gunicorn"),
                "-c", self.conf, "gproxy.wsgi"]


def test_usr2_generations_keep_separate_state(tmp_path, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = ScriptGProxy(tmp_path, conf(b1, b2, admin_port=aport)).start()
    try:
        wait_for("the admin endpoint", lambda: status_or_none(aport), timeout=15)
        cover_workers(g, "/warmup", rounds=1)
        usr2_generations(g, aport, b2)
    finally:
        g.stop()


def app_loaded(pid):
    """The worker has set its own signal handlers (a TERM before that is
    lost: a gunicorn race). The arbiter catches USR2; a worker resets it to
    the default in ``init_signals``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    except (OSError, StopIteration):
        return False
    return not caught & (1 << (signal.SIGUSR2 - 1))


def usr2_generations(g, aport, b2):
    old_dir = admin(aport)[1]["runtime_dir"]
    assert admin(aport, "POST", f"/upstreams/web/backends/{name(b2)}/drain")[0] == 200
    g.proc.send_signal(signal.SIGUSR2)
    new_arbiter = wait_for("the new arbiter", lambda: next(
        (p for p in children(g.proc.pid) if "gunicorn" in (c := cmdline(p))
         and "worker" not in c and "gproxy.supervisor" not in c and alive(p)), None), timeout=15)
    new_dir = old_dir.replace(f"gproxy-{g.proc.pid}", f"gproxy-{new_arbiter}")
    wait_for("the new workers booted", lambda: len(w := [p for p in children(new_arbiter)
                                                          if "worker" in cmdline(p)]) >= 2
             and all(app_loaded(p) for p in w), timeout=20)
    wait_for("the new generation's table", lambda: os.path.exists(os.path.join(new_dir, "health.table")), timeout=10)
    assert new_dir != old_dir and os.path.exists(os.path.join(old_dir, "health.table"))
    # The old generation's drain is its own: the old supervisor still holds it.
    assert backend_state(aport, name(b2))["state"] == "drained"
    os.kill(new_arbiter, signal.SIGTERM)
    wait_for("the new generation gone", lambda: not alive(new_arbiter) and not os.path.exists(new_dir), timeout=15)
    assert os.path.exists(old_dir), "the new generation removed the old one's state"


# --- drain -------------------------------------------------------------------------------

def test_drain_under_load_lets_the_download_finish_and_moves_new_requests(gproxy, backends):
    b1, b2 = backends(2)
    b1.gate.set()
    n, k = 64, 65536                                    # 4 MiB, the last chunk held back
    aport = free_port()
    g = start(gproxy, conf(b1, b2, admin_port=aport), aport)
    download = None
    for _ in range(20):
        c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=20)
        c.request("GET", f"/chunks/{n}/{k}")
        r = c.getresponse()
        if r.getheader("X-Backend") == "b2":
            download = (c, r, r.read(k * 8))             # part of the body arrived
            break
        r.read()
        c.close()
    assert download is not None, "no download landed on b2"

    status, body = admin(aport, "POST", f"/upstreams/web/backends/{name(b2)}/drain")
    assert status == 200 and body["state"] == "drained" and body["available"] is False, body
    before = hits(b2, exclude=("/chunks",))
    t0 = time.monotonic()
    for status, via, _, _ in cover_workers(g):
        assert (status, via) == (200, "b1"), f"got {status} via {via} after the drain, want 200 via b1"
    assert hits(b2, exclude=("/chunks",)) - before == 0
    assert time.monotonic() - t0 < 30

    b2.gate.set()
    c, r, first = download
    rest = r.read()
    c.close()
    assert len(first) + len(rest) == n * k, f"got {len(first) + len(rest)} bytes, want {n * k}"

    assert admin(aport, "POST", f"/upstreams/web/backends/{name(b2)}/enable")[0] == 200
    assert {r[1] for r in cover_workers(g)} == {"b1", "b2"}


# --- the admin endpoint -----------------------------------------------------------------

def test_admin_status_healthz_and_errors(gproxy, backends):
    b1, = backends(1)
    aport = free_port()
    g = start(gproxy, conf(b1, admin_port=aport), aport)
    wait_for("the admin endpoint", lambda: backend_state(aport, name(b1)))
    st = wait_for("a check result", lambda: (s := admin(aport)[1])["upstreams"]["web"]["backends"][0]["active"]["last_check"] and s)
    assert st["version"] and st["config"]["file"] == g.config_path
    import hashlib
    with open(g.config_path, "rb") as f:
        assert st["config"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    b = st["upstreams"]["web"]["backends"][0]
    assert b["state"] == "up" and b["active"]["last_check"]["status"] == 200
    assert b["active"]["last_check"]["latency_ms"] > 0 and b["active"]["consecutive_successes"] >= 1
    assert admin(aport, "GET", "/healthz") == (200, "ok\n")

    status, body = admin(aport, "POST", "/upstreams/nope/backends/x/drain")
    assert status == 404 and "no upstream named 'nope' (known: web)" in body["error"], body
    status, body = admin(aport, "POST", "/upstreams/web/backends/10.9.9.9:1/drain")
    assert status == 404 and f"has no backend '10.9.9.9:1' (known: {name(b1)})" in body["error"], body
    assert admin(aport, "GET", f"/upstreams/web/backends/{name(b1)}/drain")[0] == 405
    assert admin(aport, "GET", "/nothing")[0] == 404


def test_admin_refuses_non_loopback_clients_unless_allowed(gproxy, backends):
    b1, = backends(1)
    ip = local_non_loopback_ipv4()
    assert ip, "this test needs one non-loopback address on the host"
    aport = free_port()
    g = start(gproxy, conf(b1, admin_port=aport), aport)
    wait_for("the admin endpoint", lambda: backend_state(aport, name(b1)))
    status, body = admin(aport, source=ip)
    assert status == 403 and f"client {ip} is not allowed" in body["error"], body
    assert admin(aport, "POST", f"/upstreams/web/backends/{name(b1)}/drain", source=ip)[0] == 403
    assert backend_state(aport, name(b1))["drained"] is False

    with open(g.config_path, "w") as f:
        f.write(conf(b1, admin_port=aport, top=f'admin: {{listen: "127.0.0.1:{aport}", allow: ["{ip}/32"]}}')
                .replace(f'admin: {{listen: "127.0.0.1:{aport}"}}\n', "", 1).replace("{port}", str(g.port)))
    g.hup()
    wait_for("the allowed client admitted", lambda: _status_or_none(aport, ip) == 200, timeout=10)


def _status_or_none(port, source):
    try:
        return admin(port, source=source)[0]
    except OSError:
        return None


def test_gproxy_status_command_prints_a_table(gproxy, backends):
    b1, b2 = backends(2)
    aport = free_port()
    g = start(gproxy, conf(b1, b2, admin_port=aport), aport)
    wait_for("the admin endpoint", lambda: backend_state(aport, name(b1)))
    wait_for("checks", lambda: all(b["active"]["last_check"] for b in admin(aport)[1]["upstreams"]["web"]["backends"]))
    admin(aport, "POST", f"/upstreams/web/backends/{name(b2)}/drain")
    env = dict(os.environ, GPROXY_CONFIG=g.config_path, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "gproxy.cli", "status"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gproxy ") and g.config_path in out.stdout
    row1 = next(line for line in lines if name(b1) in line).split()
    row2 = next(line for line in lines if name(b2) in line).split()
    assert row1[:3] == ["web", name(b1), "up"] and row2[:3] == ["web", name(b2), "drained"], out.stdout
    bad = subprocess.run([sys.executable, "-m", "gproxy.cli", "status", "--admin", f"127.0.0.1:{free_port()}"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "cannot reach the admin endpoint" in bad.stderr, bad.stderr


def test_a_reload_is_counted_only_once_its_outcome_is_in_place(tmp_path, monkeypatch):
    """``gproxy reload`` waits for /status's ``reloads`` to pass the count it
    saw, then compares the config digest. A count raised before the new
    config was applied let it read the old digest and fail a good reload
    with "the file changed again?" (the ansible playbook's handler did)."""
    from types import SimpleNamespace

    from gproxy import supervisor
    from gproxy.errors import ConfigError
    sup = supervisor.Supervisor(str(tmp_path), os.getpid())
    seen = []
    monkeypatch.setattr(supervisor.config, "load", lambda: SimpleNamespace(source="new.yaml", upstreams={}))
    monkeypatch.setattr(sup, "apply", lambda cfg: seen.append(sup.reloads))
    sup.reload()
    assert seen == [0] and sup.reloads == 1, "counted before the new config was applied"

    def broken():
        seen.append(sup.reloads)
        raise ConfigError("new.yaml:1: workers: expected an integer")
    monkeypatch.setattr(supervisor.config, "load", broken)
    sup.reload()
    assert seen == [0, 1] and sup.reloads == 2 and "workers" in sup.reload_error
