"""What a worker tells operators beyond StatsD: the live shared counters, the
list of upstream attempts in the access log, and a dump of what it is doing.

The request path calls in at the places it already does its accounting
(``stats.request_started``, ``record``, ``attempt_failed``, the tunnel
calls, the in-flight array), so this module adds no step to a request.

Rule 1: ``Metrics`` puts the StatsD client and the shared counters behind
        the one interface the handlers already call; with ``live_stats``
        off it is not used at all (the handlers get the StatsD ``Stats``).
Rule 2: every failed attempt is appended to ``ex.attempts`` (backend,
        kind, seconds); the answering attempt is known from the exchange
        itself at record time, so a request without a retry allocates
        nothing here.
Rule 3: the dump costs nothing until asked: a greenlet blocked in accept()
        on ``dump-<pid>.sock`` in the runtime directory. Asked, it walks
        the greenlets' frames (``gevent.util.format_run_info``) and finds
        each in-flight request by its Exchange in those frames, so requests
        are not registered anywhere on their way through.
"""

import gc
import json
import logging
import os
import time

from . import counters

log = logging.getLogger("gproxy.error")


class Metrics:
    """StatsD (``stats.Stats``) and the shared counters, one call each."""

    __slots__ = ("statsd", "live", "request_started", "record")

    def __init__(self, statsd, live):
        self.statsd, self.live = statsd, live
        # The two calls of every request go straight to what does the work:
        # StatsD sends nothing at a request's start (stats Rule 5), nor
        # anything at all when it is off.
        self.request_started = live.request_started
        self.record = self._both if statsd.client is not None else live.record

    def _both(self, ex):
        self.statsd.record(ex)
        self.live.record(ex)

    def attempt_failed(self, upstream, backend, kind, ejected):
        self.statsd.attempt_failed(upstream, backend, kind, ejected)
        self.live.attempt_failed(upstream, backend, kind)

    def tunnel_opened(self):
        self.statsd.tunnel_opened()
        self.live.tunnel_opened()

    def tunnel_closed(self, bytes_up, bytes_down, seconds):
        self.statsd.tunnel_closed(bytes_up, bytes_down, seconds)
        self.live.tunnel_closed(bytes_up, bytes_down)

    def close(self):
        self.statsd.close()

    def __getattr__(self, name):
        # Events only StatsD counts (a rate-limit store error, ...) go to it alone.
        return getattr(self.statsd, name)


def live_counters(cfg, shared=None):
    """This worker's shared counters (None when ``live_stats`` is off); its
    file sits in the runtime directory of ``shared`` (the worker's
    ``WorkerHealth``) when a supervisor runs, else in private memory."""
    if not cfg.live_stats.enabled:
        return None
    return counters.WorkerCounters(cfg, getattr(shared, "runtime_dir", None))


def metrics(statsd, live):
    return statsd if live is None else Metrics(statsd, live)


def inflight(live, upstream_cfg):
    """The in-flight array of an upstream: shared slots, or a private list."""
    if live is None:
        return [0] * len(upstream_cfg.backends)
    return live.inflight(upstream_cfg.name)


def load(live, upstream_cfg, inflight_array):
    """What the balancer compares: every worker's in-flight requests (global
    ``least_conn``), or this worker's alone without shared counters."""
    if live is None or live.runtime_dir is None:
        return inflight_array
    if not hasattr(live, "peers"):
        live.peers = counters.Peers(live.runtime_dir, live.pid)
    return counters.GlobalLoad(inflight_array, live.peers, upstream_cfg.name,
                                [b.name for b in upstream_cfg.backends])


# --- the access log's attempt list ---------------------------------------------------

def micro(seconds):
    """``seconds`` rounded to the microsecond: ``round(seconds, 6)`` for a
    duration (never negative), at a third of its cost (it is called up to
    three times a request)."""
    return int(seconds * 1e6 + 0.5) / 1e6


