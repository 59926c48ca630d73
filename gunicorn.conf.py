"""gunicorn settings for gproxy, taken from the gproxy YAML config.

Runs in the arbiter and again on every HUP, so it stays light: it imports
only gproxy.lifecycle and gproxy.config (PyYAML) and never requests, urllib3, ssl or gevent,
which must be imported after the gevent worker has monkey-patched
(benoitc/gunicorn#2796). No preload for the same reason.
"""

from gproxy import lifecycle as _lifecycle

# A bad file exits at start; on HUP it keeps the last good config (logged).
_cfg = _lifecycle.load_config()

bind = list(_cfg.listen)
workers = _cfg.workers
worker_class = "gevent"
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


# The supervisor (health checks, shared health table, admin endpoint):
# started when the arbiter is ready, HUP'd with it, stopped with it.
def when_ready(server):
    _lifecycle.when_ready(server)


def on_reload(server):
    _lifecycle.on_reload(server)


def on_exit(server):
    _lifecycle.on_exit(server)
