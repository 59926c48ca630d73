"""The ``gproxy`` command: ``gproxy check FILE`` validates a config like
``nginx -t``; the operator commands talk to a running instance (found and
checked by ``control``): ``status`` prints the supervisor's view of every
backend, ``reload`` HUPs and waits for the result, ``drain``/``enable`` a
backend, ``reopen-logs`` after a rotation, ``drain-instance`` before a stop;
``status --watch`` refreshes the live traffic table like HAProxy's stats
page, ``dump`` prints what each worker is doing; ``gproxy hash-key`` prints
what an API-key file holds for a key."""

import argparse
import getpass
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from urllib.parse import quote

from . import __version__, config, control
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


def target(args):
    """(config or None, config file, admin address, pidfile) for a command that
    talks to a running instance. A broken file still names the instance (its
    path, the default admin address), so ``status`` works while it is broken."""
    path = args.config or os.environ.get("GPROXY_CONFIG") or \
        ("gproxy.yaml" if os.path.exists("gproxy.yaml") else None)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        print(f"gproxy: warning: {e}; using the default admin address", file=sys.stderr)
        cfg = None
    admin = args.admin or (cfg.admin.listen if cfg else config.Admin().listen)
    pidfile = args.pidfile or (cfg.pidfile if cfg else None)
    return cfg, path or "<built-in>", admin, pidfile


def instance(args, cfg_file, admin, pidfile):
    """The checked /status of the instance meant (control, Rules 1-2); an
    explicit --admin with no config file and no pidfile is taken as it is."""
    if not pidfile and cfg_file == "<built-in>" and args.admin:
        code, st = control.admin_request(admin, "GET", "/status")
        if code != 200:
            raise control.ControlError(f"admin endpoint {admin} answered {code}: {st}")
        return st
    return control.find_instance(admin, cfg_file, pidfile)


def operator_command(fn):
    """Run ``fn(args)``; a ControlError is printed and exits 1."""
    def run(args):
        try:
            return fn(args)
        except control.ControlError as e:
            print(f"gproxy: {e}", file=sys.stderr)
            return 1
    return run


@operator_command
def status(args):
    _, cfg_file, address, pidfile = target(args)
    while True:
        st = instance(args, cfg_file, address, pidfile)
        if args.json:
            print(json.dumps(st, indent=2))
            return 0
        if args.watch:
            print("\033[H\033[2J", end="")    # clear the terminal, as watch(1)
        print_status(st)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def print_status(st):
    print(f"gproxy {st['version']}  supervisor pid {st['pid']}  arbiter pid {st['arbiter_pid']}  "
          f"started {st['started']}")
    print(f"config {st['config']['file']}  sha256 {st['config']['sha256'][:16]}"
          + (f"  RELOAD FAILED: {st['config']['reload_error']}" if st["config"]["reload_error"] else ""))
    if st.get("instance", {}).get("draining"):
        left = st["instance"]["stop_in_s"]
        print("instance DRAINING" + (f" (stop in {left:.1f}s)" if left is not None else ""))
    print()
    print("\n".join(_table(STATUS_COLUMNS, status_rows(st))))
    tr = st.get("traffic")
    if tr:
        srv = tr["server"]
        print(f"\ntraffic (percentiles over the last {tr['window_s']:g}s; {len(tr['workers'])} workers, "
              f"{srv['requests_active']} requests and {srv['tunnels_active']} tunnels active)")
        print("\n".join(_table(TRAFFIC_COLUMNS, traffic_rows(tr))))


TRAFFIC_COLUMNS = ("UPSTREAM", "BACKEND", "ACT", "REQ", "2xx", "3xx", "4xx", "5xx", "ERRORS",
                   "IN", "OUT", "P50", "P90", "P99")


def _size(n):
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _ms(v):
    return "-" if v is None else f"{v:.1f}ms"


