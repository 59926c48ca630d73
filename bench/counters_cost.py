"""What one count costs a worker, by way of publishing it to the supervisor:

    python3 bench/counters_cost.py

- a list item (a private copy, flushed to the shared file once a second by
  a greenlet: the alternative design),
- an item of a memoryview on the mmap'd file (what gproxy/counters.py does),
- struct.pack_into / unpack_from on the mmap,
- prometheus_client counters, in-process and in multiprocess mode,
and one whole request's record (``WorkerCounters.record``) on the mmap.
Single-threaded, best of 5; numbers vary with the machine's load.
"""

import mmap
import os
import struct
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N = 1_000_000


def best(stmt, ns, number=N):
    return min(timeit.repeat(stmt, globals=ns, number=number, repeat=5)) / number * 1e9


class Ex:
    """The fields of an Exchange that ``record`` reads."""
    def __init__(self):
        self.start, self.route, self.upstream, self.backend = time.time(), "r", "api", "127.0.0.1:1"
        self.status, self.error, self.body, self.bytes_in, self.bytes_out = 200, None, None, 0, 1024
        self.retries, self.upstream_start = 0, time.monotonic()


def main():
    mm = mmap.mmap(-1, 1 << 16)
    ns = {"l": [0] * 1000, "mv": memoryview(mm).cast("q"), "mm": mm, "s": struct.Struct("<q")}
    print(f"list item += 1                 {best('l[5] += 1', ns):6.0f} ns")
    print(f"mmap memoryview item += 1      {best('mv[5] += 1', ns):6.0f} ns")
    print(f"mmap struct unpack/pack_into   {best('s.pack_into(mm, 40, s.unpack_from(mm, 40)[0] + 1)', ns):6.0f} ns")

    import prometheus_client
    c = prometheus_client.Counter("x_total", "x", ["a"]).labels("r")
    print(f"prometheus_client Counter.inc  {best('c.inc()', {'c': c}):6.0f} ns")
    with tempfile.TemporaryDirectory() as d:
        code = ("import os, timeit, prometheus_client\n"
                "h = prometheus_client.Histogram('y_seconds', 'y', ['a']).labels('r')\n"
                "c = prometheus_client.Counter('x_total', 'x', ['a']).labels('r')\n"
                "t = min(timeit.repeat('c.inc()', globals=globals(), number=200000, repeat=5)) / 200000\n"
                "o = min(timeit.repeat('h.observe(0.01)', globals=globals(), number=200000, repeat=5)) / 200000\n"
                "print(f'prometheus_client multiprocess Counter.inc {t * 1e9:6.0f} ns, Histogram.observe {o * 1e9:6.0f} ns')\n")
        import subprocess
        subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=d), check=True)

    from gproxy import config, counters
    cfg = config.parse("upstreams:\n  api: {backends: ['http://127.0.0.1:1', 'http://127.0.0.1:2']}\n"
                       "routes: [{upstream: api, name: r}]\n")
    with tempfile.TemporaryDirectory() as d:
        w = counters.WorkerCounters(cfg, d)
        ns = {"w": w, "ex": Ex()}
        print(f"one request: request_started + record  {best('w.request_started(); w.record(ex)', ns, 200000) / 1000:6.2f} us")


if __name__ == "__main__":
    main()
