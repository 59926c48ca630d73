"""The supervisor: ``python -m gproxy.supervisor --runtime-dir DIR --arbiter-pid PID``.

One per arbiter, started and watched by ``lifecycle``. It owns what is
global: active health checks, the aggregation of every worker's passive
failure reports, drains, the shared health table (its only writer) and the
admin endpoint. It is a plain threaded process, not a gevent worker.

Threads:
    main            queued signals (HUP: reload; USR1: reopen the log files;
                    TERM/INT/QUIT: stop), the
                    heartbeat publish, the watch on the arbiter
    check_<u>_<b>   one per actively checked backend, so a slow backend
                    delays only its own checks
    failure_reports the workers' failure datagrams
    admin           the admin HTTP server (a thread per request)

Rule 1: all health state sits behind one lock, and the table is written
        under it, so there is one writer even with many threads.
Rule 2: every change is published at once; otherwise a heartbeat is
        published every ``HEARTBEAT`` seconds.
Rule 3: a new supervisor (after a crash) starts from what the table last
        held (up/down, drained, ejected), so a drain or a dead backend is not
        forgotten when the supervisor is killed.
Rule 4: it exits when the arbiter dies (PR_SET_PDEATHSIG, and a getppid()
        poll for the window before prctl), removing the runtime directory,
        which no one else will.
"""

import argparse
import ctypes
import dataclasses
import hashlib
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time

from . import __version__, config, counters, errors, logs
from .errors import ConfigError
from .health import ActiveHealth, SharedPassive
from .healthtable import FailureReceiver, TableFull, TableWriter, encode, failures_path, table_path
from .instance import InstanceDrain
from .stats import Stats

log = logging.getLogger("gproxy.error")

HEARTBEAT = 0.25        # seconds between table heartbeats (workers' stale_after is 5 s)
PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGUSR2


class HealthEvents:
    """Where health changes are reported: StatsD gauges, counters and timers
    (``stats.Stats``; every call is a no-op when metrics are off)."""

    def __init__(self):
        self.statsd_cfg = None
        self.stats = None

    def configure(self, statsd_cfg):
        if statsd_cfg != self.statsd_cfg:
            self.statsd_cfg, self.stats = statsd_cfg, Stats(statsd_cfg)

    def state_changed(self, upstream, backend, up, reason):
        """A backend became available (up=True) or unavailable."""
        if self.stats is not None:
            self.stats.health_state_changed(upstream, backend, up)

    def check_done(self, upstream, backend, seconds, ok):
        """One active check finished."""
        if self.stats is not None:
            self.stats.health_check_latency(upstream, backend, seconds)

    def available(self, upstream, n):
        """The number of available backends of an upstream changed."""
        if self.stats is not None:
            self.stats.health_available(upstream, n)

    def active(self, sums, backends):
        """The absolute active gauges, summed over live workers (each second);
        ``backends``: the (upstream, backend) keys of the config."""
        if self.stats is not None:
            self.stats.active_gauges(sums.get(("requests_active",), 0), sums.get(("tunnels_active",), 0),
                                     {k: sums.get(("active", *k), 0) for k in backends})