def traffic_rows(tr):
    rows = []
    for uname, up in tr["upstreams"].items():
        for b in up["backends"]:
            r = b["requests"]
            rows.append((uname, b["name"], str(b["active"]), str(sum(r.values())),
                         *(str(r[c]) for c in ("2xx", "3xx", "4xx", "5xx")),
                         ",".join(f"{k}:{v}" for k, v in sorted(b["errors"].items())) or "-",
                         _size(b["bytes_in"]), _size(b["bytes_out"]),
                         _ms(b["p50_ms"]), _ms(b["p90_ms"]), _ms(b["p99_ms"])))
    return rows


def _table(columns, rows):
    rows = [columns] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]


@operator_command
def dump(args):
    _, cfg_file, address, pidfile = target(args)
    instance(args, cfg_file, address, pidfile)      # the instance meant, checked
    code, d = control.admin_request(address, "GET", "/dump", timeout=30)
    if code != 200:
        raise control.ControlError(f"admin endpoint {address} answered {code}: {d}")
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for w in d["workers"]:
        if "error" in w:
            print(f"worker {w['pid']}: {w['error']}\n")
            continue
        print(f"worker {w['pid']}: {len(w['requests'])} requests in flight")
        for r in w["requests"]:
            print(f"  {r['age_s']:8.3f}s  {r['phase']:<28} {r['method']} {r['target']}  "
                  f"route={r['route'] or '-'} backend={r['backend'] or '-'} rid={r['request_id'] or '-'}")
        if not args.brief:
            print("\n" + w["greenlets"] + "\n")
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


@operator_command
def reload(args):
    """Check the file, HUP the arbiter, wait for the supervisor to show the
    new config hash (or the reload error)."""
    if check(argparse.Namespace(file=args.config)) != 0:
        return 1
    cfg, cfg_file, address, pidfile = target(args)
    st = instance(args, cfg_file, address, pidfile)
    digest = control.file_digest(cfg.source, config.DEFAULT_YAML)
    os.kill(st["arbiter_pid"], signal.SIGHUP)
    c = control.wait_reloaded(args.admin or cfg.admin.listen, st["config"].get("reloads", 0), digest,
                              args.timeout)
    print(f"gproxy: reloaded {c['file']} (sha256 {c['sha256'][:16]}) in arbiter pid {st['arbiter_pid']}")
    return 0


@operator_command
def backend_action(args):
    _, cfg_file, address, pidfile = target(args)
    instance(args, cfg_file, address, pidfile)
    path = f"/upstreams/{quote(args.upstream, safe='')}/backends/{quote(args.backend, safe='')}/{args.action}"
    code, body = control.admin_request(address, "POST", path)
    if code != 200:
        raise control.ControlError(body.get("error", body) if isinstance(body, dict) else body)
    print(f"gproxy: upstream {args.upstream} backend {args.backend}: {body['state']}")
    return 0


@operator_command
def reopen_logs(args):
    _, cfg_file, address, pidfile = target(args)
    st = instance(args, cfg_file, address, pidfile)
    os.kill(st["arbiter_pid"], signal.SIGUSR1)
    print(f"gproxy: USR1 sent to arbiter pid {st['arbiter_pid']} (arbiter, workers and supervisor "
          "reopen their log files)")
    return 0


@operator_command
def drain_instance(args):
    cfg, cfg_file, address, pidfile = target(args)
    st = instance(args, cfg_file, address, pidfile)
    code, body = control.admin_request(address, "POST", f"/instance/{'enable' if args.cancel else 'drain'}")
    if code != 200:
        raise control.ControlError(f"admin endpoint {address} answered {code}: {body}")
    if args.cancel:
        print("gproxy: instance drain cancelled; the health path answers 200")
        return 0
    delay = body["drain_delay_s"]
    print(f"gproxy: health path answers 503; graceful stop of arbiter pid {st['arbiter_pid']} in {delay:g}s")
    if args.no_wait:
        return 0
    limit = delay + (cfg.graceful_timeout if cfg else 30) + 10
    if not control.wait_gone(st["arbiter_pid"], limit):
        raise control.ControlError(f"arbiter pid {st['arbiter_pid']} still running after {limit:g}s")
    print(f"gproxy: arbiter pid {st['arbiter_pid']} stopped")
    return 0