def attempt_failed(ex, kind, seconds):
    """One failed attempt. A failure after the response header came
    (mid-body) is the answering attempt's: kept with its status and timed
    at record time."""
    if ex.attempts is None:
        ex.attempts = []
    answered = ex.upstream_start is not None
    ex.attempts.append({"backend": ex.backend, "status": ex.status if answered else None,
                        "error": kind, "time": None if answered else micro(seconds)})


def attempts(ex):
    """Every upstream attempt of the request, in order, nginx's
    ``$upstream_addr`` / ``$upstream_status`` / ``$upstream_response_time``
    as one list; None when no backend was tried."""
    if ex.upstream_start is None:
        return list(ex.attempts) if ex.attempts else None
    t = micro(time.monotonic() - ex.upstream_start)
    answering = {"backend": ex.backend, "status": ex.status, "error": None, "time": t}
    if not ex.attempts:                             # the common case: one attempt
        return [answering]
    out = list(ex.attempts)
    if out[-1]["time"] is None:                     # it broke mid-body
        out[-1] = dict(out[-1], time=t)
    else:
        out.append(answering)
    return out


# --- the dump ----------------------------------------------------------------------

# The innermost gproxy function of a greenlet's stack says what its request
# is doing; the first of these names found, walking outwards, wins.
PHASES = {
    "_length_pieces": "reading request body", "_chunked_pieces": "reading request body",
    "dial": "connecting to backend", "send": "waiting for response header",
    "read_head": "waiting for response header", "__iter__": "sending response body",
    "run": "tunnel", "carry": "tunnel", "forward": "waiting for response header",
    "relay": "upgrade", "__call__": "handling",
}


def dump_path(runtime_dir, pid):
    return os.path.join(runtime_dir, f"{counters.DUMP_PREFIX}{pid}{counters.DUMP_SUFFIX}")


def serve_dump(runtime_dir):
    """Start the dump greenlet of this worker (a no-op without a runtime dir)."""
    if not runtime_dir:
        return None
    import gevent
    from gevent import socket
    path = dump_path(runtime_dir, os.getpid())
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(8)
    except OSError as e:
        log.warning("dump socket %s: %s; `gproxy dump` will not see this worker", path, e.strerror)
        sock.close()
        return None
    return gevent.spawn(_dump_server, sock)


def _dump_server(sock):
    import gevent
    gevent.getcurrent().name = "dump_server"
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(json.dumps(snapshot(), default=str).encode())
        except OSError as e:
            log.debug("dump: client went away: %s", e)
        finally:
            conn.close()


def snapshot(now=None):
    """This worker: its in-flight requests and every greenlet's stack."""
    from gevent import util
    import greenlet
    now = time.time() if now is None else now
    requests = []
    for g in [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet)]:
        found = _in_flight(g.gr_frame)
        if found is not None:
            ex, phase = found
            requests.append({
                "greenlet": getattr(g, "name", None) or f"{type(g).__name__}-{id(g):x}",
                "method": ex.method, "target": ex.target, "client": ex.client,
                "route": ex.route, "upstream": ex.upstream, "backend": ex.backend,
                "phase": phase, "age_s": round(now - ex.start, 3), "request_id": ex.request_id,
                "attempts": attempts(ex)})
    return {"pid": os.getpid(), "requests": sorted(requests, key=lambda r: -r["age_s"]),
            "greenlets": "\n".join(util.format_run_info())}


def _in_flight(frame):
    """(exchange, phase) when a request is in this stack, else None."""
    ex = phase = None
    while frame is not None:
        if phase is None and "gproxy" in frame.f_code.co_filename:
            phase = PHASES.get(frame.f_code.co_name)
        if ex is None:
            ex = _exchange_in(frame.f_locals)
        frame = frame.f_back
    return None if ex is None else (ex, phase or "handling")


def _exchange_in(local_vars):
    for v in local_vars.values():
        if type(v).__name__ == "Exchange":
            return v
        inner = getattr(v, "ex", None) if hasattr(type(v), "__slots__") else None
        if type(inner).__name__ == "Exchange":
            return inner
    return None
