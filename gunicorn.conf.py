"""gunicorn settings for gproxy, taken from the gproxy YAML config.

Runs in the arbiter and again on every HUP, so it stays light: it imports
only gproxy.config (PyYAML) and never requests, urllib3, ssl or gevent,
which must be imported after the gevent worker has monkey-patched
(benoitc/gunicorn#2796). No preload for the same reason.
"""

import sys

from gproxy import config as _config
from gproxy.errors import ConfigError

try:
    _cfg = _config.load()
except ConfigError as _e:
    print(f"gproxy: {_e}", file=sys.stderr)
    sys.exit(1)

bind = list(_cfg.listen)
workers = _cfg.workers
# gevent_pywsgi: gunicorn's pywsgi worker with the raw request headers handed
# on (gproxy/pywsgi_worker.py); imported here only by name.
worker_class = {"gevent": "gevent",
                "gevent_pywsgi": "gproxy.pywsgi_worker.Worker"}[_cfg.worker_class]
worker_connections = _cfg.worker_connections
keepalive = int(_cfg.keepalive_timeout)
graceful_timeout = int(_cfg.graceful_timeout)
timeout = 30                    # worker heartbeat (a blocked hub is killed)
preload_app = False
proc_name = "gproxy"
control_socket_disable = True   # per-user default path collides across instances
http_parser = "python"          # the hijack paths rely on the Python parser's internals
# gproxy decides whom to trust (trusted_proxies); gunicorn must not turn a
# client's X-Forwarded-Proto into wsgi.url_scheme on its own.
forwarded_allow_ips = ""
secure_scheme_headers = {}
accesslog = None                # gproxy writes its own access log
errorlog = "-"


def pre_request(worker, req):
    # Hand the raw header list (repeated fields kept, in order) to the app:
    # the WSGI environ joins repeated fields into one.
    req.body.gproxy_headers = req.headers
