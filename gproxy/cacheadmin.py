"""Cache administration on the store's files: purge and stats for the admin
endpoint (in the supervisor) and ``gproxy cache``. The store is on disk and
shared, so acting on it here acts for every worker.

    GET  /cache                                   JSON: entries, bytes, max_size
    POST /cache/purge?url=http://host/path?q      that URL (every variant)
    POST /cache/purge?prefix=http://host/path/    every URL that starts so
"""

import logging
import threading
from urllib.parse import parse_qs, urlsplit

from .cachestore import Store

log = logging.getLogger("gproxy.error")

_lock = threading.Lock()        # the admin server is threaded; one connection
_stores = {}


def store(cfg):
    key = (cfg.cache.path, cfg.cache.max_size)
    if key not in _stores:
        _stores.clear()
        _stores[key] = Store(*key)
    return _stores[key]


def enabled(cfg):
    return any(r.cache for r in cfg.routes)


def stats(cfg):
    """(status, body) for GET /cache."""
    if not enabled(cfg):
        return 404, {"error": "no route has a cache"}
    with _lock:
        return 200, store(cfg).stats()


def store_url(url):
    """``http://Host:8080/a?b`` -> ``host:8080/a?b``, the form the store
    indexes (the Host a client sent, then the request target); None if
    it is not an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return parts.netloc.lower() + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def purge(cfg, request_path, client):
    """(status, body) for POST /cache/purge?url=... or ?prefix=..."""
    if not enabled(cfg):
        return 404, {"error": "no route has a cache"}
    query = parse_qs(urlsplit(request_path).query)
    given = [(k, query[k][0]) for k in ("url", "prefix") if k in query]
    if len(given) != 1:
        return 400, {"error": "give one of ?url=http://host/path or ?prefix=http://host/path/"}
    kind, url = given[0]
    where = store_url(url)
    if where is None:
        return 400, {"error": f"not an absolute http(s) URL: {url!r}"}
    with _lock:
        n = store(cfg).purge(where, prefix=kind == "prefix")
    log.warning("admin: %s purged %d cache entries for %s %s", client, n, kind, url)
    return 200, {"purged": n, kind: url}
