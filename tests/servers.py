"""Real servers for the tests: an HTTP/1.1 backend that records the exact
bytes it receives, and a gproxy (gunicorn) process in front of it.

Everything listens on 127.0.0.1; ports come from the kernel (port 0).
"""

import gzip
import hashlib
import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from gproxy import control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port_slice():
    """The ports this test process hands out: below the kernel's ephemeral
    range (bind(0) and outgoing connections take theirs from there, so a port
    picked there can be taken again before gunicorn binds it), one slice per
    pytest-xdist worker (two workers never pick the same port), from a
    random start (two runs side by side rarely meet)."""
    import random
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            top = int(f.read().split()[0])
    except OSError:
        top = 32768
    low = 10000
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    size = (top - low) // max(count, 1)
    first = low + index * size
    start = random.randrange(size)
    return [first + (start + i) % size for i in range(size)]


_PORTS = {}


def _next_port(kind):
    ports = _PORTS.get(kind)
    if ports is None:
        ports = _PORTS[kind] = iter(_port_slice())
    for port in ports:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))     # nothing holds it now
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left in this test process's slice")


def free_port():
    """A TCP port on 127.0.0.1 nothing listens on, for a server a test starts."""
    return _next_port(socket.SOCK_STREAM)


def free_udp_port():
    return _next_port(socket.SOCK_DGRAM)


def _top_level_keys(text):
    """The keys of a YAML mapping, or None when ``text`` is not one."""
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return set(data) if isinstance(data, dict) and data else None


def worker_serving(pid):
    """True once gunicorn worker ``pid`` is in its serving loop: the worker's
    heartbeat (gunicorn WorkerTmp.notify, first called after its servers
    started accepting) sets its temp file's mtime to time.monotonic(), far
    below the wall-clock time the file was created with."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "wgunicorn-" in os.readlink(path):
                return os.stat(path).st_mtime <= time.monotonic()
        except OSError:
            continue
    return False


def wait_until(predicate, timeout, what, interval=0.05):
    """Poll ``predicate`` until it returns a true value (which is returned);
    fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pattern(n, seed=b"gproxy"):
    """n deterministic bytes, so a body can be checked by sha256."""
    block = hashlib.sha256(seed).digest() * 2048     # 64 KiB
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


