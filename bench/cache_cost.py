#!/usr/bin/env python3
"""What the cache costs and saves, on this machine, in one run.

    python3 bench/cache_cost.py [--seconds 5] [--reps 3] [--baseline DIR]

One nginx backend serving a 1 KiB file, two gproxy processes (2 workers
each, no access log): ``gproxy`` with a plain route and ``gproxy-cached``
with a cached one (``default_ttl: 10m``, as the backend sends no freshness).
wrk, 50 connections, interleaved, medians of ``--reps``:

    proxied    the plain route: every request goes to the backend
    hit        the cached route, one URL: every request is a HIT
    miss       the cached route, a new query string per request: every
               request is a MISS that goes to the backend and is written to
               the store (max_size 64 MB, so eviction runs too)

Reports req/s and the proxy's CPU microseconds per request (user + system
of the whole process tree, from /proc). ``--baseline DIR`` (a checkout, e.g.
``git archive`` of the commit before a change) adds ``proxied-base`` and
``hit-base``: the same two cases with that checkout's gproxy, in the same run. Processes are stopped by pid; every
load is bounded by wrk -d and goes to 127.0.0.1.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as R  # noqa: E402

CACHE_STORE = "cache: {{path: {cache}, max_size: 64MB}}"
CACHED_ROUTE = "  - upstream: backend\n    cache: {default_ttl: 10m}\n"


UNIQUE_LUA = """
n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/1k?" .. n)
end
"""


class CachedGProxy(R.GProxy):
    name = "gproxy-cached"

    def command(self):
        """run.py's gproxy, plus a store and a cache on its one route."""
        self.extra = CACHE_STORE.format(cache=os.path.join(self.dir, "cache"))
        cmd = super().command()
        with open(self.config) as f:
            text = f.read()
        assert "  - upstream: backend\n" in text, "run.py's GPROXY_YAML changed its route"
        self.write("gproxy.yaml", text.replace("  - upstream: backend\n", CACHED_ROUTE))
        return cmd


class CachedGProxyBase(CachedGProxy):
    name = "gproxy-cached-base"


def unique_wrk(port, conns, seconds, workdir):
    """wrk with a new query string per request (R.wrk's report, plus a request fn)."""
    script = os.path.join(workdir, "unique.lua")
    with open(script, "w") as f:
        f.write(R.WRK_LUA + UNIQUE_LUA)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
           f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    r = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def measure(server, seconds, workdir, unique=False):
    pids = server.pids()
    u0, s0 = R.cpu_ticks(pids)
    r = unique_wrk(server.port, 50, seconds, workdir) if unique else \
        R.wrk(server.port, "/1k", 50, seconds, workdir)
    u1, s1 = R.cpu_ticks(pids)
    r["cpu_us_per_req"] = ((u1 - u0) + (s1 - s0)) / R.CLK_TCK * 1e6 / max(r["requests"], 1)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", metavar="DIR", help="also measure this checkout's gproxy")
    args = p.parse_args()
    R.ensure_tools()
    workdir = R.make_workdir("gproxy-cache-bench-")
    runs = {"proxied": [], "hit": [], "miss": []}
    try:
        backend = R.Backend(workdir).start()
        plain = R.GProxy(workdir, backend.port).start()
        cached = CachedGProxy(workdir, backend.port).start()
        cases = [("proxied", plain, "/1k"), ("hit", cached, "/1k"), ("miss", cached, None)]
        if args.baseline:
            R.GProxyBase.repo = CachedGProxyBase.repo = os.path.abspath(args.baseline)
            cases += [("proxied-base", R.GProxyBase(workdir, backend.port).start(), "/1k"),
                      ("hit-base", CachedGProxyBase(workdir, backend.port).start(), "/1k")]
        for _, server, path in cases:
            if path:
                R.wrk(server.port, path, 50, 1, workdir)    # warm; the cached ones store /1k
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr)
            for case, server, path in cases:
                runs.setdefault(case, []).append(measure(server, args.seconds, workdir,
                                                         unique=path is None))
    finally:
        R.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print("| case | req/s | CPU us/req | errors |\n|---|---|---|---|")
    summary = {}
    for case, rs in runs.items():
        summary[case] = {k: statistics.median(r[k] for r in rs) for k in ("rps", "cpu_us_per_req", "errors")}
        s = summary[case]
        print(f"| {case} | {s['rps']:.0f} | {s['cpu_us_per_req']:.0f} | {s['errors']:.0f} |")
    print()
    for suffix in ("", "-base") if args.baseline else ("",):
        hit, proxied = summary["hit" + suffix], summary["proxied" + suffix]
        print(f"{'baseline: ' if suffix else ''}hit CPU / proxied CPU = "
              f"{hit['cpu_us_per_req'] / proxied['cpu_us_per_req']:.2f} (target <= 0.5); "
              f"hit req/s / proxied req/s = {hit['rps'] / proxied['rps']:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
