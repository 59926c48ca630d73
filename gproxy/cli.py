"""The ``gproxy`` command: ``gproxy check FILE`` validates a config like
``nginx -t``; ``gproxy status`` prints the supervisor's view of every backend;
``gproxy hash-key`` prints what an API-key file holds for a key."""

import argparse
import getpass
import hashlib
import http.client
import json
import secrets
import sys

from . import __version__, config
from .errors import ConfigError


def check(args):
    try:
        cfg = config.load(args.file)
    except ConfigError as e:
        print(f"gproxy: {e}", file=sys.stderr)
        print(f"gproxy: configuration file {args.file or '(default)'} test failed", file=sys.stderr)
        return 1
    problems = auth_problems(cfg)
    for p in problems:
        print(f"gproxy: {p}", file=sys.stderr)
    if problems:
        print(f"gproxy: configuration file {cfg.source} test failed", file=sys.stderr)
        return 1
    print(f"gproxy: configuration file {cfg.source} syntax is ok "
          f"({len(cfg.upstreams)} upstreams, {len(cfg.routes)} routes)")
    print(f"gproxy: configuration file {cfg.source} test is successful")
    return 0


def auth_problems(cfg):
    """What a worker would find wrong when it builds each route's
    authentication (JWKS key material, an htpasswd file passlib refuses):
    the config's own checks stop short of PyJWT and passlib, which must not
    be imported in the arbiter (they import ssl before gevent patches it)."""
    from .auth import RouteAuth
    return [f"{cfg.source}: routes[{r.index}].auth: {broken}" for r in cfg.routes if r.auth is not None
            for broken in [RouteAuth(r.auth, r.name, quiet=True).broken] if broken]


STATUS_COLUMNS = ("UPSTREAM", "BACKEND", "STATE", "CHECK", "LATENCY", "OK/FAIL", "PASSIVE", "REASON")


def status_rows(st):
    rows = []
    for uname, up in st["upstreams"].items():
        for b in up["backends"]:
            a, p = b["active"], b["passive"]
            last = (a or {}).get("last_check") or {}
            rows.append((
                uname, b["name"], b["state"],
                "-" if not a else str(last.get("status") or "error") if last else "pending",
                f"{last['latency_ms']:.1f}ms" if last else "-",
                f"{a['consecutive_successes']}/{a['consecutive_failures']}" if a else "-",
                f"ejected {p['ejected_for_s']:.1f}s" if p["ejected"] else f"{p['recent_failures']} fails",
                b["reason"] or "-"))
    return rows


def status(args):
    address = args.admin
    if not address:
        try:
            address = config.load(args.config).admin.listen
        except ConfigError as e:
            print(f"gproxy: {e}", file=sys.stderr)
            return 1
    host, _, port = address.rpartition(":")
    try:
        c = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
        c.request("GET", "/status")
        r = c.getresponse()
        body = r.read()
    except OSError as e:
        print(f"gproxy: cannot reach the admin endpoint at {address}: {e.strerror or e}", file=sys.stderr)
        return 1
    if r.status != 200:
        print(f"gproxy: admin endpoint {address} answered {r.status}: {body.decode(errors='replace')}",
              file=sys.stderr)
        return 1
    st = json.loads(body)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"gproxy {st['version']}  supervisor pid {st['pid']}  started {st['started']}")
    print(f"config {st['config']['file']}  sha256 {st['config']['sha256'][:16]}"
          + (f"  RELOAD FAILED: {st['config']['reload_error']}" if st["config"]["reload_error"] else ""))
    rows = [STATUS_COLUMNS] + status_rows(st)
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATUS_COLUMNS) - 1)]
    print()
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def hash_key(args):
    """Print ``sha256:HEX`` for a key read from stdin (never from argv, which
    other users can read in ps and the shell keeps in its history)."""
    if args.new:
        key = secrets.token_urlsafe(32)     # 256 bits
        print(f"key:    {key}", file=sys.stderr)
    elif sys.stdin.isatty():
        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("gproxy: hash-key: empty key", file=sys.stderr)
        return 1
    # the same digest as gproxy/auth.py (not imported: it loads PyJWT)
    print("sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest())
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="gproxy", description="gproxy control command")
    p.add_argument("--version", action="version", version=f"gproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a configuration file (exit 0 if valid, 1 if not)")
    c.add_argument("file", nargs="?", help="config file (default: $GPROXY_CONFIG, ./gproxy.yaml, built-in)")
    c.set_defaults(func=check)
    s = sub.add_parser("status", help="print every backend's state from the admin endpoint")
    s.add_argument("--admin", metavar="HOST:PORT", help="admin endpoint (default: admin.listen of the config)")
    s.add_argument("--config", help="config file to read admin.listen from (default: as gproxy)")
    s.add_argument("--json", action="store_true", help="print the /status JSON as it is")
    s.set_defaults(func=status)
    h = sub.add_parser("hash-key", help="print the sha256:... line of an API-key file for a key "
                                        "read from stdin")
    h.add_argument("--new", action="store_true",
                   help="make a random key, print it on stderr and its digest on stdout")
    h.set_defaults(func=hash_key)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
