"""Access and error log output: one line per request, JSON or nginx "combined".

An adapter: it owns the log streams (stdout by default, or a file that
logrotate may move: ``WatchedFileHandler`` reopens it). Sensitive header
values are never written: the record holds only the fields below.

Rule 1: a line goes straight to the handler's stream, not through
        ``Logger.info``: the LogRecord, the handler lock (a Python-level
        lock once gevent has patched threading) and the WatchedFileHandler's
        stat() per line cost about 35 us of a request's 300; the file is
        checked for a move once a second instead, and gunicorn's USR1
        reopen still finds the handler on the ``gproxy.access`` logger.
Rule 2: JSON is encoded by orjson (under 1 us a record, against 15 us for
        ``json.dumps``); a record orjson refuses (a lone surrogate in a
        header) is written by ``json`` with that character escaped.
Rule 3: with ``buffer`` (nginx ``access_log ... buffer=64k flush=1s``) the
        lines are gathered in the worker and written in one write() when
        they fill the buffer, when the oldest has waited ``flush``
        (a timer greenlet, not a check per request), before a USR1 reopen
        closes the file, and at exit: both call the handler's ``flush``
        (gunicorn's reopen through ``FileHandler.close``, logging's atexit
        shutdown directly). A worker killed with SIGKILL loses what it held.
        The lines are gathered by the worker's greenlets and written by
        them or the timer greenlet, all in one thread; a USR1 that closes
        the file under a write is retried on the new file (Rule 1).
Rule 4: a line is bytes from its formatter to the file (orjson writes
        bytes): one write() on the file's raw FileIO, not the text and
        buffer layers above it (whose write and flush cost 1.4 us of a
        line's 2.3 in bench/observe_cost.py). Nothing is ever left in those
        layers: the handler's own emit() flushes every record.
"""

import json
import logging
import logging.handlers
import sys
import threading
import time

import orjson

ACCESS = logging.getLogger("gproxy.access")
ERROR = logging.getLogger("gproxy.error")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class _Gathering:
    """Mixin for a log handler: ``gather`` holds lines (bytes, each ending
    in a newline) in one bytearray up to ``limit`` bytes (a list of the
    lines kept each one's memory until the write, which made a line cost
    half as much again; bench/observe_cost.py); ``flush`` writes them, and so does
    ``FileHandler.close``, which calls it (Rule 3)."""

    limit = 0           # bytes; 0: every line is written at once (Rule 1)
    raw_of = raw = None     # the stream whose FileIO ``raw`` is (Rule 4)

    def gather(self, line):
        """Hold ``line`` until the held lines fill ``limit`` (Rule 3)."""
        self.held += line
        if len(self.held) >= self.limit:
            self.write_gathered()

    def write_gathered(self):
        if not self.held:
            return
        held, self.held = self.held, bytearray()
        self.write_out(held)

    def write_out(self, data):
        """One write() of ``data`` (Rule 4)."""
        stream = self.stream
        if stream is not self.raw_of:
            if stream is None:          # a file closed at exit, written to late
                stream = self.stream = self._open()
            self.raw_of, self.raw = stream, _raw(stream)
        try:
            _write(stream, self.raw, data)
        except ValueError:      # closed by a USR1 reopen under the write: the new file
            if self.stream is None or self.stream.closed:
                self.stream = self._open()
            _write(self.stream, _raw(self.stream), data)

    def flush(self):
        self.write_gathered()
        super().flush()


def _raw(stream):
    """The FileIO under a text stream, or None (a test's capture has none)."""
    return getattr(getattr(stream, "buffer", None), "raw", None)


def _write(stream, raw, data):
    """``data`` to ``raw``, the file under ``stream``, in one write() (Rule
    4); without one, or after a partial write, through the text layers."""
    n = raw.write(data) if raw is not None else 0
    if n != len(data):
        stream.write(data[n or 0:].decode("utf-8", "backslashreplace"))
        stream.flush()


class _StreamHandler(_Gathering, logging.StreamHandler):
    def _open(self):
        return self.stream      # stdout is never reopened


class _FileHandler(_Gathering, logging.handlers.WatchedFileHandler):
    pass


def _handler(cfg, stream):
    h = _StreamHandler(stream) if cfg.path == "-" else _FileHandler(cfg.path)
    h.setFormatter(logging.Formatter("%(message)s"))
    h.limit, h.held = cfg.buffer, bytearray()
    h.watch = not h.limit and isinstance(h, logging.handlers.WatchedFileHandler)
    return h