@dataclass
class Received:
    """One request as the backend saw it."""
    head: bytes                 # request line + header fields, exactly as sent
    method: str
    target: str
    headers: list               # [(name, value)] in order, repeats kept
    body: bytes = b""
    chunked: bool = False
    conn_id: int = 0

    def header(self, name):
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return vals[0] if vals else None

    def all(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def read_until(self, sep):
        while sep not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        head, _, self.buf = self.buf.partition(sep)
        return head

    def read_exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class Backend:
    """A threaded HTTP/1.1 server with scripted behaviour by path:

    /echo            200, the request body back, X-Backend: name
    /status/N        status N (no body for 1xx/204/304)
    /bytes/N         N pattern bytes with Content-Length
    /chunks/N/K      N chunks of K bytes, chunked; waits on ``gate`` before the last
    /sleep/MS        200 after MS milliseconds
    /cut/N           Content-Length 2N, sends N bytes, then resets the connection
    /dupheaders      two Set-Cookie and two X-Dup fields
    /gzip            a gzip body with Content-Encoding: gzip
    /health          200, or ``health_status``
    anything else    200 "ok <name>"
    """

    def __init__(self, name="b", tls=None):
        """``tls``: a server-side ``ssl.SSLContext`` for an https backend."""
        self.name = name
        self.tls = tls
        self.received = []
        self.connections = 0
        self.health_status = 200
        self.gate = threading.Event()
        self.handler = None     # optional fn(backend, req, conn) -> bool (handled)
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.open_socks = set()
        self.running = True
        threading.Thread(target=self._accept, daemon=True, name=f"backend-{name}").start()

    def stop(self):
        self.running = False
        try:
            self.sock.close()
        except OSError:
            pass
        for s in list(self.open_socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def requests_for(self, target_prefix):
        return [r for r in self.received if r.target.startswith(target_prefix)]

    def _accept(self):
        while self.running:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                cid = self.connections
            self.open_socks.add(s)
            threading.Thread(target=self._serve, args=(s, cid), daemon=True).start()

    def _serve(self, s, cid):
        raw = s
        try:
            if self.tls is not None:
                s = self.tls.wrap_socket(s, server_side=True)
        except OSError:
            s.close()
            return
        conn = _Conn(s)
        try:
            while self.running:
                req = self._read_request(conn, cid)
                if req is None:
                    return
                with self.lock:
                    self.received.append(req)
                if not self._respond(req, conn):
                    return
        except (EOFError, OSError):
            return
        finally:
            self.open_socks.discard(raw)
            try:
                s.close()
            except OSError:
                pass

    def _read_request(self, conn, cid):
        try:
            head = conn.read_until(b"\r\n\r\n")
        except EOFError:
            return None
        lines = head.split(b"\r\n")
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        headers = []
        for line in lines[1:]:
            n, _, v = line.decode("latin-1").partition(":")
            headers.append((n, v.strip()))
        req = Received(head=head + b"\r\n\r\n", method=method, target=target,
                       headers=headers, conn_id=cid)
        te = req.header("Transfer-Encoding")
        if te and "chunked" in te.lower():
            req.chunked = True
            body = b""
            while True:
                size = int(conn.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    conn.read_until(b"\r\n")    # no trailers in these tests
                    break
                body += conn.read_exact(size)
                conn.read_exact(2)
            req.body = body
        else:
            n = int(req.header("Content-Length") or 0)
            req.body = conn.read_exact(n) if n else b""
        return req

    def _respond(self, req, conn):
        s = conn.sock
        if self.handler and self.handler(self, req, conn):
            return True
        path = req.target.split("?")[0]
        parts = path.strip("/").split("/")
        name = self.name.encode()

        def send(status, body=b"", extra=(), reason="OK"):
            hdrs = [f"HTTP/1.1 {status} {reason}", f"X-Backend: {self.name}"]
            hdrs += [f"{k}: {v}" for k, v in extra]
            if status not in (204, 304) and not 100 <= status < 200:
                hdrs.append(f"Content-Length: {len(body)}")
            s.sendall(("\r\n".join(hdrs) + "\r\n\r\n").encode() + (b"" if req.method == "HEAD" else body))

        if parts[0] == "echo":
            send(200, req.body, [("Content-Type", "application/octet-stream")])
        elif parts[0] == "status":
            code = int(parts[1])
            send(code, b"" if code in (204, 304) else f"status {code}\n".encode(),
                 [("ETag", '"v1"')] if code == 304 else [], reason="X")
        elif parts[0] == "bytes":
            send(200, pattern(int(parts[1])))
        elif parts[0] == "chunks":
            n, k = int(parts[1]), int(parts[2])
            s.sendall(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            for i in range(n):
                if i == n - 1:
                    self.gate.wait(10)
                s.sendall(b"%x\r\n" % k + bytes([65 + i % 26]) * k + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        elif parts[0] == "sleep":
            time.sleep(int(parts[1]) / 1000)
            send(200, b"slept " + name)
        elif parts[0] == "cut":
            n = int(parts[1])
            s.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {2 * n}\r\n\r\n".encode() + b"x" * n)
            time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            return False
        elif parts[0] == "dupheaders":
            send(200, b"dup", [("Set-Cookie", "a=1; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
                               ("Set-Cookie", "b=2; Path=/"), ("X-Dup", "one"), ("X-Dup", "two")])
        elif parts[0] == "gzip":
            send(200, gzip.compress(b"hello " * 500), [("Content-Encoding", "gzip")])
        elif parts[0] == "health":
            send(self.health_status, b"health\n")
        else:
            send(200, b"ok " + name)
        return True


class GProxy:
    """gproxy under real gunicorn: ``GProxy(tmp_path, yaml_text).start()``.

    Each instance is alone on the machine: its own port, its own admin port
    and its own runtime directory unless the text sets them, so tests can run
    in parallel (pytest-xdist).
    """

    def __init__(self, workdir, config_text, env=None, conf=None, launcher=None):
        self.workdir = str(workdir)
        # gunicorn's -c: the checkout's gunicorn.conf.py, or e.g. "python:gproxy.gunicorn_conf"
        self.conf = conf or os.path.join(REPO, "gunicorn.conf.py")
        # a USR2 upgrade re-executes argv, which works with the gunicorn
        # script, not with "python -m gunicorn" (gunicorn/http shadows http)
        self.launcher = launcher or [sys.executable, "-m", "gunicorn"]
        self.port = free_port()
        self.config_path = os.path.join(self.workdir, "gproxy.yaml")
        self.admin_port = free_port()
        # short: the failure socket's path must fit in sockaddr_un (108 bytes)
        self.runtime_base = tempfile.mkdtemp(prefix="gp-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
        self.write_config(config_text)
        self.stdout_path = os.path.join(self.workdir, "gproxy.stdout")
        self.stderr_path = os.path.join(self.workdir, "gproxy.stderr")
        self.env = dict(os.environ, GPROXY_CONFIG=self.config_path, **(env or {}))
        # this checkout's gproxy, whatever is installed
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        self.proc = None
        self.url = f"http://127.0.0.1:{self.port}"

    def write_config(self, text):
        """Write the config file: '{port}' is this gproxy's port; the admin
        port and runtime directory are this instance's unless ``text`` sets them."""
        text = text.replace("{port}", str(self.port))
        keys = _top_level_keys(text)
        if keys is not None and "admin" not in keys:
            text = text.rstrip("\n") + f'\nadmin: {{listen: "127.0.0.1:{self.admin_port}"}}\n'
        if keys is not None and "runtime_dir" not in keys:
            text = text.rstrip("\n") + f"\nruntime_dir: {self.runtime_base}\n"
        with open(self.config_path, "w") as f:
            f.write(text)

    def command(self):
        return [*self.launcher, "-c", self.conf, "gproxy.wsgi"]

    def start(self, timeout=15):
        """Start gunicorn and return once every worker serves (no sooner: a
        signal that reaches a worker before gunicorn installed its handlers
        is lost, and the arbiter then waits graceful_timeout for it)."""
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env,
                                     stdout=open(self.stdout_path, "wb"), stderr=open(self.stderr_path, "wb"))
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=15):
        """Until the configured number of workers run and each is serving."""
        want = self.expected_workers()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gproxy exited {self.proc.returncode}: {self.stderr()}")
            pids = self.worker_pids()
            return len(pids) == want and all(map(worker_serving, pids))
        try:
            wait_until(ready, timeout, f"{want} gproxy workers serving", 0.02)
        except AssertionError as e:
            raise AssertionError(f"{e}; stderr: {self.stderr()[-2000:]}") from None

    def expected_workers(self):
        import yaml
        with open(self.config_path) as f:
            return (yaml.safe_load(f) or {}).get("workers", 2)

    def worker_pids(self):
        if self.proc is None:
            return []
        out = []
        for pid in children(self.proc.pid):
            if "worker" in cmdline(pid) and alive(pid):
                out.append(pid)
        return out

    def runtime_dir(self):
        """This arbiter's runtime directory (when the fixture chose its base)."""
        return os.path.join(self.runtime_base, f"gproxy-{self.proc.pid}")

    def wait_supervisor(self, timeout=15):
        """Until the supervisor has loaded the config (it keeps a copy of the
        last good file), so a test may then rewrite the file."""
        path = os.path.join(self.runtime_dir(), "last-good.yaml")
        wait_until(lambda: os.path.exists(path), timeout, "the supervisor to load the config")

    def hup(self, timeout=30):
        """Reload (HUP) and return once only new workers run, each serving."""
        old = set(self.worker_pids())
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not set(self.worker_pids()) & old, timeout, "the old workers to exit")
        self.wait_ready(timeout)

    def stop(self, graceful=False, timeout=10):
        """QUIT (gunicorn's fast shutdown), or TERM when ``graceful``: workers
        then finish their connections, up to graceful_timeout. A gproxy that
        does not exit within ``timeout`` is SIGKILLed and the test fails."""
        if self.proc and self.proc.poll() is None:
            # A worker still booting would lose the signal (see start).
            deadline = time.monotonic() + timeout
            while not all(map(worker_serving, self.worker_pids())) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"gproxy (pid {self.proc.pid}) ignored "
                                     f"{'TERM' if graceful else 'QUIT'} for {timeout}s and was SIGKILLed; "
                                     f"stderr: {self.stderr()[-2000:]}") from None
            finally:
                self._remove_runtime_base()
        self._remove_runtime_base()

    def _remove_runtime_base(self):
        if self.runtime_base:
            shutil.rmtree(self.runtime_base, ignore_errors=True)

    def cli(self, *args, timeout=60):
        """``gproxy ARGS --config <this config>`` (the installed command's
        entry point, from this checkout): the CompletedProcess, text."""
        return subprocess.run([sys.executable, "-m", "gproxy.cli", *args, "--config", self.config_path],
                              env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)

    def stdout(self):
        with open(self.stdout_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def access_records(self, at_least=1, timeout=5):
        """The JSON access log records so far, waiting until there are at
        least ``at_least`` (a record is written after the response is sent)."""
        import json
        deadline = time.monotonic() + timeout
        while True:
            recs = [json.loads(line) for line in self.stdout().splitlines() if line.startswith("{")]
            if len(recs) >= at_least or time.monotonic() > deadline:
                # in the order the requests began: each worker writes its
                # record after its response, so two workers' lines may swap
                return sorted(recs, key=lambda r: r["time"])
            time.sleep(0.02)


def get_status(g, path):
    """One GET to gproxy ``g`` on a new connection, its body read: the status."""
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def raw_request(port, data, timeout=10, read_until_close=True):
    """Send bytes, return every byte the proxy sent back until it closed
    (or until the timeout, for keep-alive answers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                out += d
                if not read_until_close and b"\r\n\r\n" in out:
                    break
        except socket.timeout:
            pass
        return out


# --- processes and sockets of a running gproxy (supervisor tests) -------------------

def children(pid):
    """Child pids of every thread of ``pid`` (a child forked by a thread is
    listed under that thread only)."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


alive = control.alive     # true while the process exists and is not a zombie


def supervisor_pid(g):
    """The pid of the gproxy supervisor under this gproxy's arbiter, or None."""
    for pid in children(g.proc.pid):
        if "gproxy.supervisor" in cmdline(pid) and alive(pid):
            return pid
    return None


def _tcp_inode(local_port, remote_port):
    want_local, want_rem = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == want_local and parts[2] == want_rem:
                return parts[9]
    return None


def worker_of(g, sock):
    """The pid of the gproxy worker holding the other end of the client
    socket ``sock`` (still open), found through /proc."""
    inode = _tcp_inode(g.port, sock.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in g.worker_pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
        except OSError:
            continue
    return None


def local_non_loopback_ipv4():
    """An IPv4 address of this host outside 127/8 (None when there is none)."""
    found, prev = [], None
    with open("/proc/net/fib_trie") as f:
        for line in f:
            parts = line.split()
            if "/32 host LOCAL" in line and prev and not prev.startswith("127."):
                found.append(prev)
            if len(parts) >= 2 and parts[0] in ("|--", "+--"):
                prev = parts[1]
    return found[0] if found else None
