"""The instance as a load balancer in front sees it: a health path on the
traffic listener (HAProxy ``monitor-uri``) and the drain before a stop.

    health_path: /-/health     200 "ok" while the instance serves,
                               503 "draining" once it is being drained
    drain_delay: 10s           how long the 503 is shown before the graceful stop

The drain is the supervisor's (``POST /instance/drain`` on the admin endpoint,
``gproxy drain-instance``): it creates ``<runtime dir>/draining``, which every
worker's health path looks at, and TERMs the arbiter ``drain_delay`` later, so
the LB has taken the instance out before it stops listening. Requests other
than the health path are served as usual until then.

Rule 1: the worker side costs a request that is not the health path one
        dictionary lookup and one comparison; the health path itself one
        ``stat`` (no logging, no metrics, as HAProxy's monitor-uri).
Rule 2: the drain marker lives in the arbiter's runtime directory, so it dies
        with that generation (a USR2 upgrade's new arbiter is not draining).
"""

import logging
import os
import signal
import threading
import time

log = logging.getLogger("gproxy.error")

DRAINING = "draining"
ENV_RUNTIME_DIR = "GPROXY_RUNTIME_DIR"      # set by lifecycle.when_ready before the workers fork


def marker(runtime_dir):
    return os.path.join(runtime_dir, DRAINING)


class HealthPath:
    """The worker side: answers ``health_path`` before any routing."""

    def __init__(self, cfg, runtime_dir=None):
        self.path = cfg.health_path
        runtime_dir = runtime_dir or os.environ.get(ENV_RUNTIME_DIR)
        self.marker = marker(runtime_dir) if runtime_dir else None

    def matches(self, target):
        """``target``: the request target as sent (query ignored)."""
        return self.path is not None and target.split("?", 1)[0] == self.path

    def draining(self):
        return self.marker is not None and os.path.exists(self.marker)

    def __call__(self, method, start_response):
        status, body = ("503 Service Unavailable", b"draining\n") if self.draining() else ("200 OK", b"ok\n")
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [] if method == "HEAD" else [body]


class InstanceDrain:
    """The supervisor side: the marker file and the delayed TERM of the arbiter."""

    def __init__(self, runtime_dir, arbiter_pid):
        self.path = marker(runtime_dir)
        self.arbiter_pid = arbiter_pid
        self.stop_at = None         # monotonic time of the TERM, while draining
        self.timer = None
        self.lock = threading.Lock()
        if os.path.exists(self.path):
            log.warning("instance drain: %s is there (a supervisor restarted while draining); "
                        "the health path answers 503, no stop is scheduled", self.path)

    def drain(self, delay, stop=True):
        """Start answering 503 on the health path; TERM the arbiter after ``delay``."""
        with self.lock:
            with open(self.path, "w") as f:
                f.write(f"{time.time():.3f}\n")
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.stop_at = None, None
            if stop:
                self.stop_at = time.monotonic() + delay
                self.timer = threading.Timer(delay, self.stop_arbiter)
                self.timer.daemon = True
                self.timer.start()
        log.warning("instance drain: health path answers 503%s", f"; stopping in {delay:g}s" if stop else "")

    def enable(self):
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.stop_at = None, None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        log.warning("instance drain: cancelled; health path answers 200")

    def stop_arbiter(self):
        with self.lock:
            if self.stop_at is None:
                return
        log.warning("instance drain: delay over; TERM to the arbiter (pid %d)", self.arbiter_pid)
        try:
            os.kill(self.arbiter_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def status(self):
        with self.lock:
            left = None if self.stop_at is None else max(0.0, self.stop_at - time.monotonic())
        return {"draining": os.path.exists(self.path), "stop_in_s": None if left is None else round(left, 3)}
