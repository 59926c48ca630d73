"""Per-request cost of the API gateway's admission step, in-process.

    python3 bench/gateway_cost.py [N]

Times what a worker runs between routing and choosing a backend
(``ProxyApp.admit`` + ``ProxyApp.upstream_headers``) for a 1 KiB-style GET,
on a route without the gateway and on the same route with an API key
(``X-Api-Key``) and a rate limit keyed by the consumer that never triggers,
on the local table in /dev/shm (else /tmp); CPU time (``process_time``) per
request, best of 5 runs of N, and the difference. With ``redis-server``
installed it also starts one on a free loopback port and compares one Redis
decision (EVALSHA of the GCRA script) with one PING through the same client:
the store's cost is meant to be one loopback round trip.

gevent is monkey-patched first, as in a worker, so Redis uses gevent sockets.
"""

from gevent import monkey

monkey.patch_all()

import hashlib      # noqa: E402
import os           # noqa: E402
import shutil       # noqa: E402
import socket       # noqa: E402
import subprocess   # noqa: E402
import sys          # noqa: E402
import tempfile     # noqa: E402
import time         # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxy import config, gateway, ratelimit  # noqa: E402
from gproxy.exchange import Exchange         # noqa: E402
from gproxy.proxy import ProxyApp             # noqa: E402
from gproxy.ratestore import RedisStore       # noqa: E402

KEY = "bench-key-0123456789abcdef"
HEADERS = [("Host", "api.example.com"), ("User-Agent", "wrk"), ("Accept", "*/*"),
           ("X-Api-Key", KEY)]


class Request:
    """What the server hands over (downstream.Request): a GET without a body."""
    __slots__ = ("fields",)

    def __init__(self):
        self.fields = list(HEADERS)

    def has_body(self):
        return False


def environ():
    return {"REQUEST_METHOD": "GET", "RAW_URI": "/1k", "PATH_INFO": "/1k", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "api.example.com", "HTTP_USER_AGENT": "wrk",
            "HTTP_ACCEPT": "*/*", "HTTP_X_API_KEY": KEY, "wsgi.url_scheme": "http"}


def app_for(route_extra, workdir):
    keys = os.path.join(workdir, "keys.yaml")
    with open(keys, "w") as f:
        f.write(f'bench: "sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"\n')
    text = f"""
access_log: {{format: "off"}}
upstreams:
  backend: {{backends: ["http://127.0.0.1:9"]}}
routes:
  - {{upstream: backend{route_extra.replace("KEYS", keys)}}}
"""
    cfg = config.parse(text, os.path.join(workdir, "gproxy.yaml"))
    app = ProxyApp(cfg)
    app.gate = gateway.Gate(cfg, app.stats, app.is_trusted, workdir)   # the shared table, as in a worker
    return app


def per_request(app, n):
    up = app.upstreams["backend"]
    best = float("inf")
    for _ in range(5):
        envs = [(environ(), Request()) for _ in range(n)]
        t0 = time.process_time()
        for env, request in envs:
            ex = Exchange(env)
            route, _ = app.classify_and_route(env, ex, request)
            app.admit(request, route, ex)
            app.upstream_headers(env, request, ex, up)
        best = min(best, time.process_time() - t0)
    assert ex.consumer in (None, "bench") and ex.error is None
    return best / n * 1e6


def redis_round_trip(n):
    if shutil.which("redis-server") is None:
        print("redis-server not installed: Redis store not measured")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
    try:
        cfg = config.parse(f'rate_limit_store: {{url: "redis://127.0.0.1:{port}/0", timeout: 2s}}').rate_limit_store
        for _ in range(100):
            try:
                store = RedisStore(cfg, lambda: None)
                store.client.ping()
                break
            except Exception:       # not listening yet
                time.sleep(0.05)
        p = ratelimit.policy(1_000_000, 1, burst=1000)
        for name, fn in (("PING", store.client.ping),
                         ("decision (EVALSHA)", lambda: store.decide(b"bench", p, b"k"))):
            fn()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                best = min(best, time.perf_counter() - t0)
            print(f"redis {name:22s} {best / n * 1e6:7.1f} us wall per call (N={n}, best of 5)")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    workdir = tempfile.mkdtemp(prefix="gproxy-bench-", dir=base)
    try:
        plain = per_request(app_for("", workdir), n)
        gated = per_request(app_for(", auth: {api_keys: {file: KEYS}}, "
                                    "rate_limit: {rate: 1000000/s, burst: 1000000, key: consumer}",
                                    workdir), n)
        key_only = per_request(app_for(", auth: {api_keys: {file: KEYS}}", workdir), n)
        print(f"admit + upstream headers, no gateway     {plain:7.2f} us CPU/request (N={n}, best of 5)")
        print(f"  with API key                           {key_only:7.2f} us  (+{key_only - plain:.2f})")
        print(f"  with API key + rate limit (local)      {gated:7.2f} us  (+{gated - plain:.2f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    redis_round_trip(max(1000, n // 10))


if __name__ == "__main__":
    main()