class BackendHealth:
    """Everything the supervisor knows about one backend."""

    def __init__(self, up_cfg, backend, restored=None):
        self.upstream, self.backend = up_cfg.name, backend
        hc = up_cfg.health_check
        single = len(up_cfg.backends) == 1
        r = restored or (True, False, 0.0, "")
        self.active = ActiveHealth(hc.rise, hc.fall, up=bool(r[0]), confirmed=restored is not None,
                                   reason=r[3] or "initial") if hc else None
        self.passive = SharedPassive(up_cfg.passive.max_fails, up_cfg.passive.fail_timeout, single,
                                     ejected_until=float(r[2]))
        self.drained = bool(r[1])
        self.last_check = None
        self.was_available = None

    def carry(self, old):
        """Keep what was known across a reload (the new config's numbers apply)."""
        self.drained, self.last_check = old.drained, old.last_check
        self.passive.ejected_until, self.passive.recent = old.passive.ejected_until, old.passive.recent
        self.passive.reason = old.passive.reason
        if self.active and old.active:
            for name in ("up", "confirmed", "successes", "failures", "reason", "changed_at"):
                setattr(self.active, name, getattr(old.active, name))
        self.was_available = old.was_available

    def state(self, now):
        if self.drained:
            return "drained"
        if self.active and not self.active.up:
            return "down"
        if self.passive.ejected(now):
            return "ejected"
        return "up"

    def reason(self, now):
        state = self.state(now)
        if state == "drained":
            return "drained by the admin endpoint"
        if state == "down":
            return self.active.reason
        if state == "ejected":
            return self.passive.reason
        return ""

    def flags(self, now):
        """The table entry: [up, drained, ejected_until, reason]."""
        up = self.active.up if self.active else True
        return [up, self.drained, self.passive.ejected_until, self.reason(now)]


# --- active checks -----------------------------------------------------------------

def check_session(upstream):
    """A requests Session for one checker thread, with gproxy's adapter (the
    one HTTP/1.1 client, the upstream's TLS settings) and the check's timeout
    for every phase."""
    from . import transport     # requests: imported in the supervisor only, never the arbiter
    t = upstream.health_check.check_timeout
    cfg = dataclasses.replace(upstream, timeouts=config.Timeouts(connect=t, response_header=t,
                                                                 idle=t, total=t),
                              pool=config.Pool(max_idle_per_backend=1))
    return transport.session(cfg)


def probe(session, backend, hc):
    """One HTTP check: (ok, status or None, seconds, detail)."""
    t0 = time.monotonic()
    try:
        r = session.get(backend.url + hc.path, stream=True, timeout=(hc.check_timeout,) * 2,
                        headers={"Host": hc.host or backend.name, "Connection": "close",
                                 "User-Agent": f"gproxy-health-check/{__version__}"})
        r.close()
    except errors.UpstreamTimeout:
        return False, None, time.monotonic() - t0, f"timeout after {hc.check_timeout:g}s"
    except errors.InvalidResponse as e:
        return False, None, time.monotonic() - t0, f"invalid response: {e}"
    except errors.ProxyError as e:
        return False, None, time.monotonic() - t0, f"connect error: {e}"
    status = r.status_code
    lo, hi = hc.expect
    ok = lo <= status <= hi
    detail = f"status {status}" + ("" if ok else f", expected {lo}-{hi}")
    return ok, status, time.monotonic() - t0, detail


class Checker(threading.Thread):
    """Checks one backend every ``interval`` (start to start)."""

    def __init__(self, sup, key, backend, upstream):
        super().__init__(name=f"check_{key[0]}_{key[1]}", daemon=True)
        self.sup, self.key, self.backend, self.hc = sup, key, backend, upstream.health_check
        self.session = check_session(upstream)
        self.stopped = threading.Event()

    def run(self):
        next_at = time.monotonic()
        while not self.stopped.wait(max(0.0, next_at - time.monotonic())):
            next_at = time.monotonic() + self.hc.interval
            result = probe(self.session, self.backend, self.hc)
            self.sup.check_result(self, *result)


# --- the supervisor --------------------------------------------------------------

