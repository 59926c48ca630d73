"""The admin endpoint, served by the supervisor (plain stdlib HTTP, a thread
per request; the supervisor is not a gevent process).

    GET  /status                                     JSON: config, upstreams, backends, traffic
    GET  /metrics                                    Prometheus text format (live_stats.prometheus)
    GET  /dump                                       JSON: each worker's requests and greenlet stacks
    GET  /healthz                                    200 "ok" while the table is being published
    POST /upstreams/<upstream>/backends/<backend>/drain    no new requests from any worker
    POST /upstreams/<upstream>/backends/<backend>/enable   back in rotation
    POST /instance/drain                             health_path answers 503, stop after drain_delay
    POST /instance/enable                            cancel that (before the stop)
    GET  /cache, POST /cache/purge?url=|prefix=      see ``cache`` (administration)

<backend> is the backend's ``host:port`` as in /status. Unknown names get 404
with a message; a client outside loopback and ``admin.allow`` gets 403.
"""

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from . import __version__, counters, livereport, netaddr

log = logging.getLogger("gproxy.error")

ACTIONS = {"drain": True, "enable": False}      # action -> drained


def client_allowed(addr, allow):
    """Loopback always; others only inside one of the ``allow`` networks."""
    ip = netaddr.address(addr)
    return ip is not None and (ip.is_loopback or allow.match(ip))


class AdminServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True      # a restarted supervisor rebinds at once

    def __init__(self, admin_cfg, supervisor):
        host, port = netaddr.split(admin_cfg.listen)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.supervisor = supervisor
        self.allow = admin_cfg.allow
        super().__init__((host, port), AdminHandler)

    def start(self):
        # shutdown() waits for the loop's next look at its flag: every 50 ms
        # keeps a stop (and a supervisor HUP) prompt for a few idle wake-ups
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         name="admin", daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


class AdminHandler(BaseHTTPRequestHandler):
    server_version = f"gproxy-admin/{__version__}"
    sys_version = ""

    def do_GET(self):
        if not self.admitted():
            return
        path = self.path.split("?", 1)[0]
        if path == "/cache":
            self.reply(*_cache().stats(self.server.supervisor.cfg))
        elif path == "/status":
            self.reply(200, status(self.server.supervisor))
        elif path == "/healthz":
            self.healthz()
        elif path == "/metrics" and self.server.supervisor.cfg.live_stats.enabled \
                and self.server.supervisor.cfg.live_stats.prometheus:
            body, ctype = livereport.exposition(self.server.supervisor)
            self.reply(200, body, ctype=ctype)
        elif path == "/dump":
            self.reply(200, dump(self.server.supervisor.runtime_dir))
        elif self.action(path) is not None:
            self.reply(405, {"error": "use POST for actions"}, [("Allow", "POST")])
        else:
            self.reply(404, {"error": f"no admin resource {path}; see /status"})

    def do_POST(self):
        if not self.admitted():
            return
        self.discard_body()
        if self.path.split("?", 1)[0] in ("/instance/drain", "/instance/enable"):
            return self.instance_action(self.path.split("?", 1)[0].rsplit("/", 1)[1])
        if self.path.split("?", 1)[0] == "/cache/purge":
            self.reply(*_cache().purge(self.server.supervisor.cfg, self.path, self.client_address[0]))
            return
        found = self.action(self.path.split("?", 1)[0])
        if found is None:
            self.reply(404 if not self.path.startswith(("/status", "/healthz")) else 405,
                       {"error": f"no admin action {self.path}; expected "
                                 "/upstreams/<upstream>/backends/<backend>/drain or /enable"})
            return
        upstream, backend, verb = found
        sup = self.server.supervisor
        with sup.lock:
            missing = unknown(sup, upstream, backend)
            if missing:
                self.reply(404, {"error": missing})
                return
            sup.set_drained(upstream, backend, ACTIONS[verb])
            body = backend_status(sup, upstream, backend, time.monotonic())
        log.warning("admin: %s %s backend %s of upstream %s", self.client_address[0],
                    "drained" if ACTIONS[verb] else "enabled", backend, upstream)
        self.reply(200, body)

    def instance_action(self, verb):
        sup = self.server.supervisor
        if verb == "drain":
            sup.instance.drain(sup.cfg.drain_delay)
        else:
            sup.instance.enable()
        log.warning("admin: %s %s the instance", self.client_address[0],
                    "drained" if verb == "drain" else "enabled")
        self.reply(200, dict(sup.instance.status(), drain_delay_s=sup.cfg.drain_delay,
                             arbiter_pid=sup.arbiter_pid))

    # -- helpers -------------------------------------------------------------------

    def admitted(self):
        if client_allowed(self.client_address[0], self.server.allow):
            return True
        self.reply(403, {"error": f"client {self.client_address[0]} is not allowed "
                                  "(loopback only unless admin.allow lists it)"})
        return False

    def action(self, path):
        parts = path.strip("/").split("/")
        if len(parts) == 5 and parts[0] == "upstreams" and parts[2] == "backends" and parts[4] in ACTIONS:
            return unquote(parts[1]), unquote(parts[3]), parts[4]
        return None

    def healthz(self):
        sup = self.server.supervisor
        age = time.monotonic() - sup.table_heartbeat()
        if age <= 2.0:
            self.reply(200, "ok\n")
        else:
            self.reply(503, f"health table not published for {age:.1f}s\n")

    def discard_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= 65536:
            self.rfile.read(n)

    def reply(self, code, body, extra=(), ctype=None):
        if isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data, ctype = body.encode(), ctype or "text/plain; charset=utf-8"
        else:
            data = (json.dumps(body, indent=2) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, fmt, *args):
        log.debug("admin: %s %s", self.client_address[0], fmt % args)


