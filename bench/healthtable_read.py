"""Per-request cost of reading the shared health table in a worker.

    python3 bench/healthtable_read.py [N]

Measures, on a table in /dev/shm (else /tmp):
  usable()      one UpstreamView.usable(i, now) with the sequence unchanged,
                for a new ``now`` (the hot path: one unpack_from, a float
                compare, a list index)
  choose        what a request pays: a round-robin choice over 3 backends,
                each asked usable() with the request's ``now`` (as
                UpstreamState.choose does: the first ask reads the table)
  heartbeat     the first read after a heartbeat-only publish (header re-read)
  republish     the first read after a state change (header + JSON decode)
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxy.balancer import RoundRobin                      # noqa: E402
from gproxy.healthtable import TableReader, TableWriter, UpstreamView, encode  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
NAMES = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def per_op(fn, n):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as d:
        path = os.path.join(d, "health.table")
        w = TableWriter(path)
        states = {"web": {n: [True, False, 0.0, ""] for n in NAMES}}
        w.publish(time.monotonic(), encode(states))
        r = TableReader(path, stale_after=3600.0)
        view = UpstreamView(r, "web", NAMES)
        now = time.monotonic()
        view.usable(0, now)

        # Each request has its own ``now`` (time.monotonic()), so every timed
        # call below passes a new one: the sequence number is really read.
        def usable(n):
            u = view.usable
            for k in range(n):
                u(1, now + k * 1e-9)

        rr = RoundRobin([1, 1, 1])

        def choose(n):
            for k in range(n):
                t = now + k * 1e-9
                rr.choose(lambda i: view.usable(i, t))

        def bare_loop(n):
            for _ in range(n):
                rr.choose(lambda i: True)

        def heartbeat(n):
            for k in range(n):
                w.publish(now + k * 1e-6)
                view.usable(1, now + k * 1e-6)

        def republish(n):
            for k in range(n):
                states["web"][NAMES[2]][0] = bool(k & 1)
                w.publish(now, encode(states))
                view.usable(1, now + k * 1e-9)

        def publish_only(n):
            for k in range(n):
                w.publish(now, encode(states))

        u = per_op(usable, N)
        c, b = per_op(choose, N // 4), per_op(bare_loop, N // 4)
        h = per_op(heartbeat, N // 20)
        rp, po = per_op(republish, N // 100), per_op(publish_only, N // 100)
        print(f"python {sys.version.split()[0]}, table {path}, {len(NAMES)} backends, best of 5")
        print(f"usable() hot path, sequence unchanged: {u:8.0f} ns/read")
        print(f"round-robin choose over 3, with table:  {c:8.0f} ns/request "
              f"(without the table {b:.0f} ns: the table adds {c - b:.0f} ns)")
        print(f"first read after a heartbeat publish:   {h:8.0f} ns (publish included)")
        print(f"first read after a state change:        {rp - po:8.0f} ns (decode; publish {po:.0f} ns)")


if __name__ == "__main__":
    main()
