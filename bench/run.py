#!/usr/bin/env python3
"""gproxy side by side with nginx and HAProxy, on this machine, in one run.

    python3 bench/run.py            # full run: 5 repetitions, medians
    python3 bench/run.py --quick    # smoke test of the harness (short, 1 repetition)
    python3 bench/run.py --table bench/results/FILE.json   # re-print a table

Installs nginx, HAProxy and wrk from Debian if they are missing, starts an
nginx backend serving static files on its own loopback port, then measures
each proxy in turn (interleaved, the order rotating every repetition), all
configured alike: 2 workers (HAProxy: nbthread 2), upstream keep-alive, no
access log. Every process it starts is stopped by pid at the end, also on
error or Ctrl-C. Every load is bounded in time (wrk -d) and goes to
127.0.0.1 only. Prints a markdown table and writes JSON to bench/results/.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL, BIG = 1024, 10 * 1024 * 1024

WRK_LUA = r"""
done = function(s, lat, req)
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    s.requests, s.duration, s.bytes, s.errors.connect, s.errors.read, s.errors.write,
    s.errors.status, s.errors.timeout, lat:percentile(50), lat:percentile(99), lat.max))
end
"""


# --- processes ------------------------------------------------------------------

STARTED = []    # every Popen this script made; stopped in stop_all()


def spawn(cmd, log, **kw):
    p = subprocess.Popen(cmd, stdout=open(log + ".out", "wb"), stderr=open(log + ".err", "wb"), **kw)
    STARTED.append(p)
    return p


def stop(p, timeout=10):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in reversed(list(STARTED)):
        stop(p)


def make_workdir(prefix):
    """A temporary directory the servers (nginx workers included) can read."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    os.chmod(workdir, 0o755)
    return workdir


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid):
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_ticks(pids):
    """(utime, stime) of the given processes, in clock ticks."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user, system


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssPeak(threading.Thread):
    """Samples the summed RSS of a process tree every 50 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.first = pid, 0, None
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            r = rss_kib(tree(self.pid))
            self.first = r if self.first is None else self.first
            self.peak = max(self.peak, r)
            self.done.wait(0.05)

    def stop(self):
        self.done.set()
        self.join()
        return self.first or 0, self.peak


def wait_listening(port, proc, timeout=20, ready=lambda: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if ready():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} not listening on {port} after {timeout}s")


# --- the servers ------------------------------------------------------------------

NGINX_COMMON = """
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 12000; }}
"""

BACKEND_CONF = NGINX_COMMON + """
worker_processes 1;
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{port} backlog=4096; root {d}/www; }}
}}
"""

NGINX_CONF = NGINX_COMMON + """
worker_processes 2;
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  proxy_temp_path {d}/proxy_temp;
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 32;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

HAPROXY_CONF = """
global
  nbthread 2
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 75s
  timeout server 60s
  timeout http-keep-alive 75s
frontend front
  bind 127.0.0.1:{port}
  default_backend back
backend back
  http-reuse safe
  server b1 127.0.0.1:{backend}
"""

GPROXY_YAML = """
listen: ["127.0.0.1:{port}"]
workers: 2
worker_connections: 10000
keepalive_timeout: 75s
access_log: {access_log}
{extra}
upstreams:
  backend:
    backends: ["http://127.0.0.1:{backend}"]
    pool: {{max_idle_per_backend: 32}}
routes:
  - upstream: backend
