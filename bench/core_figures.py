"""Figures of the reverse proxy core against the test backend (tests/servers.py):
backend connections for 200 sequential requests, 500 concurrent one-second
requests through 2 workers, and worker RSS while 200 MiB down and 100 MiB up
stream through. Loopback only; bounded.

    python3 bench/core_figures.py
"""

import concurrent.futures
import hashlib
import http.client
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from servers import Backend, GProxy, free_port, pattern, rss_kib  # noqa: E402


def main():
    b = Backend("m")
    g = GProxy(tempfile.mkdtemp(), f"""listen: ["127.0.0.1:{{port}}"]
workers: 2
admin: {{listen: "127.0.0.1:{free_port()}"}}
access_log: {{format: "off"}}
upstreams:
  web: {{backends: ["{b.url}"]}}
routes: [{{upstream: web}}]
""")
    try:
        g.start()
        run(g, b)
    finally:
        g.stop()
        b.stop()


def get(g, path, method="GET", body=None):
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=60)
    c.request(method, path, body=body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def run(g, b):
    for _ in range(200):
        get(g, "/x")
    print("200 sequential requests -> backend connections:", b.connections)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(500) as pool:
        st = list(pool.map(lambda i: get(g, f"/sleep/1000?{i}")[0], range(500)))
    print(f"500 concurrent 1 s requests, 2 workers: {st.count(200)} ok in {time.monotonic() - t0:.2f} s")
    pids = g.worker_pids()
    before = {p: rss_kib(p) for p in pids}
    n = 200 * 1024 * 1024
    t0 = time.monotonic()
    _, data = get(g, f"/bytes/{n}")
    dt = time.monotonic() - t0
    ok = hashlib.sha256(data).digest() == hashlib.sha256(pattern(n)).digest()
    print(f"200 MiB download: {200 / dt:.0f} MiB/s (Python client and backend), sha256 ok: {ok}")
    up = pattern(100 * 1024 * 1024, b"u")
    t0 = time.monotonic()
    get(g, "/status/200", "POST", up)
    print(f"100 MiB upload: {100 / (time.monotonic() - t0):.0f} MiB/s")
    print("worker RSS KiB, before -> peak:",
          ", ".join(f"{p}: {before[p]} -> {rss_kib(p, 'VmHWM')}" for p in pids))


if __name__ == "__main__":
    main()
