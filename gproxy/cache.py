"""The cache step of a reverse-proxied request: look up, serve, revalidate,
store while streaming, invalidate.

    hit = cache.fresh(environ, ex, route, request, start_response)
    if hit is not None:                                 # HIT, answered after the gateway
        return hit
    plan = cache.lookup(environ, ex, route, fields)     # None: not a cached route
    sent = plan.forward(send)                           # MISS, EXPIRED, REVALIDATED, BYPASS
    if sent is None:                                    # HIT, STALE, UPDATING, 504
        return plan.serve(start_response, send)
    attempt, resp = sent

``send(fields, ex=ex, body=body)`` is the proxy's own forwarding
(``exchange.send``: choose, retries, timeouts); the response it returns is
wrapped so that its body is written to the store while it streams to the
client. The rules are ``cachepolicy``; the files and the index are
``cachestore``. ``stats`` and ``purge`` serve the admin endpoint and
``gproxy cache``.

Rule 1: the store never fails a request. An I/O error while looking up or
        writing is logged and the request is proxied as if uncached (BYPASS).
Rule 2: concurrent misses for one key send one request upstream, across
        workers (a flock per key, nginx ``proxy_cache_lock``); the others
        poll for at most ``lock_timeout`` and are then served from the new
        entry, or go upstream themselves.
Rule 3: a body is stored only when it arrived complete (Content-Length
        matched, the chunked framing ended); a response larger than
        ``max_object_size`` is relayed and forgotten.
"""

import copy
import logging
import sqlite3
import threading
import time

from urllib.parse import parse_qs, urlsplit

from . import cachepolicy as P, errors, exchange, headers as H
from .cachestore import READ_SIZE, Store

log = logging.getLogger("gproxy.error")

LOCK_POLL = 0.02    # seconds between tries of a busy key lock
_CONDITIONAL = frozenset(("if-none-match", "if-modified-since", "if-match", "if-unmodified-since",
                          "if-range"))
_STORE_ERRORS = (OSError, sqlite3.Error, ValueError)
_SERVED_DROP = frozenset(("content-length", "server"))


class Cache:
    """One per worker (and one in the supervisor for purge and stats)."""

    def __init__(self, config, recorder):
        self.cfg = config.cache
        self.recorder = recorder
        self.store = Store(self.cfg.path, self.cfg.max_size)
        self.rules = {r.name: P.Route(r.cache.default_ttl, r.cache.stale_while_revalidate,
                                      r.cache.stale_if_error, r.cache.cdn_cache_control)
                      for r in config.routes if r.cache is not None}

    def fresh(self, environ, ex, route, request, start_response):
        """The common hit, answered before anything is prepared for a
        backend: a fresh stored response to a GET or HEAD (HIT); None when
        the request needs the full step (``lookup``), which then decides
        everything again (a MISS pays a second memo lookup, a few us).

        The rules see the client's fields as ``upstream_headers`` sends
        them, less those the proxy sets itself (Host, X-Forwarded-*,
        X-Request-Id): an entry that varies on one of those is left to the
        full step, as are an Upgrade and a store error (the full step logs
        it and bypasses: Rule 1)."""
        if ex.method not in ("GET", "HEAD") or request.upgrade:
            return None
        req = P.index(H.strip_hop_by_hop(request.fields, H.REQUEST_DROP))
        now = time.time()
        try:
            entry = self._fresh_entry(cache_key(route, environ, ex), req, now, self.rules[route.name])
            # a body kept in memory needs no file; else open it now (Plan._open)
            f = None if entry is None or entry.body is not None else self.store.open_body(entry)
        except _STORE_ERRORS:
            return None
        if entry is None or (f is None and entry.body is None):
            return None             # nothing fresh, or evicted meanwhile
        try:
            self.store.touch(entry, now)
        except _STORE_ERRORS as e:
            _store_failed("touch", e)
        ex.cache_status = "HIT"
        served = Served(entry.record, req, "HIT", now, req.keys().isdisjoint(P.REUSE_FIELDS))
        return Hit(self.recorder, ex, served, served.body(ex.method, self.store, entry, f),
                   start_response)

    def _fresh_entry(self, key, req, now, rules):
        """The stored response ``Plan._choose`` would pick, when it is FRESH."""
        for entry in self.store.variants(key):
            vary = entry.record["vary"]
            if vary and any(n in H.REQUEST_DROP for n, _ in vary):
                return None
            if not vary and req.keys().isdisjoint(P.REUSE_FIELDS):
                return entry if now < P.fresh_until(entry.record, rules) else None
            decision = P.reuse(entry.record, req, now, rules)
            if decision != P.MISS:          # its secondary key matched (4.1)
                return entry if decision == P.FRESH else None
        return None

    def lookup(self, environ, ex, route, fields):
        if route.cache is None:
            return None
        plan = Plan(self, environ, ex, route, fields)
        try:
            plan.look()
        except _STORE_ERRORS as e:
            _store_failed("lookup", e)
            plan.release()
            plan.answer, plan.entry, plan.storing = None, None, False
            plan.status = "BYPASS"
        ex.cache_status = plan.status
        return plan


