"""A bounded load loop on keep-alive connections, counting every failure.

``Load(port).start()`` runs ``connections`` threads, each sending requests on
one keep-alive ``http.client`` connection (a new one after a
``Connection: close`` or an error), until ``stop()``, ``max_seconds`` or
``max_requests``. Every non-2xx response and every socket error is a failure,
kept with what it was; nothing is retried.
"""

import collections
import http.client
import threading
import time


class Load:
    def __init__(self, port, path="/", connections=4, max_seconds=30, max_requests=50000,
                 pause=0.002, host="127.0.0.1", connect=None, headers=None):
        self.port, self.path, self.host = port, path, host
        self.connect = connect or (lambda: http.client.HTTPConnection(host, port, timeout=10))
        self.headers = headers or {}
        self.n, self.max_seconds, self.max_requests, self.pause = connections, max_seconds, max_requests, pause
        self.ok = 0
        self.failures = []          # (monotonic time, what)
        self.statuses = collections.Counter()
        self.backends = collections.Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = []

    def start(self):
        self.deadline = time.monotonic() + self.max_seconds
        self.threads = [threading.Thread(target=self.run, daemon=True, name=f"load-{i}")
                        for i in range(self.n)]
        for t in self.threads:
            t.start()
        return self

    def sent(self):
        with self.lock:
            return self.ok + len(self.failures)

    def run(self):
        conn = None
        while not self.stopping.is_set() and time.monotonic() < self.deadline \
                and self.sent() < self.max_requests:
            try:
                if conn is None:
                    conn = self.connect()
                conn.request("GET", self.path, headers=self.headers)
                r = conn.getresponse()
                body = r.read()
                with self.lock:
                    self.statuses[r.status] += 1
                    self.backends[r.getheader("X-Backend")] += 1
                    if 200 <= r.status < 300:
                        self.ok += 1
                    else:
                        self.failures.append((time.monotonic(), f"{r.status} {body[:80]!r}"))
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failures.append((time.monotonic(), repr(e)))
                if conn is not None:
                    conn.close()
                conn = None
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def progress(self, n, timeout=20):
        """Wait until ``n`` more requests have succeeded (the load is flowing)."""
        target = self.ok + n
        deadline = time.monotonic() + timeout
        while self.ok < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made no progress to {target}: {self.summary()}")
            time.sleep(0.02)
        return self

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(15)
        return self

    def summary(self):
        return f"{self.ok} ok, {len(self.failures)} failed: {self.failures[:5]}"
