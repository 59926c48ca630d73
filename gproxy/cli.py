"""The ``gproxy`` command: ``gproxy check FILE`` validates a config like ``nginx -t``."""

import argparse
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
    print(f"gproxy: configuration file {cfg.source} syntax is ok "
          f"({len(cfg.upstreams)} upstreams, {len(cfg.routes)} routes)")
    print(f"gproxy: configuration file {cfg.source} test is successful")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="gproxy", description="gproxy control command")
    p.add_argument("--version", action="version", version=f"gproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a configuration file (exit 0 if valid, 1 if not)")
    c.add_argument("file", nargs="?", help="config file (default: $GPROXY_CONFIG, ./gproxy.yaml, built-in)")
    c.set_defaults(func=check)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
