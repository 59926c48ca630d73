"""Run http-tests/cache-tests against gproxy's cache and fail below the target.

    python3 tests/cache_suite.py [--out results.json]

Starts gproxy under gunicorn (two workers) with one cached route whose
upstream is the suite's origin, runs the suite's ``run.sh`` (about a minute)
and scores it with its ``score.mjs`` the way cache-tests.fyi marks results.
The suite lives outside the repository: ``$CACHE_TESTS_DIR``, else
``../shared/tools/cache-tests`` next to the checkout. Needs Node.js >= 18.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from servers import REPO, GProxy, free_port  # noqa: E402

TARGET = {"required": 140, "optimal": 75}      # ahead of every published reverse proxy

CONFIG = """
listen: ["127.0.0.1:{{port}}"]
workers: 2
access_log: {{format: off}}
cache: {{path: {cache}, max_size: 256MB}}
upstreams:
  origin: {{backends: ["http://127.0.0.1:{origin}"], retries: 0, passive: {{max_fails: 0}}}}
routes:
  # stale_if_error lets the suite see a stale response stand in for a
  # dropped connection, so that its must-revalidate tests can run
  - {{upstream: origin, cache: {{stale_if_error: 86400s}}}}
"""


def suite_dir():
    for d in (os.environ.get("CACHE_TESTS_DIR"), os.path.join(REPO, "..", "shared", "tools", "cache-tests"),
              "/work/shared/tools/cache-tests"):
        if d and os.path.isfile(os.path.join(d, "run.sh")):
            return os.path.abspath(d)
    sys.exit("cache-tests not found: set CACHE_TESTS_DIR to a copy of http-tests/cache-tests with run.sh")


def score(suite, out):
    r = subprocess.run(["node", os.path.join(suite, "score.mjs"), out], capture_output=True, text=True,
                       check=True, timeout=60)
    head, row = r.stdout.strip().splitlines()[:2]
    cols = dict(zip(head.split("\t"), row.split("\t")))
    return {k: int(cols[k].split("/")[0]) for k in ("required", "optimal")}, cols


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="keep the suite's results JSON here")
    args = p.parse_args()
    suite = suite_dir()
    work = tempfile.mkdtemp(prefix="gproxy-cache-suite-")
    origin = free_port()
    g = GProxy(work, CONFIG.format(cache=os.path.join(work, "cache"), origin=origin))
    out = args.out or os.path.join(work, "results.json")
    env = dict(os.environ, CACHE_TESTS_ORIGIN_PORT=str(origin),
               CACHE_TESTS_WORK=os.environ.get("CACHE_TESTS_WORK", "/tmp/gproxy-cache-tests-work"))
    try:
        g.start()
        subprocess.run(["bash", os.path.join(suite, "run.sh"), g.url, out], env=env, check=True, timeout=600)
    finally:
        g.stop()
    passed, cols = score(suite, out)
    shutil.rmtree(work, ignore_errors=True) if args.out else None
    print(f"cache-tests: required {cols['required']}, optimal {cols['optimal']} "
          f"(target {TARGET['required']} and {TARGET['optimal']})")
    short = [k for k in TARGET if passed[k] < TARGET[k]]
    if short:
        print(f"cache-tests: below the target on {', '.join(short)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
