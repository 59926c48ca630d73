"""gunicorn settings for gproxy, taken from the gproxy YAML config:
``gunicorn -c python:gproxy.gunicorn_conf gproxy.wsgi`` from any directory
(the checkout's gunicorn.conf.py imports this module).

Runs in the arbiter and again on every HUP, so it stays light: it imports
gproxy.lifecycle, gproxy.config (PyYAML) and gproxy.logs, never requests, urllib3, ssl or gevent,
which must be imported after the gevent worker has monkey-patched
(benoitc/gunicorn#2796). No preload for the same reason.

gunicorn reads a ``python:`` config with importlib, which caches the module:
the hooks below forget it once read (``lifecycle.forget_settings``), so the
next HUP executes it again and picks up the edited YAML file.
"""

import math as _math

from gproxy import lifecycle as _lifecycle
from gproxy import logs as _logs
from gproxy import netaddr as _netaddr

# A bad file exits at start; on HUP it keeps the last good config (logged).
_cfg = _lifecycle.load_config()

bind = list(_cfg.listen)
workers = _cfg.workers
# gproxy serves HTTP/1.1 itself (gproxy/worker.py, a subclass of gunicorn's
# gevent worker); imported here only by name.
worker_class = "gproxy.worker.Worker"
worker_connections = _cfg.worker_connections
# gunicorn takes whole seconds only (an int validator): round up, so that
# 500ms stays keep-alive on (1 s) instead of truncating to 0, which is off.
keepalive = _math.ceil(_cfg.keepalive_timeout)
graceful_timeout = _math.ceil(_cfg.graceful_timeout)
timeout = 30                    # worker heartbeat (a blocked hub is killed)
preload_app = False
proc_name = "gproxy"
control_socket_disable = True   # per-user default path collides across instances
# gproxy decides whom to trust (trusted_proxies); gunicorn must not turn a
# client's X-Forwarded-Proto into wsgi.url_scheme on its own.
forwarded_allow_ips = ""
secure_scheme_headers = {}
accesslog = None                # gproxy writes its own access log
errorlog = _cfg.error_log.path
loglevel = _cfg.error_log.level
# gunicorn's own metrics (requests, workers, log.*) land under
# <prefix>.gunicorn.*, a branch gproxy's names never use.
_gunicorn_statsd = _cfg.statsd.enabled and _cfg.statsd.gunicorn
if _gunicorn_statsd:
    statsd_host = _netaddr.join(_cfg.statsd.host, _cfg.statsd.port)
    statsd_prefix = _cfg.statsd.prefix
logger_class = _logs.gunicorn_logger_class(_cfg.error_log, _gunicorn_statsd)
pidfile = _cfg.pidfile          # what gproxy reload / reopen-logs signal (gunicorn renames it on USR2)


# The supervisor (health checks, shared health table, admin endpoint):
# started when the arbiter is ready, HUP'd with it, stopped with it.
def when_ready(server):
    _lifecycle.forget_settings(__name__)
    _lifecycle.when_ready(server)


def on_reload(server):
    _lifecycle.forget_settings(__name__)
    _lifecycle.on_reload(server)


def on_exit(server):
    _lifecycle.on_exit(server)
