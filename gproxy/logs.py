"""The error log: gproxy's own lines (logger ``gproxy``) and gunicorn's
(``gunicorn.error``), in one format, text or JSON (``error_log.format``).

An adapter: it owns the error log stream. Imported by gunicorn.conf.py in the
arbiter, so it imports only logging and gunicorn's logging classes (never
requests, urllib3, ssl or gevent: see gunicorn.conf.py).

Rule 1: to stderr by default ("-", container friendly), or to a file opened
        with a plain ``logging.FileHandler``. gunicorn reopens every
        FileHandler of every logger on USR1 (``Logger.reopen_files``, in the
        arbiter and in each worker), which is what logrotate's ``postrotate``
        sends, as for nginx. The arbiter's reopen also reaches the
        supervisor (``ON_REOPEN``), which is not one of gunicorn's workers.
Rule 2: a JSON line is one object: ``time``, ``level``, ``logger``, ``pid``,
        ``message``, plus the structured ``fields`` a caller passed with
        ``extra={"fields": {...}}`` (an upstream failure names its route,
        upstream, backend, kind and the seconds it took).
Rule 3: no request header value is ever handed to a logger; the access log
        holds only the fields listed in ``accesslog``, and none of them is
        Authorization, Proxy-Authorization, Cookie or an API key.
"""

import json
import logging
import sys
import time

from gunicorn.glogging import Logger as _GunicornLogger
from gunicorn.instrument.statsd import Statsd as _GunicornStatsd

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"    # gunicorn's


class JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {
            "time": self.iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str)

    @staticmethod
    def iso_time(t):
        ms = int(t % 1 * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{ms:03d}" + \
            time.strftime("%z", time.localtime(t))


FORMATTERS = {
    "text": lambda: logging.Formatter(TEXT_FORMAT, DATE_FORMAT),
    "json": JsonFormatter,
}


def handler(path, stream=None):
    """A handler for ``path`` ("-" is ``stream``, by default stderr)."""
    if path == "-":
        return logging.StreamHandler(stream or sys.stderr)
    return logging.FileHandler(path)


def setup(error_cfg):
    """Point the ``gproxy`` logger at the error log (once per process, after
    fork), replacing the handlers it had (the bootstrap stderr handler that
    reports errors met before the config is read)."""
    log = logging.getLogger("gproxy")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    h = handler(error_cfg.path)
    h.setFormatter(FORMATTERS[error_cfg.format]())
    log.addHandler(h)
    log.setLevel(error_cfg.level.upper())
    log.propagate = False
    return log


# -- gunicorn's own error log: reopened with the supervisor's, text or JSON -----

# Called after gunicorn reopened this process's files (USR1, HUP): the
# arbiter registers one that passes USR1 on to the supervisor.
ON_REOPEN = []


class _Reopen:
    def reopen_files(self):
        super().reopen_files()
        for fn in ON_REOPEN:
            fn()


class _JsonGunicorn(_Reopen):
    """Mixin: after gunicorn set up its error log handler, give it the JSON
    formatter (gunicorn builds a text one from ``error_fmt``)."""

    def setup(self, cfg):
        super().setup(cfg)
        for h in self.error_log.handlers:
            if getattr(h, "_gunicorn", False):
                h.setFormatter(JsonFormatter())


class JsonLogger(_JsonGunicorn, _GunicornLogger):
    pass


class JsonStatsdLogger(_JsonGunicorn, _GunicornStatsd):
    pass


class TextLogger(_Reopen, _GunicornLogger):
    pass


class TextStatsdLogger(_Reopen, _GunicornStatsd):
    pass


def gunicorn_logger_class(error_cfg, gunicorn_statsd):
    """The value for gunicorn's ``logger_class``: our subclass of the class
    gunicorn would have used (its Statsd logger when ``statsd_host`` is set).
    The arbiter keeps its logger class across HUPs (``Arbiter.setup``), so a
    change of ``error_log.format`` or ``statsd.gunicorn`` needs a restart."""
    kind = "Json" if error_cfg.format == "json" else "Text"
    return f"gproxy.logs.{kind}{'Statsd' if gunicorn_statsd else ''}Logger"