"""


class Server:
    """One server under test (or the backend): start, pids, stop."""

    name = ""

    def __init__(self, workdir, backend_port=None):
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.backend = backend_port
        self.proc = None
        self.port = None

    def start(self):
        self.port = free_port()
        self.proc = spawn(self.command(), os.path.join(self.dir, "server"), **self.spawn_kw())
        try:
            wait_listening(self.port, self.proc, ready=self.ready)
        except RuntimeError as e:
            with open(os.path.join(self.dir, "server.err"), errors="replace") as f:
                raise RuntimeError(f"{self.name}: {e}: {f.read()[-2000:]}") from None
        return self

    def spawn_kw(self):
        return {}

    def ready(self):
        return True

    def pids(self):
        return tree(self.proc.pid)

    def stop(self):
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def write(self, fname, text):
        path = os.path.join(self.dir, fname)
        with open(path, "w") as f:
            f.write(text)
        return path


class Backend(Server):
    name = "backend"

    def command(self):
        www = os.path.join(self.dir, "www")
        os.makedirs(www, exist_ok=True)
        for fname, n in (("1k", SMALL), ("10m", BIG)):
            with open(os.path.join(www, fname), "wb") as f:
                f.write((b"0123456789abcdef" * (n // 16 + 1))[:n])
        os.chmod(www, 0o755)
        conf = self.write("nginx.conf", BACKEND_CONF.format(d=self.dir, port=self.port))
        return ["nginx", "-p", self.dir, "-c", conf, "-e", os.path.join(self.dir, "error.log")]


class Nginx(Server):
    name = "nginx"

    def command(self):
        os.makedirs(os.path.join(self.dir, "proxy_temp"), exist_ok=True)
        conf = self.write("nginx.conf", NGINX_CONF.format(d=self.dir, port=self.port, backend=self.backend))
        return ["nginx", "-p", self.dir, "-c", conf, "-e", os.path.join(self.dir, "error.log")]

    def ready(self):
        return len(self.pids()) >= 3


class HAProxy(Server):
    name = "haproxy"

    def command(self):
        conf = self.write("haproxy.cfg", HAPROXY_CONF.format(port=self.port, backend=self.backend))
        return ["haproxy", "-db", "-f", conf]


class GProxy(Server):
    name = "gproxy"
    extra = ""          # more top-level YAML for a variant
    repo = REPO         # the checkout to run
    access_log = '{format: "off"}'

    def command(self):
        self.config = self.write("gproxy.yaml", GPROXY_YAML.format(
            port=self.port, backend=self.backend, extra=self.extra, access_log=self.access_log))
        return [sys.executable, "-m", "gunicorn", "-c", os.path.join(self.repo, "gunicorn.conf.py"),
                "gproxy.wsgi"]

    def spawn_kw(self):
        env = dict(os.environ, GPROXY_CONFIG=self.config,
                   PYTHONPATH=os.pathsep.join(filter(None, [self.repo, os.environ.get("PYTHONPATH")])))
        return {"env": env, "cwd": self.dir}

    def ready(self):
        return len(self.pids()) >= 3


class GProxyBase(GProxy):
    """gproxy as another checkout has it (``--baseline DIR``, e.g. a git
    worktree of the commit before a change), for before/after in one run."""
    name = "gproxy-base"


class GProxyBare(GProxy):
    """Every observability output off: no StatsD, no access log, no live
    figures (the baseline of the cost of observing)."""
    name = "gproxy-bare"
    extra = "live_stats: {enabled: false}"


class GProxyQuiet(GProxy):
    """The three outputs off (StatsD, /metrics, the access log); the live
    counters stay on, as by default, for /status and the global least_conn."""
    name = "gproxy-quiet"
    extra = "live_stats: {prometheus: false}"


class GProxyObserved(GProxy):
    """StatsD (to a UDP sink in this process), the live figures with
    /metrics, and the JSON access log to a file."""
    name = "gproxy-observed"

    def command(self):
        self.extra = f"statsd: {{host: 127.0.0.1, port: {statsd_sink()}}}\nlive_stats: {{prometheus: true}}"
        self.access_log = f'{{format: json, path: "{os.path.join(self.dir, "access.log")}"}}'
        return super().command()


class GProxyObservedRemote(GProxyObserved):
    """The same with ``max_udp_size: 1432``, the default for a StatsD daemon
    on another host (the sink is still on loopback, so each datagram costs
    what a local daemon's does: an upper bound)."""
    name = "gproxy-observed-1432"

    def command(self):
        cmd = super().command()
        self.config = self.write("gproxy.yaml", GPROXY_YAML.format(
            port=self.port, backend=self.backend, access_log=self.access_log,
            extra=self.extra.replace("}", ", max_udp_size: 1432}", 1)))
        return cmd


class GProxyObservedBuffered(GProxyObserved):
    """The same with the access log gathered per worker
    (``buffer: 64KB, flush: 1s``, nginx ``buffer=64k flush=1s``)."""
    name = "gproxy-observed-buf"

    def command(self):
        cmd = super().command()
        self.access_log = self.access_log.replace("}", ", buffer: 64KB, flush: 1s}")
        self.config = self.write("gproxy.yaml", GPROXY_YAML.format(
            port=self.port, backend=self.backend, access_log=self.access_log, extra=self.extra))
        return cmd


class GProxyBaseObserved(GProxyObserved):
    """gproxy-observed as the ``--baseline`` checkout has it."""
    name = "gproxy-base-observed"


class GProxyBaseObservedBuffered(GProxyObservedBuffered):
    """gproxy-observed-buf as the ``--baseline`` checkout has it."""
    name = "gproxy-base-observed-buf"


_SINK = []


def statsd_sink():
    """A UDP port whose datagrams are read and dropped (a StatsD daemon's
    socket costs the proxy the same)."""
    if not _SINK:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))

        def drain():
            while True:
                sock.recv(65536)
        threading.Thread(target=drain, daemon=True, name="statsd_sink").start()
        _SINK.append(sock.getsockname()[1])
    return _SINK[0]


