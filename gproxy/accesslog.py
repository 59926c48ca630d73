"""Access and error log output: one line per request, JSON or nginx "combined".

An adapter: it owns the log streams (stdout by default, or a file that
logrotate may move: ``WatchedFileHandler`` reopens it). Sensitive header
values are never written: the record holds only the fields below.
"""

import json
import logging
import logging.handlers
import sys
import time

ACCESS = logging.getLogger("gproxy.access")
ERROR = logging.getLogger("gproxy.error")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _handler(path, stream):
    if path == "-":
        h = logging.StreamHandler(stream)
    else:
        h = logging.handlers.WatchedFileHandler(path)
    h.setFormatter(logging.Formatter("%(message)s"))
    return h


def setup(access_cfg):
    """Configure the access log (called once per worker, after fork)."""
    for logger in (ACCESS,):
        for h in list(logger.handlers):
            logger.removeHandler(h)
    ACCESS.propagate = False
    ACCESS.setLevel(logging.INFO)
    if access_cfg.format == "off":
        ACCESS.disabled = True
        return None
    ACCESS.disabled = False
    ACCESS.addHandler(_handler(access_cfg.path, sys.stdout))
    return FORMATS[access_cfg.format]


def _clf_time(t):
    tm = time.localtime(t)
    off = -time.altzone if tm.tm_isdst > 0 else -time.timezone
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
            f"{sign}{off // 3600:02d}{off % 3600 // 60:02d}")


def format_json(r):
    return json.dumps(r, separators=(",", ":"), ensure_ascii=False)


def format_combined(r):
    """nginx ``combined``, then the proxy's own fields as key=value."""
    req = f"{r['method']} {r['target']} {r['protocol']}".replace('"', '\\"')
    return (f'{r["client"]} - - [{_clf_time(r["time"])}] "{req}" {r["status"]} '
            f'{r["bytes_out"]} "{_q(r["referer"])}" "{_q(r["user_agent"])}" '
            f'rt={r["duration"]:.3f} urt={"-" if r["upstream_time"] is None else format(r["upstream_time"], ".3f")} '
            f'route={r["route"] or "-"} upstream={r["upstream"] or "-"} backend={r["backend"] or "-"} '
            f'retries={r["retries"]} in={r["bytes_in"]} rid={r["request_id"]}'
            + (f' error={r["error"]}' if r["error"] else "")
            + (f' consumer={_q(r["consumer"])}' if r.get("consumer") else "")
            + (f' reason={r["reason"]}' if r.get("reason") else "")
            + (f' cache={r["cache_status"]}' if r.get("cache_status") else ""))


def _q(v):
    return "-" if not v else v.replace('"', '\\"')


FORMATS = {"json": format_json, "combined": format_combined}


def access(line):
    ACCESS.info(line)
