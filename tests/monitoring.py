"""Monitoring components for the tests: a StatsD packet listener, and the
real StatsD daemon (npm ``statsd``, run by Node) flushing into a real
Graphite carbon-cache (Debian ``graphite-carbon``) with a temporary whisper
directory. Everything listens on 127.0.0.1 on kernel-chosen or free ports.

.ci/run installs both; ``statsd_js()`` installs the npm package on first use
when it is missing (into ``.ci/node``, which git ignores).
"""

import collections
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time

from servers import REPO, free_port, free_udp_port, wait_until  # noqa: F401  (re-exported for the metric tests)

STATSD_NPM_VERSION = "0.9.0"
NODE_DIR = os.environ.get("GPROXY_TEST_NODE_DIR", os.path.join(REPO, ".ci", "node"))


def settle(measure, want, timeout, interval=0.2):
    """Poll ``measure()`` until it equals ``want`` or ``timeout`` passes;
    return the last measurement (the caller asserts on it, showing the diff)."""
    deadline = time.monotonic() + timeout
    while True:
        got = measure()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(interval)


class StatsdListener:
    """A UDP socket that keeps every StatsD line it receives."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.datagrams = []
        self.running = True
        threading.Thread(target=self._receive, daemon=True, name="statsd-listener").start()

    def _receive(self):
        while self.running:
            try:
                data = self.sock.recv(65535)
            except OSError:
                return
            self.datagrams.append(data)

    def close(self):
        self.running = False
        self.sock.close()

    def lines(self):
        return [line.decode("ascii") for d in list(self.datagrams) for line in d.split(b"\n") if line]

    def parsed(self, prefix=""):
        """[(name, value string, type)] for names starting with ``prefix``."""
        out = []
        for line in self.lines():
            name, _, rest = line.partition(":")
            value, kind = rest.split("|")[:2]
            if name.startswith(prefix):
                out.append((name, value, kind))
        return out

    def counters(self, prefix=""):
        sums = collections.Counter()
        for name, value, kind in self.parsed(prefix):
            if kind == "c":
                sums[name] += float(value)
        return {k: (int(v) if v == int(v) else v) for k, v in sums.items()}

    def timers(self, prefix=""):
        out = collections.defaultdict(list)
        for name, value, kind in self.parsed(prefix):
            if kind == "ms":
                out[name].append(float(value))
        return dict(out)

    def gauges(self, prefix=""):
        out = collections.defaultdict(list)
        for name, value, kind in self.parsed(prefix):
            if kind == "g":
                out[name].append(value)
        return dict(out)


# -- the real StatsD daemon and carbon ------------------------------------------

def statsd_js():
    """The path of the npm statsd daemon's stats.js, installing it if needed."""
    path = os.path.join(NODE_DIR, "node_modules", "statsd", "stats.js")
    if os.path.exists(path):
        return path
    os.makedirs(NODE_DIR, exist_ok=True)
    # Parallel test processes install once: the first holds the lock.
    with open(os.path.join(NODE_DIR, ".install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            subprocess.run(["npm", "install", "--prefix", NODE_DIR, "--no-audit", "--no-fund",
                            "--no-save", f"statsd@{STATSD_NPM_VERSION}"],
                           check=True, timeout=300, capture_output=True)
    return path


CARBON_CONF = """\
[cache]
STORAGE_DIR = {root}/
LOCAL_DATA_DIR = {root}/whisper/
CONF_DIR = {root}/conf/
LOG_DIR = {root}/log/
PID_DIR = {root}/
DATABASE = whisper
ENABLE_TAGS = False
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = 100000
MAX_CREATES_PER_MINUTE = inf
WHISPER_AUTOFLUSH = True
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line_port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query_port}
LOG_UPDATES = False
LOG_CREATES = False
"""


class _Daemon:
    """A daemon started by a test: its log tail, and stop by pid."""

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-3000:]

    def stop(self):
        _stop(self.proc)