SERVERS = {c.name: c for c in (GProxy, GProxyBase, GProxyBare, GProxyQuiet, GProxyObserved, GProxyObservedRemote,
                                  GProxyObservedBuffered, GProxyBaseObserved, GProxyBaseObservedBuffered,
                                  Nginx, HAProxy)}


# --- the load -----------------------------------------------------------------------

def wrk(port, path, conns, seconds, workdir):
    script = os.path.join(workdir, "report.lua")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(WRK_LUA)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
           f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    r = json.loads(line)
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["mib_s"] = r["bytes"] / (r["duration_us"] / 1e6) / 2**20
    return r


def measured(server, port, path, conns, seconds, workdir):
    """One wrk run against ``server`` with its own CPU accounting and RSS peak."""
    pids = server.pids()
    sampler = RssPeak(server.proc.pid)
    sampler.start()
    u0, s0 = cpu_ticks(pids)
    r = wrk(port, path, conns, seconds, workdir)
    u1, s1 = cpu_ticks(pids)
    r["utime_s"], r["stime_s"] = (u1 - u0) / CLK_TCK, (s1 - s0) / CLK_TCK
    r["cpu_s"] = r["utime_s"] + r["stime_s"]
    r["cpu_us_per_req"] = r["cpu_s"] * 1e6 / max(r["requests"], 1)
    r["rss_start_kib"], r["rss_peak_kib"] = sampler.stop()
    return r


