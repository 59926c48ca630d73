"""Per-request cost of gproxy's metrics: the recording path a worker runs
for every request (``Stats.request_started`` + ``Stats.record``), timed over
N synthetic requests, with StatsD off, on (a local UDP listener), and on with
nobody listening.

    python3 bench/metrics_cost.py [N]

Prints microseconds per request for each case (best of 5 runs of N).
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxy import config, stats             # noqa: E402
from gproxy.proxy import Exchange            # noqa: E402


def exchange():
    ex = Exchange({"REQUEST_METHOD": "GET", "RAW_URI": "/users/42?x=1", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_HOST": "api.example.com"})
    ex.route, ex.upstream, ex.backend = "users", "api", "10.0.0.1:8081"
    ex.status, ex.bytes_out = 200, 1024
    ex.upstream_time, ex.upstream_start = 0.0012, time.monotonic() - 0.002
    return ex


def per_request(s, n):
    ex = exchange()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            s.request_started()
            s.record(ex)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cases = [
        ("statsd off", "statsd: {enabled: false}"),
        ("statsd on", f"statsd: {{port: {sink.getsockname()[1]}}}"),
        ("statsd on, nobody listening", f"statsd: {{port: {dead}}}"),
    ]
    for name, text in cases:
        s = stats.Stats(config.parse(text).statsd)
        print(f"{name:30s} {per_request(s, n):7.2f} us/request  (N={n}, best of 5)")


if __name__ == "__main__":
    main()