class Supervisor:
    def __init__(self, runtime_dir, arbiter_pid, events=None):
        self.runtime_dir, self.arbiter_pid = runtime_dir, arbiter_pid
        self.events = events or HealthEvents()
        self.lock = threading.RLock()
        self.table = TableWriter(table_path(runtime_dir))
        self.receiver = FailureReceiver(failures_path(runtime_dir))
        self.cfg = None
        self.digest = ""
        self.loaded_at = 0.0
        self.reload_error = None
        self.reloads = 0            # HUPs handled, good or bad (gproxy reload waits on it)
        self.instance = InstanceDrain(runtime_dir, arbiter_pid)
        self.backends = {}          # (upstream, backend name) -> BackendHealth, config order
        self.checkers = {}
        self.counts = {}
        self.last_payload = None
        self.admin = None
        self.admin_retry_at = 0.0
        self.started = time.time()
        self.signals = []
        # Signals wake the main loop through a pipe: a handler that set a
        # threading.Event could deadlock on the Event's lock, held by the
        # main thread it interrupted (a HUP right after a USR1 hung it).
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.published_at = 0.0
        self.live = counters.Totals(runtime_dir)
        self.live_at = 0.0

    def pid(self):
        return os.getpid()

    def table_heartbeat(self):
        return self.published_at

    # -- configuration ----------------------------------------------------------

    def apply(self, cfg):
        """Take a (new) config: keep what is known about backends that stay."""
        self.events.configure(cfg.statsd)
        logs.setup(cfg.error_log)      # (re)opened on every load, so a HUP follows logrotate
        restored = self.table.restored if self.cfg is None else {}
        with self.lock:
            old, self.backends = self.backends, {}
            for up in cfg.upstreams.values():
                for b in up.backends:
                    key = (up.name, b.name)
                    bh = BackendHealth(up, b, restored.get(up.name, {}).get(b.name))
                    if key in old:
                        bh.carry(old[key])
                    self.backends[key] = bh
            for checker in self.checkers.values():
                checker.stopped.set()
            self.checkers = {}
            for up in cfg.upstreams.values():
                if up.health_check:
                    for b in up.backends:
                        c = self.checkers[(up.name, b.name)] = Checker(self, (up.name, b.name), b, up)
                        c.start()
            self.counts = {u: n for u, n in self.counts.items() if u in cfg.upstreams}
            self.live.window = cfg.live_stats.window
            admin_changed = self.cfg is None or self.cfg.admin != cfg.admin
            self.cfg, self.digest, self.loaded_at, self.reload_error = cfg, config_digest(cfg), time.time(), None
            save_good(self.runtime_dir, cfg)
            self.publish(time.monotonic())
        if admin_changed:
            self.start_admin()

    def reload(self):
        """Load the config file again. ``reloads`` counts the reload only
        once its outcome (the new digest, or ``reload_error``) is in place:
        ``gproxy reload`` waits for the count to pass the one it saw and
        then compares the digest, which an admin thread could otherwise
        read half-way (it reported "the file changed again?")."""
        try:
            cfg = config.load()
        except ConfigError as e:
            self.reload_error = str(e)
            log.error("supervisor: reload failed, keeping the previous configuration: %s", e)
        else:
            self.apply(cfg)
            log.info("supervisor: configuration %s reloaded (%d upstreams, %d backends)",
                     cfg.source, len(cfg.upstreams), len(self.backends))
        finally:
            self.reloads += 1

    def start_admin(self):
        from .admin import AdminServer
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        try:
            self.admin = AdminServer(self.cfg.admin, self)
        except OSError as e:
            self.admin_retry_at = time.monotonic() + 2.0
            log.error("supervisor: admin endpoint cannot listen on %s: %s (retrying)",
                      self.cfg.admin.listen, e.strerror or e)
            return
        self.admin.start()
        log.info("supervisor: admin endpoint on http://%s", self.cfg.admin.listen)

    # -- state changes (any thread) ------------------------------------------------

    def check_result(self, checker, ok, status, seconds, detail):
        with self.lock:
            if checker.stopped.is_set():
                return          # a check begun before a reload
            u, b = checker.key
            bh = self.backends[checker.key]
            bh.last_check = {"ok": ok, "status": status, "latency_ms": round(seconds * 1000, 3),
                             "at": time.time(), "detail": detail}
            now = time.monotonic()
            if bh.active.result(ok, now, f"active check: {detail}"):
                self.publish(now)       # logs the change
        self.events.check_done(u, b, seconds, ok)

    def failure_reported(self, upstream, backend, kind):
        with self.lock:
            bh = self.backends.get((upstream, backend))
            if bh is None:
                return          # from a worker of an older config
            now = time.monotonic()
            if bh.passive.failure(now, kind):
                self.publish(now)

    def set_drained(self, upstream, backend, drained):
        with self.lock:
            bh = self.backends[(upstream, backend)]
            bh.drained = drained
            self.publish(time.monotonic())
            return bh

    def publish(self, now):
        """Write the table (payload only when it changed); log and report
        every change of availability. Called with the lock held."""
        states = {}
        for (u, b), bh in self.backends.items():
            states.setdefault(u, {})[b] = bh.flags(now)
        payload = encode(states)
        try:
            self.table.publish(now, payload if payload != self.last_payload else None)
            self.last_payload = payload
        except TableFull as e:
            log.error("supervisor: %s; workers keep the last state", e)
            self.table.publish(now)
        self.published_at = now
        self.report_changes(now)

    def report_changes(self, now):
        counts = {}
        for (u, b), bh in self.backends.items():
            avail = bh.state(now) == "up"
            counts[u] = counts.get(u, 0) + avail
            if avail != bh.was_available:
                if bh.was_available is not None:   # a change, not the first look
                    log.warning("upstream %s backend %s is %s%s", u, b,
                                "available" if avail else "unavailable",
                                "" if avail else f": {bh.reason(now)}")
                    self.events.state_changed(u, b, avail, bh.reason(now))
                bh.was_available = avail
        for u, n in counts.items():
            if self.counts.get(u) != n:
                self.counts[u] = n
                self.events.available(u, n)

    # -- the process ------------------------------------------------------------------

    def receive_failures(self):
        while True:
            try:
                item = self.receiver.receive()
            except OSError as e:
                log.error("supervisor: failure reports stopped: %s", e)
                return
            if item is not None:
                self.failure_reported(*item)

    def queue_signal(self, signum, frame):
        self.signals.append(signum)     # handled by the main loop
        try:
            os.write(self.wake_w, b"!")
        except BlockingIOError:
            pass                        # the pipe is full: the loop is awake anyway

    def run(self):
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, PARENT_DEATH_SIGNAL,
                    signal.SIGUSR1):
            signal.signal(sig, self.queue_signal)
        threading.Thread(target=self.receive_failures, name="failure_reports", daemon=True).start()
        while True:
            if select.select([self.wake_r], [], [], HEARTBEAT)[0]:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            while self.signals:
                sig = self.signals.pop(0)
                if sig == signal.SIGHUP:
                    self.reload()
                elif sig == signal.SIGUSR1:     # logrotate moved the files
                    logs.setup(self.cfg.error_log)
                elif sig == PARENT_DEATH_SIGNAL:
                    if self.parent_exited():
                        return self.stop(f"the arbiter (pid {self.arbiter_pid}) died")
                else:
                    return self.stop(f"signal {signal.Signals(sig).name}")
            if os.getppid() != self.arbiter_pid:
                return self.stop(f"the arbiter (pid {self.arbiter_pid}) is gone")
            with self.lock:
                self.publish(time.monotonic())
            self.live_tick(time.monotonic())
            if self.admin is None and time.monotonic() >= self.admin_retry_at:
                self.start_admin()

    def live_tick(self, now):
        """Every second: sum the workers' live counters, retire the dead ones,
        send the active gauges (stats Rule 5)."""
        if now - self.live_at < 1.0:
            return
        self.live_at = now
        sums = self.live.tick(now)
        with self.lock:
            keys = list(self.backends)
        self.events.active(sums, keys)

    def parent_exited(self, wait=2.0):
        """After the death signal: the kernel sends it when the arbiter's
        forking thread exits, which can be a moment before the arbiter is
        gone and this process re-parented; wait for that (bounded)."""
        deadline = time.monotonic() + wait
        while os.getppid() == self.arbiter_pid:
            if time.monotonic() > deadline:
                log.warning("supervisor: death signal, but the arbiter (pid %d) is still "
                            "the parent; carrying on", self.arbiter_pid)
                return False
            time.sleep(0.01)
        return True

    def stop(self, why):
        parent_gone = os.getppid() != self.arbiter_pid
        for checker in list(self.checkers.values()):
            checker.stopped.set()
        if parent_gone:
            # No arbiter will clean up; its workers exit on their own.
            # First, before anything that could block or fail.
            shutil.rmtree(self.runtime_dir, onerror=_log_rmtree_error)
        if self.admin is not None:
            self.admin.close()
        self.receiver.close()
        if not parent_gone:
            try:
                os.unlink(failures_path(self.runtime_dir))
            except FileNotFoundError:
                pass
        log.info("supervisor (pid %d) exiting: %s", os.getpid(), why)
        return 0