def idle_test(server, n, workdir):
    """Hold n idle keep-alive connections; RSS per connection from the delta."""
    before = rss_kib(server.pids())
    cmd = [sys.executable, os.path.join(HERE, "idle_clients.py"), str(server.port), str(n), "/1k"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    STARTED.append(p)
    try:
        opened = json.loads(_readline(p, 180))
        # let the workers settle after the burst: a gproxy keep-alive
        # connection idle for 1 s parks (no greenlet), its designed idle state
        time.sleep(2.5)
        held = rss_kib(server.pids())
        p.stdin.write("go\n")
        p.stdin.flush()
        reuse = json.loads(_readline(p, 180))
        p.wait(60)
    finally:
        stop(p)
    return {"n": n, "open": opened["open"], "errors": opened["errors"] + reuse["errors"],
            "first_errors": opened["first_errors"] + reuse["first_errors"],
            "reused_ok": reuse["ok"], "open_seconds": opened["seconds"],
            "rss_before_kib": before, "rss_held_kib": held,
            "rss_per_conn_kib": (held - before) / max(opened["open"], 1)}


def _readline(p, timeout):
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        line = p.stdout.readline()
    finally:
        timer.cancel()
    if not line:
        raise RuntimeError("idle client ended without a report")
    return line


# --- the run ------------------------------------------------------------------------

def ensure_tools():
    missing = [pkg for tool, pkg in (("nginx", "nginx-light"), ("haproxy", "haproxy"), ("wrk", "wrk"))
               if not shutil.which(tool)]
    if missing:
        print(f"installing {' '.join(missing)} (apt-get)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=900)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def conditions(args):
    def cmd(*c):
        try:
            r = subprocess.run(c, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import gevent
    import gunicorn
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": model, "cores": os.cpu_count(),
        "kernel": platform.release(), "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "nginx": cmd("nginx", "-v"), "haproxy": cmd("haproxy", "-v"), "wrk": cmd("wrk", "-v"),
        "gunicorn": gunicorn.__version__, "gevent": gevent.__version__,
        "gproxy_commit": cmd("git", "-C", REPO, "describe", "--always", "--dirty"),
        "settings": {k: v for k, v in vars(args).items() if k != "table"},
    }


def run(args):
    ensure_tools()
    nofile = raise_nofile()
    if nofile < args.idle_conns + 1000:
        sys.exit(f"RLIMIT_NOFILE hard limit {nofile} is too low for {args.idle_conns} connections")
    cond = conditions(args)
    workdir = make_workdir("gproxy-bench-")
    names = args.proxies.split(",")
    raw = {n: {"small": [], "lat1": [], "big": []} for n in names}
    raw["direct"] = {"lat1": []}
    try:
        backend = Backend(workdir).start()
        servers = {n: SERVERS[n](workdir, backend.port).start() for n in names}
        for s in servers.values():          # warm up pools and caches
            wrk(s.port, "/1k", 50, 1, workdir)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            print(f"repetition {rep + 1}/{args.reps}: {', '.join(order)}", file=sys.stderr)
            raw["direct"]["lat1"].append(wrk(backend.port, "/1k", 1, args.seconds, workdir))
            for n in order:
                s = servers[n]
                raw[n]["small"].append(measured(s, s.port, "/1k", 50, args.seconds, workdir))
            for n in order:
                s = servers[n]
                raw[n]["lat1"].append(measured(s, s.port, "/1k", 1, args.seconds, workdir))
            for n in order:
                s = servers[n]
                raw[n]["big"].append(measured(s, s.port, "/10m", 4, args.seconds, workdir))
        for n in names:                     # fresh processes for the idle test
            servers[n].stop()
            s = servers[n] = SERVERS[n](workdir, backend.port).start()
            wrk(s.port, "/1k", 4, 1, workdir)
            print(f"{n}: holding {args.idle_conns} idle connections", file=sys.stderr)
            raw[n]["idle"] = idle_test(s, args.idle_conns, workdir)
    finally:
        stop_all()
    cond["loadavg_end"] = os.getloadavg()
    result = {"conditions": cond, "raw": raw, "summary": summarise(raw, names)}
    result["targets"] = targets(result["summary"])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(HERE, "results", f"{stamp}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"\nresults: {os.path.relpath(path)}")
    shutil.rmtree(workdir, ignore_errors=True)


def med(runs, key):
    return statistics.median(r[key] for r in runs) if runs else None


def summarise(raw, names):
    direct_p50 = med(raw["direct"]["lat1"], "p50_us")
    out = {}
    for n in names:
        r = raw[n]
        out[n] = {
            "rps": med(r["small"], "rps"),
            "p50_ms": med(r["small"], "p50_us") / 1000,
            "p99_ms": med(r["small"], "p99_us") / 1000,
            "cpu_us_per_req": med(r["small"], "cpu_us_per_req"),
            "cpu_user_share": med(r["small"], "utime_s") / max(med(r["small"], "cpu_s"), 1e-9),
            "errors_small": sum(x["errors"] for x in r["small"]),
            "added_p50_us": med(r["lat1"], "p50_us") - direct_p50,
            "added_p99_us": med(r["lat1"], "p99_us") - med(raw["direct"]["lat1"], "p99_us"),
            "big_mib_s": med(r["big"], "mib_s"),
            "big_rss_start_mib": med(r["big"], "rss_start_kib") / 1024,
            "big_rss_peak_mib": med(r["big"], "rss_peak_kib") / 1024,
            "big_cpu_us_per_req": med(r["big"], "cpu_us_per_req"),
            "peak_rss_mib": max(x["rss_peak_kib"] for k in ("small", "lat1", "big") for x in r[k]) / 1024,
            "idle_open": r["idle"]["open"], "idle_n": r["idle"]["n"],
            "idle_errors": r["idle"]["errors"],
            "idle_rss_per_conn_kib": r["idle"]["rss_per_conn_kib"],
        }
    return out


ROWS = [
    ("1 KiB, 50 conns: req/s", "rps", "{:,.0f}", "up"),
    ("1 KiB, 50 conns: p50 latency (ms)", "p50_ms", "{:.2f}", "down"),
    ("1 KiB, 50 conns: p99 latency (ms)", "p99_ms", "{:.2f}", "down"),
    ("proxy CPU per request (us)", "cpu_us_per_req", "{:.1f}", "down"),
    ("  of which user space", "cpu_user_share", "{:.0%}", None),
    ("added latency at 1 conn, p50 (us)", "added_p50_us", "{:.0f}", "down"),
    ("added latency at 1 conn, p99 (us)", "added_p99_us", "{:.0f}", "down"),
    ("10 MiB bodies, 4 conns: MiB/s", "big_mib_s", "{:,.0f}", "up"),
    ("10 MiB: RSS at start / peak (MiB)", None, None, None),
    ("peak RSS, all processes (MiB)", "peak_rss_mib", "{:.1f}", "down"),
    ("idle keep-alive conns held / errors", None, None, None),
    ("RSS per idle connection (KiB)", "idle_rss_per_conn_kib", "{:.1f}", "down"),
]


def cell(s, key, fmt):
    if key is None:
        return ""
    v = s.get(key)
    return "-" if v is None else fmt.format(v)


def table(result):
    summary = result["summary"]
    names = list(summary)
    gps = [n for n in names if n.startswith("gproxy")]
    head = names + [f"{g} / nginx" for g in gps if "nginx" in names]
    lines = ["| figure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, key, fmt, direction in ROWS:
        row = []
        for n in names:
            s = summary[n]
            if label.startswith("10 MiB: RSS"):
                row.append(f"{s['big_rss_start_mib']:.0f} / {s['big_rss_peak_mib']:.0f}")
            elif label.startswith("idle"):
                row.append(f"{s['idle_open']:,} of {s['idle_n']:,} / {s['idle_errors']}")
            else:
                row.append(cell(s, key, fmt))
        for g in gps:
            if "nginx" not in names:
                continue
            if direction is None:
                row.append("")
                continue
            a, b = summary[g].get(key) if key else None, summary["nginx"].get(key) if key else None
            row.append(f"{a / b:.2f}x" if a is not None and b not in (None, 0) and b > 0 else "")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    c = result["conditions"]
    lines.append("")
    lines.append(f"{c['date']}, {c['host']}, {c['cpu']}, {c['cores']} cores, kernel {c['kernel']}, "
                 f"Python {c['python']}; {c['nginx']}; {c['haproxy'].split(' - ')[0]}; "
                 f"gproxy {c['gproxy_commit']}; load average {c['loadavg_start'][0]:.2f} at start, "
                 f"{c['loadavg_end'][0]:.2f} at end; {c['settings']['reps']} repetitions of "
                 f"{c['settings']['seconds']} s, medians.")
    for t in result.get("targets", []):
        lines.append(f"- {t}")
    return "\n".join(lines)


def targets(summary):
    g, n = summary.get("gproxy"), summary.get("nginx")
    if not g or not n:
        return []
    def ok(b):
        return "met" if b else "NOT met"
    return [
        f"CPU per request <= 150 us (moonshot 100 us): {g['cpu_us_per_req']:.0f} us, "
        f"{ok(g['cpu_us_per_req'] <= 150)}",
        f"req/s >= 0.45x nginx: {g['rps']:,.0f} req/s, {g['rps'] / n['rps']:.2f}x, "
        f"{ok(g['rps'] >= 0.45 * n['rps'])}",
        f"added p50 at 1 conn <= 200 us: {g['added_p50_us']:.0f} us, {ok(g['added_p50_us'] <= 200)}",
        f"p99 at 50 conns <= 4x nginx: {g['p99_ms'] / n['p99_ms']:.2f}x, "
        f"{ok(g['p99_ms'] <= 4 * n['p99_ms'])}",
        f"10 MiB >= 1.0x nginx: {g['big_mib_s'] / n['big_mib_s']:.2f}x, "
        f"{ok(g['big_mib_s'] >= n['big_mib_s'])}; worker RSS {g['big_rss_start_mib']:.0f} -> "
        f"{g['big_rss_peak_mib']:.0f} MiB while streaming",
        f"{g['idle_n']:,} idle connections: {g['idle_open']:,} held, {g['idle_errors']} errors, "
        f"{g['idle_rss_per_conn_kib']:.1f} KiB each (target <= 8), "
        f"{ok(g['idle_open'] == g['idle_n'] and not g['idle_errors'] and g['idle_rss_per_conn_kib'] <= 8)}",
    ]


def main():
    p = argparse.ArgumentParser(description="gproxy vs nginx vs HAProxy, side by side")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 repetition, 1,000 idle conns")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    p.add_argument("--idle-conns", type=int, default=5000)
    p.add_argument("--proxies", default="gproxy,nginx,haproxy",
                   help=f"comma-separated, from {', '.join(SERVERS)}")
    p.add_argument("--table", metavar="JSON", help="print the table of a results file and exit")
    p.add_argument("--baseline", metavar="DIR",
                   help="a checkout to run as gproxy-base and gproxy-base-observed[-buf] "
                        "(e.g. git worktree add DIR HEAD~1)")
    args = p.parse_args()
    if args.baseline:
        for base in (GProxyBase, GProxyBaseObserved, GProxyBaseObservedBuffered):
            base.repo = os.path.abspath(args.baseline)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    if args.quick:
        args.reps, args.seconds, args.idle_conns = 1, 2, 1000
    unknown = set(args.proxies.split(",")) - set(SERVERS)
    if unknown:
        p.error(f"unknown proxies {sorted(unknown)}; choose from {sorted(SERVERS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run(args)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