class Carbon(_Daemon):
    """carbon-cache in the foreground with its own config and whisper tree.
    The storage schema is ops/monitoring's, so the test checks that file."""

    def __init__(self, root):
        self.root = str(root)
        self.line_port = free_port()
        os.makedirs(os.path.join(self.root, "conf"))
        with open(os.path.join(self.root, "conf", "carbon.conf"), "w") as f:
            f.write(CARBON_CONF.format(root=self.root, line_port=self.line_port,
                                       pickle_port=free_port(), query_port=free_port()))
        # ops/monitoring's schema, its finest retention made StatsD's 1 s test flush
        with open(os.path.join(REPO, "ops", "monitoring", "storage-schemas.conf")) as f:
            schemas = f.read()
        assert "retentions = 10s:6h," in schemas, "ops/monitoring/storage-schemas.conf changed"
        with open(os.path.join(self.root, "conf", "storage-schemas.conf"), "w") as f:
            f.write(schemas.replace("retentions = 10s:6h,", "retentions = 1s:1h,"))
        shutil.copy(os.path.join(REPO, "ops", "monitoring", "storage-aggregation.conf"),
                    os.path.join(self.root, "conf", "storage-aggregation.conf"))
        self.log_path = os.path.join(self.root, "carbon.out")
        self.proc = None

    def start(self, timeout=30):
        exe = shutil.which("carbon-cache")
        assert exe, "carbon-cache not found: apt-get install graphite-carbon (.ci/run does)"
        self.proc = subprocess.Popen(
            [exe, f"--config={self.root}/conf/carbon.conf", "--debug", "start"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, cwd=self.root)
        wait_until(lambda: self.proc.poll() is not None or _accepts(self.line_port), timeout,
                   "carbon-cache to listen")
        assert self.proc.poll() is None, f"carbon-cache exited: {self.log()}"
        return self


    def whisper_path(self, metric):
        return os.path.join(self.root, "whisper", *metric.split(".")) + ".wsp"

    def fetch(self, metric, since):
        """[(timestamp, value)] stored for ``metric`` since ``since`` (epoch),
        nulls dropped, read back from its whisper file by whisper-fetch."""
        path = self.whisper_path(metric)
        if not os.path.exists(path):
            return []
        out = subprocess.run(["whisper-fetch", "--json", "--drop=nulls", f"--from={int(since) - 1}",
                              path], check=True, capture_output=True, timeout=30).stdout
        doc = json.loads(out)
        return list(zip(range(doc["start"], doc["end"], doc["step"]), doc["values"])) \
            if "start" in doc else []

    def metrics(self):
        base = os.path.join(self.root, "whisper")
        out = []
        for d, _, files in os.walk(base):
            for f in files:
                if f.endswith(".wsp"):
                    rel = os.path.relpath(os.path.join(d, f[:-4]), base)
                    out.append(rel.replace(os.sep, "."))
        return sorted(out)


class NodeStatsd(_Daemon):
    """The StatsD daemon from npm, flushing to ``carbon`` every second, with
    the settings of ops/monitoring/statsd-config.js (ports and interval
    changed for the test)."""

    def __init__(self, root, carbon, flush_ms=1000):
        self.root = str(root)
        self.port = free_udp_port()
        self.config_path = os.path.join(self.root, "statsd-config.js")
        with open(os.path.join(REPO, "ops", "monitoring", "statsd-config.js")) as f:
            text = f.read()
        for old, new in (("graphitePort: 2003", f"graphitePort: {carbon.line_port}"),
                         ("port: 8125", f"port: {self.port}"),
                         ("mgmt_port: 8126", f"mgmt_port: {free_port()}"),
                         ("flushInterval: 10000", f"flushInterval: {flush_ms}")):
            assert old in text, f"ops/monitoring/statsd-config.js lost {old!r}"
            text = text.replace(old, new)
        with open(self.config_path, "w") as f:
            f.write(text)
        self.log_path = os.path.join(self.root, "statsd.out")
        self.proc = None

    def start(self, timeout=30):
        js = statsd_js()
        self.proc = subprocess.Popen(["node", js, self.config_path], cwd=os.path.dirname(js),
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or "server is up" in self.log(), timeout,
                   "the statsd daemon to start")
        assert self.proc.poll() is None, f"statsd exited: {self.log()}"
        return self



def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
