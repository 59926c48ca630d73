"""Observed time from a backend failure to every worker avoiding it.

    python3 bench/failover.py

Real gunicorn (2 workers) and two recording backends on 127.0.0.1; four
client threads send requests on new connections throughout.
  active:  b2's /health turns 500 at t0 (checks every 200ms, fall 2);
           reported: the last proxied request b2 received, after t0.
  passive: b2's listener stops at t0 (max_fails 1, no active checks);
           reported: first and last failed attempt on b2 in the workers'
           error log (the window in which another worker could still try it).
"""

import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from servers import Backend, GProxy, free_port  # noqa: E402


def conf(b1, b2, health):
    hc = "    health_check: {path: /health, interval: 200ms, rise: 2, fall: 2}\n" if health else ""
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 2
admin: {{listen: "127.0.0.1:{free_port()}"}}
access_log: {{format: "off"}}
upstreams:
  web:
    backends: ["{b1.url}", "{b2.url}"]
    retries: 1
    passive: {{max_fails: 1, fail_timeout: 30s}}
{hc}routes:
  - upstream: web
"""


def load(g, stop):
    while not stop.is_set():
        try:
            urllib.request.urlopen(g.url + "/x", timeout=5).read()
        except OSError:
            pass


def run(health):
    b1, b2 = Backend("b1"), Backend("b2")
    g = GProxy(tempfile.mkdtemp(), conf(b1, b2, health)).start()
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(g, stop), daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)                 # warm: both backends in use by both workers
        t0 = time.time()
        if health:
            b2.health_status = 500
        else:
            b2.stop()
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join(10)
        if health:
            stamps = [r.time for r in b2.received if not r.target.startswith("/health")
                      and getattr(r, "time", 0) >= t0]
            return max(stamps) - t0 if stamps else 0.0
        lines = [line for line in g.stderr().splitlines()
                 if re.search(rf"upstream \w+: .* backend=127.0.0.1:{b2.port} ", line)]
        times = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() for line in lines]
        pids = {re.search(r"\[(\d+)\]", line).group(1) for line in lines}
        return (max(times) - min(times)) if times else 0.0, len(lines), len(pids)
    finally:
        stop.set()
        g.stop()
        b1.stop()
        b2.stop()


def main():
    # Record when each request arrived (an additive hook on the test backend).
    orig = Backend._read_request

    def stamped(self, conn, cid):
        req = orig(self, conn, cid)
        if req is not None:
            req.time = time.time()
        return req
    Backend._read_request = stamped

    a = run(health=True)
    print(f"active:  last request on b2 {a * 1000:.0f} ms after its /health failed "
          f"(interval 200ms x fall 2 = 400 ms, plus the check in flight)")
    window, attempts, workers = run(health=False)
    print(f"passive: {attempts} failed attempts on b2 from {workers} worker(s), "
          f"first to last {window * 1000:.0f} ms (max_fails 1)")


if __name__ == "__main__":
    main()
