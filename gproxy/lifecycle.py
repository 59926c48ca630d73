"""The arbiter side of gproxy's processes, called from gunicorn.conf.py hooks.

Runs in the gunicorn arbiter, so it imports no requests, urllib3, ssl or
gevent (they must be imported after the gevent worker has monkey-patched,
benoitc/gunicorn#2796).

Rule 1: gunicorn re-executes gunicorn.conf.py on every HUP, losing its
        globals; what must live across reloads lives here (an imported module
        is kept) and on ``server.gproxy_supervisor``.
Rule 2: a HUP with a broken config keeps the last good one: gunicorn would
        otherwise exit on the error, and the new workers load their config
        from ``CONFIG`` (inherited at fork), not from the file.
Rule 3: the supervisor is started in ``when_ready`` and watched by a thread
        that starts a new one within a second of its death (the arbiter's
        ``waitpid(-1)`` may reap it, so its own log says why it exited).
        ``on_reload`` sends it HUP, ``on_exit`` stops it and waits.
Rule 4: each arbiter has its own runtime directory, named by its pid, so the
        two generations of a USR2 upgrade never share state. Workers learn it
        from ``$GPROXY_RUNTIME_DIR``, set before they are forked.
Rule 5: USR1 to the arbiter (logrotate) reopens its files and its workers'
        (gunicorn) and, passed on here, the supervisor's. A USR1 sent to the
        supervisor directly (``systemctl kill`` without ``--kill-who=main``)
        reopens its files too, and never kills it.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from . import config, logs
from .errors import ConfigError

log = logging.getLogger("gproxy.error")

ENV_RUNTIME_DIR = "GPROXY_RUNTIME_DIR"
CONFIG = None           # the last good config of this arbiter
WATCH_EVERY = 0.2       # seconds between looks at the supervisor
BACKOFF_MAX = 5.0       # a supervisor that keeps dying is restarted at most this often


def load_config():
    """The config for gunicorn.conf.py: exit on a bad file at start, keep the
    previous one on a bad file at reload."""
    global CONFIG
    try:
        cfg = config.load()
    except ConfigError as e:
        if CONFIG is None:
            print(f"gproxy: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"gproxy: reload failed, keeping the previous configuration: {e}",
              file=sys.stderr, flush=True)
        return CONFIG
    CONFIG = cfg
    return cfg


def runtime_dir(cfg, pid):
    """``<base>/gproxy-<arbiter pid>``; base: ``runtime_dir``, else the first
    writable of $XDG_RUNTIME_DIR, /dev/shm, /tmp."""
    bases = [cfg.runtime_dir] if cfg.runtime_dir else \
        [os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm", "/tmp"]
    for base in filter(None, bases):
        if os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return os.path.join(base, f"gproxy-{pid}")
    return os.path.join(bases[-1], f"gproxy-{pid}")


def sweep_stale(directory):
    """Remove the runtime directories of arbiters that no longer exist (a
    whole process group SIGKILLed, or the OOM killer, leaves them behind)."""
    base = os.path.dirname(directory)
    try:
        names = os.listdir(base)
    except OSError:
        return
    for entry in names:
        prefix, _, pid = entry.partition("-")
        if prefix != "gproxy" or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
        except PermissionError:
            pass                    # someone else's live process


class SupervisorKeeper:
    """Starts, watches, signals and stops ``python -m gproxy.supervisor``."""

    def __init__(self, directory):
        self.directory = directory
        self.arbiter_pid = os.getpid()
        self.proc = None
        self.started_at = 0.0
        self.backoff = 0.0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.watch, name="supervisor_watchdog", daemon=True)

    def start(self):
        sweep_stale(self.directory)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.spawn()
        self.thread.start()

    def spawn(self):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gproxy.supervisor", "--runtime-dir", self.directory,
             "--arbiter-pid", str(self.arbiter_pid)], env=env, close_fds=True,
            # Its own process group: a Ctrl-C or a group signal reaches the
            # arbiter, which then stops it (on_exit), instead of killing it
            # behind the watchdog's back.
            process_group=0)
        self.started_at = time.monotonic()

    def watch(self):
        # A long-lived thread: PR_SET_PDEATHSIG fires when the thread that
        # forked the child exits, not only the process.
        while not self.stopping.wait(WATCH_EVERY):
            with self.lock:
                if self.stopping.is_set() or self.proc.poll() is None:
                    continue
                lived = time.monotonic() - self.started_at
                self.backoff = 0.0 if lived > 10 else min(BACKOFF_MAX, self.backoff * 2 or 0.1)
                log.warning("gproxy supervisor (pid %d) is gone after %.1fs; starting a new one%s",
                            self.proc.pid, lived,
                            f" in {self.backoff:.1f}s" if self.backoff > 0.1 else "")
            if self.stopping.wait(self.backoff if self.backoff > 0.1 else 0):
                return
            with self.lock:
                if not self.stopping.is_set():
                    self.spawn()

    def signal(self, sig):
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, sig)

    def stop(self, timeout=5.0):
        self.stopping.set()
        with self.lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        shutil.rmtree(self.directory, ignore_errors=True)


# --- the hooks ------------------------------------------------------------------

def forget_settings(module_name):
    """gunicorn imports a ``python:`` config module once and keeps it; drop it
    so that the next HUP executes it again (reads the YAML file again)."""
    sys.modules.pop(module_name, None)


def when_ready(server):
    directory = runtime_dir(CONFIG or config.load(), os.getpid())
    os.environ[ENV_RUNTIME_DIR] = directory     # inherited by every worker forked after this
    keeper = SupervisorKeeper(directory)
    keeper.start()
    server.gproxy_supervisor = keeper

    def reopen_supervisor_logs():
        if os.getpid() == keeper.arbiter_pid:   # not in the workers, which inherit this list
            keeper.signal(signal.SIGUSR1)
    logs.ON_REOPEN[:] = [reopen_supervisor_logs]
    server.log.info("gproxy supervisor started (pid %d), runtime directory %s",
                    keeper.proc.pid, directory)


def on_reload(server):
    keeper = getattr(server, "gproxy_supervisor", None)
    if keeper is not None:
        keeper.signal(signal.SIGHUP)


def on_exit(server):
    keeper = getattr(server, "gproxy_supervisor", None)
    if keeper is not None:
        keeper.stop()


def worker_health(cfg):
    """The shared health state for a worker, or None when no supervisor runs."""
    directory = os.environ.get(ENV_RUNTIME_DIR)
    if not directory:
        return None
    from .healthtable import WorkerHealth
    return WorkerHealth(directory, cfg.supervisor.stale_after)