def cache(args):
    """``gproxy cache stats`` and ``gproxy cache purge URL``, on the store's files."""
    from . import cache as cache_admin
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"gproxy: {e}", file=sys.stderr)
        return 1
    if args.action == "stats":
        code, body = cache_admin.stats(cfg)
    else:
        path = "/cache/purge?" + ("prefix=" if args.prefix else "url=") + quote(args.url or "", safe="")
        code, body = cache_admin.purge(cfg, path, "gproxy cache purge")
    if code != 200:
        print(f"gproxy: {body['error']}", file=sys.stderr)
        return 1
    if args.json or args.action == "purge":
        print(json.dumps(body))
    else:
        for k in ("path", "entries", "bytes", "max_size"):
            print(f"{k:<9} {body[k]}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="gproxy", description="gproxy control command")
    p.add_argument("--version", action="version", version=f"gproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a configuration file (exit 0 if valid, 1 if not)")
    c.add_argument("file", nargs="?", help="config file (default: $GPROXY_CONFIG, ./gproxy.yaml, built-in)")
    c.set_defaults(func=check)
    def instance_parser(name, func, help):
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", help="config file (default: $GPROXY_CONFIG, ./gproxy.yaml, built-in)")
        s.add_argument("--admin", metavar="HOST:PORT", help="admin endpoint (default: admin.listen of the config)")
        s.add_argument("--pidfile", help="the arbiter's pidfile (default: pidfile of the config)")
        s.set_defaults(func=func)
        return s

    st = instance_parser("status", status, "print every backend's state and live traffic from the admin endpoint")
    st.add_argument("--json", action="store_true", help="print the /status JSON as it is")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    dp = instance_parser("dump", dump, "print each worker's in-flight requests and greenlet stacks")
    dp.add_argument("--json", action="store_true", help="print the /dump JSON as it is")
    dp.add_argument("--brief", action="store_true", help="in-flight requests only, no stacks")
    instance_parser("reload", reload, "check the config, HUP the arbiter, wait for the result").add_argument(
        "--timeout", type=float, default=30, help="seconds to wait for the reload (default 30)")
    for action, text in (("drain", "take a backend out of rotation (in-flight requests complete)"),
                         ("enable", "put a drained backend back in rotation")):
        b = instance_parser(action, backend_action, text)
        b.add_argument("upstream")
        b.add_argument("backend", help="host:port, as gproxy status shows it")
        b.set_defaults(action=action)
    instance_parser("reopen-logs", reopen_logs, "USR1 to the arbiter: every process reopens its log files")
    d = instance_parser("drain-instance", drain_instance,
                        "health_path answers 503 for drain_delay, then a graceful stop")
    d.add_argument("--no-wait", action="store_true", help="return once the drain has begun")
    d.add_argument("--cancel", action="store_true", help="cancel a drain whose stop has not come yet")
    h = sub.add_parser("hash-key", help="print the sha256:... line of an API-key file for a key "
                                        "read from stdin")
    h.add_argument("--new", action="store_true",
                   help="make a random key, print it on stderr and its digest on stdout")
    h.set_defaults(func=hash_key)
    k = sub.add_parser("cache", help="cache stats, or purge one URL or a prefix (acts on the store)")
    k.add_argument("action", choices=("stats", "purge"))
    k.add_argument("url", nargs="?", help="for purge: http://host/path (with --prefix: every URL under it)")
    k.add_argument("--prefix", action="store_true", help="purge every URL that starts with URL")
    k.add_argument("--config", help="config file (default: as gproxy)")
    k.add_argument("--json", action="store_true", help="print the stats as JSON")
    k.set_defaults(func=cache)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
