"""The WSGI entry point: ``gunicorn -c gunicorn.conf.py gproxy.wsgi``.

Imported in each worker after fork and after gevent's monkey-patching
(gunicorn.conf.py must not preload), so the Sessions, sockets and log
handlers created here belong to this worker alone.
"""

import logging
import os
import sys

from . import config, lifecycle, logs, observe, proxy


def _setup_error_log():
    log = logging.getLogger("gproxy")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


_setup_error_log()
# The arbiter's last good config (inherited at fork), so a HUP with a broken
# file keeps serving the old one; the file when run without gunicorn.conf.py.
_config = lifecycle.CONFIG or config.load()
logs.setup(_config.error_log)
application = proxy.ProxyApp(_config, lifecycle.worker_health(_config))
# `gproxy dump` asks each worker through its socket in the runtime directory.
observe.serve_dump(os.environ.get(lifecycle.ENV_RUNTIME_DIR))