def cache_key(route, environ, ex):
    """The primary key (4): the route's key parts joined."""
    parts = []
    target = ex.target
    for part in route.cache.key:
        if part == "scheme":
            parts.append(environ.get("wsgi.url_scheme", "http"))
        elif part == "host":
            parts.append(ex.host.lower())
        elif part == "uri":
            parts.append(target)
        elif part == "path":
            parts.append(target.split("?", 1)[0])
        elif part == "query":
            parts.append(target.partition("?")[2])
        elif part == "method":
            parts.append("GET" if ex.method == "HEAD" else ex.method)
        elif part == "upstream":
            parts.append(route.upstream)
        else:
            kind, _, name = part.partition(":")
            value = environ.get("HTTP_" + name.upper().replace("-", "_"), "")
            parts.append(value if kind == "header" else H.cookie(value, name))
    return "\x00".join(parts)


class Plan:
    """What the cache knows and decided about one request."""

    def __init__(self, cache, environ, ex, route, fields):
        self.cache, self.store = cache, cache.store
        self.environ, self.ex, self.route = environ, ex, route
        self.rules = cache.rules[route.name]
        self.fields = fields            # as sent upstream
        self.req = P.index(fields)      # the same, for the rules
        self.url = ex.host.lower() + ex.target
        self.key = None
        self.entry = None           # the stored response chosen, if any
        self.answer = None          # a decision served without going upstream
        self.status = "BYPASS"
        self.storing = False        # a response may be stored
        self.lock = None
        self.request_time = None
        self.file = None            # the chosen entry's body, once opened

    # -- the lookup ------------------------------------------------------------

    def look(self):
        ex = self.ex
        if ex.method not in ("GET", "HEAD"):
            return      # BYPASS: unsafe methods invalidate after
        self.key = cache_key(self.route, self.environ, ex)
        decision = self._choose()
        if decision in (P.FRESH, P.STALE, P.UPDATING) and self._open():
            self.answer = decision
            return
        if decision != P.REVALIDATE:
            self.entry = None       # MISS, or the body went away (evicted)
        if decision == P.MISS and self.route.cache.lock and ex.method == "GET":
            self._wait_for_lock()
            if self.answer:
                return
        self.status = "MISS" if self.entry is None else "EXPIRED"
        # a range is relayed, not stored; revalidating, it is left out (below)
        self.storing = ex.method == "GET" and (
            self.entry is not None or P.field(self.req, "range") is None)
        if self.answer is None and P.only_if_cached(self.req):
            self.answer = "gateway_timeout"     # 5.2.1.7: 504 rather than go upstream
            self.status = "MISS"

    def _match(self, now):
        """The stored response this request's secondary key matches and what
        ``reuse`` says of it; (None, MISS) when there is none."""
        for entry in self.store.variants(self.key):
            if P.vary_matches(entry.record["vary"], self.req):
                return entry, P.reuse(entry.record, self.req, now, self.rules)
        return None, P.MISS

    def _choose(self):
        self.entry, decision = self._match(time.time())
        return decision

    def _wait_for_lock(self):
        deadline = time.monotonic() + self.cache.cfg.lock_timeout
        while True:
            self.lock = self.store.try_lock(self.key)
            if self.lock is not None:
                break
            if time.monotonic() >= deadline:
                return          # go upstream without it (nginx does the same)
            time.sleep(LOCK_POLL)      # a greenlet switch under gevent
        if self._choose() == P.FRESH and self._open():   # the holder stored it meanwhile
            self.release()
            self.answer = P.FRESH

    def _refreshed(self):
        """True when the entry this request matches is fresh now (another
        request, in any worker, refreshed it since ``look``); leaves the
        chosen entry as it is."""
        return self._match(time.time())[1] == P.FRESH

    def _open(self):
        """Open the chosen entry's body now, so that a hit never promises a
        body that eviction took away meanwhile (cachestore Rule 2)."""
        self.file = self.store.open_body(self.entry)
        return self.file is not None

    def release(self):
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # -- answering from the store ----------------------------------------------

    def serve(self, start_response, send):
        """Answer from the store; ``send`` (as for ``forward``) is used by a
        background revalidation."""
        ex = self.ex
        if self.answer == "gateway_timeout":
            raise errors.NotCached()
        ex.cache_status = self.status = {P.FRESH: "HIT", P.STALE: "STALE",
                                         P.UPDATING: "UPDATING"}[self.answer]
        if self.file is None and not self._open():
            raise errors.CacheEntryGone()
        if self.answer == P.UPDATING:
            self._revalidate_in_background(send)
        now = time.time()
        try:
            self.store.touch(self.entry, now)
        except _STORE_ERRORS as e:
            _store_failed("touch", e)
        served = Served(self.entry.record, self.req, self.status, now)
        body = served.body(ex.method, self.store, self.entry, self.file)
        self.file = None
        return Hit(self.cache.recorder, ex, served, body, start_response)

    def _revalidate_in_background(self, send):
        lock = self.store.try_lock(self.key)
        if lock is None:
            return      # somebody is already at it
        if self._refreshed():
            lock.close()    # ... and was done between this lookup and the lock
            return
        bg = copy.copy(self)    # its own state: this request is being served meanwhile
        bg.ex, bg.file = copy.copy(self.ex), None
        t = threading.Thread(target=_background_revalidation, name="cache_revalidate",
                             args=(bg, lock, send), daemon=True)
        t.start()

    # -- going upstream --------------------------------------------------------

    def forward(self, send):
        """(attempt, the upstream response to relay wrapped for the cache);
        None when the request is to be answered from the store (``serve``)."""
        if self.answer:
            return None
        fields = self.fields
        if self.entry is not None and self.status == "EXPIRED":
            fields = [f for f in fields if f[0].lower() not in _CONDITIONAL and f[0].lower() != "range"]
            fields += P.conditional_fields(self.entry.record)
        self.request_time = time.time()
        try:
            attempt, resp = send(fields)
        except errors.ProxyError:
            self.release()
            if self.entry is None or not P.usable_on_error(self.entry.record, time.time(), self.rules):
                raise
            self.answer = P.STALE       # RFC 5861 4: stale-if-error
            return None
        try:
            return attempt, self._received(resp)
        except _STORE_ERRORS as e:
            _store_failed("store", e)
            self.release()
            return attempt, Relayed(resp, "BYPASS", None, self)

    def _received(self, resp):
        ex, now = self.ex, time.time()
        if ex.method not in ("GET", "HEAD"):
            if P.invalidates(ex.method, resp.status):
                self._invalidate(resp.headers)
            return Relayed(resp, self.status, None, self)
        entry = self.entry
        if entry is not None and resp.status == 304 and self.status == "EXPIRED":
            if P.same_validator(entry.record, resp.headers):
                record = P.freshen(entry.record, resp.headers, self.request_time, now)
                self.store.update(entry, record)
                self.release()
                ex.cache_status = self.status = "REVALIDATED"
                return FromStore(self, record, resp, now)
        if entry is not None and resp.status >= 500 and P.usable_on_error(entry.record, now, self.rules):
            ex.cache_status = self.status = "STALE"
            return FromStore(self, entry.record, resp, now)
        writer = self._writer(resp, now)
        if writer is None:
            self.release()
        return Relayed(resp, self.status, writer, self)

    def _writer(self, resp, now):
        if not self.storing or self.route.cache is None:
            return None
        why = P.storable("GET", resp.status, self.req, resp.headers,
                         self.rules.default_ttl, self.rules.cdn)
        if why is not None:
            return None
        length = P.field(resp.headers, "content-length")
        if length is not None and length.isdigit() and int(length) > self.cache.cfg.max_object_size:
            return None
        vary = P.secondary_key(resp.headers, self.req)
        return self.store.writer(self.key, _skey(vary), self.url), vary

    def _invalidate(self, resp_fields):
        host = self.ex.host.lower()
        targets = [self.ex.target] + P.invalidated_targets(self.ex.host, resp_fields)
        for t in targets:
            self.store.purge(host + t)


