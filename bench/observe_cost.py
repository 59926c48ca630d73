"""What each observability output costs a worker per request, in process:

    python3 bench/observe_cost.py [N]

For one typical proxied request (a route, a backend, 200, 1 KiB out), times
the work a worker does when the request ends, N times, best of 5:

- the JSON access log to a file: the record, its line, the write (unbuffered,
  and gathered with ``buffer: 64KB``), and the write alone (one os.write of
  the same bytes: the floor);
- StatsD: ``Stats.record`` to a UDP listener (counts summed, timer values
  kept, flushed every 0.1 s by a thread);
- the live counters: ``WorkerCounters.request_started`` + ``record``.

In-process figures are lower than what the same code costs inside a busy
worker (bench/run.py's gproxy-observed against gproxy-bare measures that):
here the code and data stay in the CPU's caches.
"""

import os
import socket
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxy import accesslog, config, counters, stats      # noqa: E402
from gproxy.exchange import Exchange                      # noqa: E402


def exchange():
    ex = Exchange({"REQUEST_METHOD": "GET", "RAW_URI": "/users/42?x=1", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_HOST": "api.example.com", "HTTP_USER_AGENT": "curl/8.5.0"})
    ex.route, ex.upstream, ex.backend = "users", "api", "10.0.0.1:8081"
    ex.status, ex.bytes_out = 200, 1024
    ex.request_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    ex.upstream_time, ex.upstream_start = 0.0012, time.monotonic() - 0.002
    return ex


def best(fn, n):
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    ex = exchange()
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for name, extra in (("access log, JSON to a file", ""),
                            ("  the same, buffer: 64KB", ", buffer: 64KB, flush: 1h")):
            fmt = accesslog.setup(config.parse(
                f"access_log: {{format: json, path: {d}/access.log{extra}}}").access_log)
            rows.append((name, best(lambda: accesslog.access(fmt(ex.record())), n)))
        line = fmt(ex.record())
        fd = os.open(f"{d}/floor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        rows.append(("  of which the write alone (os.write)", best(lambda: os.write(fd, line), n)))
        os.close(fd)
        accesslog.setup(config.parse("access_log: {format: off}").access_log)

        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        s = stats.Stats(config.parse(f"statsd: {{port: {sink.getsockname()[1]}}}").statsd)
        rows.append(("StatsD (Stats.record)", best(lambda: s.record(ex), n)))
        s.close()
        sink.close()

        cfg = config.parse("upstreams: {api: {backends: ['http://10.0.0.1:8081']}}\n"
                           "routes: [{name: users, upstream: api}]\n")
        w = counters.WorkerCounters(cfg, d)

        def live():
            w.request_started()
            w.record(ex)
        rows.append(("live counters (WorkerCounters)", best(live, n)))
    for name, us in rows:
        print(f"{name:40s} {us:6.2f} us/request")
    print(f"(N={n}, best of 5)")


if __name__ == "__main__":
    main()
