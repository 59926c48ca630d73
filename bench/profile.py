#!/usr/bin/env python3
"""Where a gproxy worker's CPU goes, per proxied request.

    python3 bench/profile.py [--seconds 10] [--proxy gproxy|gproxy-base|gproxy-cached]

Starts the bench backend and one gproxy (2 workers), runs wrk (1 KiB, 50
connections; with ``gproxy-cached`` every request is a cache hit) while ``py-spy record`` samples both workers, then attributes
every sample to one part of the request path and converts the shares into
microseconds per request with the workers' own CPU accounting. A sample goes
to the first category that matches, walking from the innermost frame out,
so a socket call counts for whoever made it (the transport or the server).
Needs py-spy (``pip install py-spy``).
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402
from cache_cost import CachedGProxy  # noqa: E402

bench.SERVERS.setdefault(CachedGProxy.name, CachedGProxy)

# (category, substrings of "function (file)" frames), tried in this order
# on each frame from the innermost outwards.
CATEGORIES = [
    ("live figures, attempt list", ("counters.py", "observe.py")),
    ("logging", ("accesslog.py", "/logging/", "Exchange.record", "Recorder.record")),
    ("metrics", ("stats.py", "/statsd/")),
    ("routing", ("router.py", "classify_and_route")),
    ("cache: lookup, serve", ("cache.py", "cachestore.py", "cachepolicy.py")),
    ("gateway: auth, rate limit", ("gateway.py", "auth.py", "ratestore.py", "ratelimit.py")),
    ("header handling", ("headers.py", "upstream_headers")),
    ("transport: liveness peek", ("Conn.alive",)),
    ("transport: h1 client (send, parse response, body)", ("transport.py", "h1.py")),
    ("exchange: attempts, streaming", ("exchange.py",)),
    ("balancing, health, glue", ("balancer.py", "health.py", "gproxy/proxy.py")),
    ("server: parse request (llhttp), build environ", ("Connection.feed", "on_url", "on_header",
                                                       "on_headers_complete", "on_message",
                                                       "on_body", "downstream.py", "next_request")),
    ("server: write response", ("Response.write", "Response.start_response", "Response.finish",
                                "http_date")),
    ("server: connection loop", ("gproxy/worker.py",)),
    ("event loop, greenlet switching", ("gevent/",)),
]


# Socket calls count for whoever made them (the transport or the server).
TRANSPARENT = ("gevent/_socketcommon.py", "gevent/_socket3.py", "/socket.py", "SocketIO.",
               "send_all (gproxy/h1.py")
SYSCALL_LEAVES = ("SocketMixin.send ", "SocketMixin.recv ", "SocketMixin.recv_into ",
                  "Conn.alive ", "SocketMixin.getsockopt ", "SocketMixin.setsockopt ")


def category(stack):
    frames = stack.split(";")
    for frame in reversed(frames):
        if any(t in frame for t in TRANSPARENT):
            continue
        for name, pats in CATEGORIES:
            if any(p in frame for p in pats):
                return name
    return "other"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--proxy", default="gproxy", choices=[n for n in bench.SERVERS if n.startswith("gproxy")])
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args()
    if not shutil.which("py-spy"):
        sys.exit("py-spy not found: pip install py-spy")
    bench.ensure_tools()
    bench.raise_nofile()
    workdir = bench.make_workdir("gproxy-profile-")
    try:
        backend = bench.Backend(workdir).start()
        g = bench.SERVERS[args.proxy](workdir, backend.port).start()
        bench.wrk(g.port, "/1k", 50, 2, workdir)
        workers = [pid for pid in g.pids() if pid != g.proc.pid]
        spies = []
        for pid in workers:
            out = os.path.join(workdir, f"spy-{pid}.txt")
            spies.append((out, subprocess.Popen(
                ["py-spy", "record", "-p", str(pid), "-r", str(args.rate), "-d", str(args.seconds + 1),
                 "--format", "raw", "-o", out, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            bench.STARTED.append(spies[-1][1])
        r = bench.measured(g, g.port, "/1k", 50, args.seconds, workdir)
        counts, syscalls = collections.Counter(), collections.Counter()
        for out, sp in spies:
            sp.wait(args.seconds + 60)
            with open(out) as f:
                for line in f:
                    stack, _, n = line.rstrip().rpartition(" ")
                    cat = category(stack)
                    counts[cat] += int(n)
                    if any(stack.rsplit(";", 1)[-1].startswith(x) for x in SYSCALL_LEAVES):
                        syscalls[cat] += int(n)
    finally:
        bench.stop_all()
    total = sum(counts.values()) or 1
    print(f"{args.proxy}: {r['rps']:,.0f} req/s, {r['cpu_us_per_req']:.0f} us CPU per request "
          f"(workers and arbiter), {total} samples\n")
    us = r["cpu_us_per_req"] / total
    print(f"user {r['utime_s']:.2f} s, system {r['stime_s']:.2f} s of CPU\n")
    print("| part of the request path | share of samples | us per request | of which in socket calls (us) |")
    print("|---|---|---|---|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / total:.1f}% | {n * us:.0f} | {syscalls[name] * us:.0f} |")
    print(f"\nraw py-spy output kept in {workdir}")


if __name__ == "__main__":
    main()