_out = None             # the handler access() writes to
_check_at = 0.0         # monotonic time of the next look for a moved file
CHECK_EVERY = 1.0       # seconds between those looks


def setup(access_cfg):
    """Configure the access log (called once per worker, after fork)."""
    global _out
    for h in list(ACCESS.handlers):
        ACCESS.removeHandler(h)
        if h is _out:
            h.flush()           # what it gathered goes to its file
    _out = None
    ACCESS.propagate = False
    ACCESS.setLevel(logging.INFO)
    if access_cfg.format == "off":
        ACCESS.disabled = True
        return None
    ACCESS.disabled = False         # access() writes only while _out is set
    _out = _handler(access_cfg, sys.stdout)
    ACCESS.addHandler(_out)
    if _out.limit:
        threading.Thread(target=_flush_every, args=(_out, access_cfg.flush),
                         name="access_log_flush", daemon=True).start()
    if access_cfg.format == "json":
        return json_line
    if access_cfg.format == "fields":
        return line_of(fields_format(access_cfg.fields))
    return line_of(format_combined)


def _clf_time(t):
    tm = time.localtime(t)
    off = -time.altzone if tm.tm_isdst > 0 else -time.timezone
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
            f"{sign}{off // 3600:02d}{off % 3600 // 60:02d}")


def json_line(r):
    """The JSON record as the bytes of one line (Rule 4)."""
    try:
        return orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:      # a lone surrogate: json writes it escaped
        return json.dumps(r, separators=(",", ":")).encode() + b"\n"


def line_of(fmt):
    """A text format as a function returning the bytes of one line."""
    def line(r):
        return (fmt(r) + "\n").encode("utf-8", "backslashreplace")
    return line


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
            + (f' cache={r["cache_status"]}' if r.get("cache_status") else "")
            + (f' upstreams={_attempts(r)}' if r.get("attempts") and len(r["attempts"]) > 1 else ""))


def _attempts(r):
    """Every attempt as backend:status-or-error:seconds, comma-separated."""
    return ",".join(f'{a["backend"]}:{a["status"] or a["error"]}:{a["time"]:.3f}' for a in r["attempts"])


def _each(fmt):
    """An nginx-style per-attempt list ("a, b"), "-" without attempts."""
    def value(r):
        return ", ".join(fmt(a) for a in r.get("attempts") or ()) or "-"
    return value


# access_log.fields: each name's value in a record (config.ACCESS_LOG_FIELDS).
FIELD_VALUES = {
    "time_iso8601": lambda r: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(r["time"])),
    "time_local": lambda r: f"[{_clf_time(r['time'])}]",
    "request": lambda r: f"{r['method']} {r['target']} {r['protocol']}",
    "duration": lambda r: f"{r['duration']:.3f}",
    "upstream_time": lambda r: "-" if r["upstream_time"] is None else f"{r['upstream_time']:.3f}",
    "upstream_addr": _each(lambda a: a["backend"]),
    "upstream_status": _each(lambda a: str(a["status"] or a["error"])),
    "upstream_response_time": _each(lambda a: f"{a['time']:.3f}"),
}


def fields_format(names):
    """A formatter writing ``names`` in order, space-separated; a value with a
    space or a quote is quoted (as nginx's "$request"), an empty one is "-"."""
    getters = [FIELD_VALUES.get(n) or (lambda r, n=n: r[n]) for n in names]

    def format_fields(r):
        out = []
        for get in getters:
            v = get(r)
            v = "-" if v is None or v == "" else str(v)
            if " " in v or '"' in v:
                v = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out.append(v)
        return " ".join(out)
    return format_fields


def _q(v):
    return "-" if not v else v.replace('"', '\\"')


def _flush_every(h, interval):
    """Write the gathered lines every ``interval``; a file that logrotate
    moved is reopened after them, so they go to the file they were
    gathered for (Rule 3). A greenlet in a gevent worker."""
    while _out is h:
        time.sleep(interval)
        h.write_gathered()
        if isinstance(h, logging.handlers.WatchedFileHandler) and h.stream is not None:
            h.reopenIfNeeded()


def access(line):
    """Write one line (bytes ending in a newline: Rule 1), or gather it
    (Rule 3)."""
    global _check_at
    h = _out
    if h is None:
        return
    if h.watch:             # unbuffered to a file; gathering, the timer looks (_flush_every)
        now = time.monotonic()
        if now >= _check_at:
            _check_at = now + CHECK_EVERY
            h.reopenIfNeeded()
    if h.limit:
        h.gather(line)
    else:
        h.write_out(line)
