"""Worker CPU per request under a fixed, bounded load, with StatsD off and
on: real gunicorn (1 worker), a local backend, N keep-alive GETs from one
client; CPU = the worker's utime + stime from /proc.

    python3 bench/metrics_load.py [N]
"""

import http.client
import os
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from servers import Backend, GProxy      # noqa: E402


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(statsd_yaml, n, backend):
    with tempfile.TemporaryDirectory() as d:
        g = GProxy(d, f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
access_log: {{format: json}}
{statsd_yaml}
upstreams: {{web: {{backends: ["{backend.url}"]}}}}
routes: [{{upstream: web, name: main}}]
""").start()
        try:
            pid, = g.worker_pids()
            c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
            for _ in range(200):                 # warm up
                c.request("GET", "/x")
                c.getresponse().read()
            before = cpu_seconds(pid)
            for _ in range(n):
                c.request("GET", "/x")
                c.getresponse().read()
            used = cpu_seconds(pid) - before
            c.close()
        finally:
            g.stop()
    return used / n * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    b = Backend("bench")
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        for _ in range(2):
            off = run("", n, b)
            on = run(f"statsd: {{port: {sink.getsockname()[1]}}}", n, b)
            print(f"worker CPU per request: statsd off {off:6.0f} us, on {on:6.0f} us "
                  f"(N={n} keep-alive GETs, 1 worker)")
    finally:
        b.stop()


if __name__ == "__main__":
    main()