def _cache():
    """The cache's administration, imported on first use: it brings the
    request path's modules, which the supervisor does not otherwise load."""
    from . import cache
    return cache


def unknown(sup, upstream, backend):
    """The 404 message for an unknown upstream or backend, else None."""
    cfg = sup.cfg
    if upstream not in cfg.upstreams:
        return f"no upstream named {upstream!r} (known: {', '.join(sorted(cfg.upstreams)) or 'none'})"
    names = [b.name for b in cfg.upstreams[upstream].backends]
    if backend not in names:
        return f"upstream {upstream!r} has no backend {backend!r} (known: {', '.join(names)})"
    return None


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def status(sup):
    with sup.lock:
        now = time.monotonic()
        cfg = sup.cfg
        ups = {}
        for name, up in cfg.upstreams.items():
            backends = [backend_status(sup, name, b.name, now) for b in up.backends]
            ups[name] = {"available": sum(b["available"] for b in backends),
                         "total": len(backends), "balance": up.balance, "backends": backends}
        return {
            "version": __version__, "pid": sup.pid(), "arbiter_pid": sup.arbiter_pid,
            "started": _iso(sup.started), "started_unix": round(sup.started, 3),
            "config": {"file": cfg.source, "sha256": sup.digest, "loaded": _iso(sup.loaded_at),
                       "reload_error": sup.reload_error, "reloads": sup.reloads},
            "instance": sup.instance.status(),
            "runtime_dir": sup.runtime_dir,
            "table": {"path": sup.table.path, "version": sup.table.version, "sequence": sup.table.seq},
            "upstreams": ups,
            "traffic": live_traffic(sup),
        }


def live_traffic(sup):
    """The workers' summed figures (None with live_stats off)."""
    if not sup.cfg.live_stats.enabled:
        return None
    sums, window, workers = sup.live.snapshot()
    return livereport.traffic(sup.cfg, sums, window, workers, sup.cfg.live_stats.window)


DUMP_TIMEOUT = 5.0      # a worker whose hub is blocked this long is itself the answer


def dump(runtime_dir):
    """Ask every worker's dump socket; a worker that does not answer is listed
    with the reason (a blocked event loop shows up that way)."""
    out = []
    try:
        names = sorted(os.listdir(runtime_dir))
    except OSError as e:
        return {"error": f"runtime directory {runtime_dir}: {e.strerror}", "workers": []}
    for name in names:
        if not (name.startswith(counters.DUMP_PREFIX) and name.endswith(counters.DUMP_SUFFIX)):
            continue
        pid = name[len(counters.DUMP_PREFIX):-len(counters.DUMP_SUFFIX)]
        try:
            out.append(json.loads(_ask(os.path.join(runtime_dir, name))))
        except (OSError, ValueError) as e:
            out.append({"pid": int(pid) if pid.isdigit() else pid,
                        "error": f"no answer: {getattr(e, 'strerror', None) or e}"})
    return {"workers": out}


def _ask(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DUMP_TIMEOUT)
        s.connect(path)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def backend_status(sup, upstream, backend, now):
    bh = sup.backends[(upstream, backend)]
    state = bh.state(now)
    a, p = bh.active, bh.passive
    return {
        "name": backend, "url": bh.backend.url, "weight": bh.backend.weight,
        "state": state, "available": state == "up", "reason": bh.reason(now), "drained": bh.drained,
        "active": None if a is None else {
            "up": a.up, "rise": a.rise, "fall": a.fall,
            "consecutive_successes": a.successes, "consecutive_failures": a.failures,
            "last_check": bh.last_check,
        },
        "passive": {
            "ejected": p.ejected(now), "ejected_for_s": round(max(0.0, p.ejected_until - now), 3),
            "recent_failures": p.failures_in_window(now), "max_fails": p.max_fails,
            "fail_timeout_s": p.fail_timeout,
        },
    }