def _skey(vary):
    return "\x00".join(f"{n}={v}" for n, v in vary)


# -- the response bodies -------------------------------------------------------

class Served:
    """How a stored response is sent: its status line, fields and the span
    of the body, given the request's fields ``req`` (304 to a client
    precondition that holds, 206 to a byte range, 4.3.2 and RFC 9110 14)."""

    __slots__ = ("status", "reason", "fields", "start", "length")

    def __init__(self, record, req, cache_status, now, plain=False):
        self.start, self.length = 0, None
        tail = [("Age", P.age_field(record, now)), ("X-Cache-Status", cache_status)]
        # plain: the request has no precondition and no range (REUSE_FIELDS)
        if not plain and P.not_modified(record, req):
            fields = P.not_modified_fields(record)
            self.status, self.reason, self.fields = 304, "Not Modified", fields + tail
            return
        self.status, self.reason = record["status"], record["reason"]
        size = record["size"]
        span = None if plain or "range" not in req else P.byte_range(record, req)
        if span is None:
            fields = _whole(record)
            if _has_body(self.status):
                self.length = size
        elif span is False:
            self.status, self.reason = 416, "Range Not Satisfiable"
            fields = [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
        else:
            first, last = span
            self.status, self.reason = 206, "Partial Content"
            self.start, self.length = first, last - first + 1
            fields = _end_to_end(record) + [("Content-Range", f"bytes {first}-{last}/{size}"),
                                            ("Content-Length", str(self.length))]
        self.fields = fields + tail

    def body(self, method, store, entry, f):
        """The span to send: bytes when the body is kept in memory
        (cachestore Rule 5), else ``f`` (or the entry's file, opened now)
        positioned at it; None when there is no body."""
        if method == "HEAD" or not self.length or entry.body is not None:
            if f is not None:
                f.close()
            if method == "HEAD" or not self.length:
                return None
            return entry.body[self.start:self.start + self.length]
        if f is None:
            f = store.open_body(entry)
        if f is not None and self.start:
            f.seek(self.start)
        return f


def _whole(record):
    """The fields of the whole stored response, Content-Length included
    (kept in the record, as ``_end_to_end``)."""
    fields = record.get("_whole")
    if fields is None:
        fields = _end_to_end(record)
        if _has_body(record["status"]):
            fields = fields + [("Content-Length", str(record["size"]))]
        fields = record["_whole"] = fields
    return fields


def _has_body(status):
    return status >= 200 and status not in (204, 304)


def _end_to_end(record):
    """The stored fields a stored response is served with, kept in the
    record ("_" keys are never stored): they are end-to-end already; the
    server writes Server (and the stored Date instead of its own: RFC 9110
    6.6.1)."""
    fields = record.get("_served")
    if fields is None:
        fields = record["_served"] = [(n, v) for n, v in record["fields"]
                                      if n.lower() not in _SERVED_DROP]
    return fields


def read_span(body, length):
    """The body (bytes, or a file read in large reads), at most ``length`` bytes."""
    if isinstance(body, bytes):
        if body:
            yield body
        return
    while body is not None and length > 0:
        piece = body.read(min(READ_SIZE, length))
        if not piece:
            return
        length -= len(piece)
        yield piece


class Hit:
    """A response served from the store without touching a backend; its
    ``close()`` writes the access log. A body kept in memory goes out with
    the head in one send (the server's rule 5)."""

    __slots__ = ("recorder", "ex", "body", "length")

    def __init__(self, recorder, ex, served, body, start_response):
        self.recorder, self.ex = recorder, ex
        ex.status = served.status
        self.body, self.length = body, served.length
        start_response(f"{served.status} {served.reason}", served.fields)

    def __iter__(self):
        body = self.body
        if isinstance(body, bytes):     # one piece: no generator to run
            self.ex.bytes_out += len(body)
            return iter((body,))
        return self._pieces()

    def _pieces(self):
        ex = self.ex
        for piece in read_span(self.body, self.length or 0):
            ex.bytes_out += len(piece)
            yield piece

    def close(self):
        if self.body is not None and not isinstance(self.body, bytes):
            self.body.close()
        self.recorder.record(self.ex)


class Relayed:
    """An upstream response relayed to the client, its body written to the
    store as it passes (when ``writer`` is given)."""

    __slots__ = ("resp", "status", "reason", "headers", "plan", "writer", "vary")

    def __init__(self, resp, cache_status, writer, plan):
        self.resp, self.plan = resp, plan
        self.status, self.reason = resp.status, resp.reason
        self.headers = resp.headers + [("X-Cache-Status", cache_status)]
        self.writer, self.vary = writer if writer else (None, None)

    @property
    def completed(self):
        return self.resp.completed

    @property
    def connect_time(self):
        return self.resp.connect_time

    def body(self):
        """The pieces as they arrive, written to the store on the way. The
        entry is committed before the client has the whole body (a client
        that asks again at once finds it): when the Content-Length is
        reached, or, chunked, by holding each piece until the next one
        arrives (or the body ends)."""
        length = P.field(self.resp.headers, "content-length")
        length = int(length) if length is not None and length.isdigit() else None
        held = None
        for piece in self.resp.body():
            if self.writer is not None:
                self._write(piece)
            if self.writer is not None and length is None:
                if held is not None:
                    yield held
                held = piece
                continue
            if held is not None:        # the writer went away (too large): flush
                yield held
                held = None
            if self.writer is not None and self.writer.size == length:
                self._finish()          # complete by its length
            yield piece
        if self.writer is not None and self.resp.completed:
            self._finish()
        if held is not None:
            yield held

    def _write(self, piece):
        try:
            self.writer.write(piece)
            if self.writer.size > self.plan.cache.cfg.max_object_size:
                self._abort()
        except _STORE_ERRORS as e:
            _store_failed("write", e)
            self._abort()

    def _finish(self):
        w, plan, resp = self.writer, self.plan, self.resp
        length = P.field(resp.headers, "content-length")
        if length is not None and length.isdigit() and int(length) != w.size:
            return self._abort()
        record = P.stored(resp.status, resp.reason, resp.headers, plan.request_time,
                          time.time(), w.size, self.vary)
        try:
            w.finish(record, time.time())
            self.writer = None
        except _STORE_ERRORS as e:
            _store_failed("commit", e)
            self._abort()
        plan.release()

    def _abort(self):
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def discard(self):
        self._abort()     # a body that did not finish is never indexed
        self.plan.release()

    def close(self):
        self.discard()
        self.resp.close()


class FromStore:
    """The stored response sent in place of an upstream one (after a 304,
    or stale on a 5xx); looks like a transport response to the proxy."""

    __slots__ = ("plan", "upstream", "status", "reason", "headers",
                 "completed", "connect_time", "file", "length")

    def __init__(self, plan, record, upstream, now):
        self.plan, self.upstream = plan, upstream
        self.connect_time = upstream.connect_time
        self.completed = False
        served = Served(record, plan.req, plan.status, now)
        self.status, self.reason, self.headers = served.status, served.reason, served.fields
        self.file, self.length = served.body(plan.ex.method, plan.store, plan.entry, plan.file), served.length
        plan.file = None

    def body(self):
        for _ in self.upstream.body():      # read to its end: the connection stays reusable
            pass
        yield from read_span(self.file, self.length or 0)
        self.completed = True

    def discard(self):
        if self.file is not None and not isinstance(self.file, bytes):
            self.file.close()
        self.plan.release()

    def close(self):
        self.discard()
        self.upstream.close()


def _background_revalidation(plan, lock, send):
    """RFC 5861 3: refresh a stale entry after it was served, as a request
    of its own (its own Exchange, logged when it ends)."""
    plan.lock, plan.answer, plan.status, plan.storing = lock, None, "EXPIRED", True
    plan.fields = [f for f in plan.fields if f[0].lower() not in ("cache-control", "pragma")]
    plan.req = P.index(plan.fields)
    plan.ex.cache_status = "UPDATING"
    streamer = None
    try:
        sent = plan.forward(lambda f: send(f, plan.ex, None))
        if sent is None:
            return      # the upstream failed and the entry stays as it is
        streamer = exchange.Streamer(plan.cache.recorder, plan.ex, *sent)
        plan.ex.status = sent[1].status
        for _ in streamer:
            pass
    except (errors.ProxyError, OSError) as e:
        log.warning("cache: background revalidation of %s failed: %s", plan.url, e)
    finally:
        if streamer is not None:
            streamer.close()
        plan.release()


def _store_failed(what, e):
    log.error("cache: %s failed: %r", what, e, extra={"fields": {"event": "cache_store_failed",
                                                               "step": what}})


# -- administration: the admin endpoint (in the supervisor) and ``gproxy cache``
#
#    GET  /cache                                   JSON: entries, bytes, max_size
#    POST /cache/purge?url=http://host/path?q      that URL (every variant)
#    POST /cache/purge?prefix=http://host/path/    every URL that starts so
#
# The store is on disk and shared, so acting on it here acts for every worker.

_admin_lock = threading.Lock()      # the admin server is threaded; one connection
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
    with _admin_lock:
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
    with _admin_lock:
        n = store(cfg).purge(where, prefix=kind == "prefix")
    log.warning("admin: %s purged %d cache entries for %s %s", client, n, kind, url)
    return 200, {"purged": n, kind: url}