def _log_rmtree_error(func, path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        log.warning("supervisor: cannot remove %s: %s", path, exc_info[1])


LAST_GOOD = "last-good.yaml"


def save_good(runtime_dir, cfg):
    """Keep the text of the config in use, for a supervisor restarted after a
    HUP with a broken file (the arbiter still serves the old config)."""
    if cfg.source == "<built-in>":
        return
    try:
        with open(cfg.source, "rb") as f:
            text = f.read()
        tmp = os.path.join(runtime_dir, LAST_GOOD + ".tmp")
        with open(tmp, "wb") as f:
            f.write(text)
        os.replace(tmp, os.path.join(runtime_dir, LAST_GOOD))
    except OSError as e:
        log.warning("supervisor: cannot keep a copy of %s: %s", cfg.source, e.strerror)


def load_config(runtime_dir):
    """The config file; if it is broken, the copy of the last good one."""
    try:
        return config.load()
    except ConfigError as e:
        saved = os.path.join(runtime_dir, LAST_GOOD)
        if not os.path.exists(saved):
            raise
        with open(saved, encoding="utf-8") as f:
            cfg = config.parse(f.read(), saved)
        log.error("supervisor: %s; using the last good configuration (kept as %s)", e, saved)
        return cfg


def config_digest(cfg):
    if cfg.source == "<built-in>":
        return hashlib.sha256(config.DEFAULT_YAML.encode()).hexdigest()
    try:
        with open(cfg.source, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return f"unreadable: {e.strerror}"


def die_with_parent(arbiter_pid):
    """PR_SET_PDEATHSIG: PARENT_DEATH_SIGNAL when the arbiter dies (not
    SIGTERM, which is the arbiter asking for a clean stop: on the arbiter's
    death the runtime directory is ours to remove); then check it did not die
    before the prctl took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0) != 0:
            log.warning("supervisor: prctl(PR_SET_PDEATHSIG) failed: %s",
                        os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("supervisor: no prctl (%s); relying on the getppid() poll", e)
    return os.getppid() == arbiter_pid


def setup_log():
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    root = logging.getLogger("gproxy")
    root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv=None):
    p = argparse.ArgumentParser(prog="gproxy.supervisor", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("--arbiter-pid", type=int, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # a reopen before run() must not kill it
    setup_log()
    if not die_with_parent(args.arbiter_pid):
        log.error("supervisor: the arbiter (pid %d) is already gone", args.arbiter_pid)
        return 1
    os.makedirs(args.runtime_dir, mode=0o700, exist_ok=True)
    try:
        cfg = load_config(args.runtime_dir)
    except ConfigError as e:
        log.error("supervisor: %s", e)
        return 1
    sup = Supervisor(args.runtime_dir, args.arbiter_pid)
    sup.apply(cfg)
    log.info("supervisor (pid %d) running: %d upstreams, %d backends, table %s",
             os.getpid(), len(cfg.upstreams), len(sup.backends), sup.table.path)
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
