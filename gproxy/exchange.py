"""One request's exchange with a set of backends, shared by every handler
(reverse proxy, forward proxy, Upgrade).

    Exchange     what is known about one request, for the logs and metrics
    BackendSet   the interface of "backends to send to": an upstream's pool
                 (``proxy.UpstreamState``) or the forward proxy's resolved
                 addresses (``forward.Destinations``)
    Attempt      one try of one backend: in-flight count, timing, success
                 or failure reporting; the single retry rule
    send         the attempts loop: try backends until one answers
    Streamer     the response body handed to the server; its close()
                 finishes the attempt and writes the record
    fail         an error answer (the status comes from the ProxyError)

Rule 1: the in-flight count of a backend goes up when an Attempt starts and
        down exactly once, when it ends (``Attempt.finish``), whatever the
        outcome; nothing else touches it.
Rule 2: a failed attempt is retried on another backend only if the request
        never reached the backend, or it is idempotent and has no body
        (nginx ``proxy_next_upstream error timeout``; POST is never sent
        twice), and never once any response byte reached the client.
Rule 3: a response whose body breaks off upstream is never completed: the
        server gets an OSError and resets the client connection.
"""

import abc
import errno
import logging
import sys
import time

from . import accesslog, errors, headers as H, observe
from .transport import BodySource

log = logging.getLogger("gproxy.error")

# RFC 9110 9.2.2; nginx never re-sends POST, LOCK or PATCH (1.9.13).
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))


class BackendSet(abc.ABC):
    """What the attempts loop needs of a set of backends (rule 1's counts,
    passive health). ``UpstreamState`` and ``forward.Destinations``
    implement it; tests/test_exchange.py checks both do, method by method."""

    name = ""            # for logs and metrics
    backends = ()        # config.Backend, by index
    transport = None     # transport.Transport

    @abc.abstractmethod
    def attempts(self, key, ex, fields):
        """Backend indexes to try, in order, each at most once."""

    def started(self, i):
        """An attempt on backend ``i`` begins (in flight)."""

    def finished(self, i):
        """That attempt ended (no longer in flight)."""

    def failed(self, i, kind):
        """Backend ``i`` failed (``kind`` as ``ProxyError.kind``)."""

    def succeeded(self, i):
        """Backend ``i`` answered and its body arrived whole."""

    def ejected(self, name):
        """True when backend ``name`` is out of rotation now."""
        return False


class Exchange:
    """What is known about one request, for the logs and metrics."""

    __slots__ = ("start", "method", "target", "protocol", "client", "host", "route",
                 "upstream", "backend", "status", "bytes_in", "bytes_out", "retries",
                 "request_id", "upstream_time", "error", "user_agent", "referer", "body",
                 "upstream_start", "connect_time", "consumer", "reason", "cache_status", "attempts")

    def __init__(self, environ):
        self.start = time.time()
        self.method = environ["REQUEST_METHOD"]
        self.target = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
        self.protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        self.client = environ.get("REMOTE_ADDR", "-")
        self.host = environ.get("HTTP_HOST", "")
        self.route = self.upstream = self.backend = None
        self.status = 0
        self.bytes_in = self.bytes_out = self.retries = 0
        self.request_id = ""
        self.upstream_time = None
        self.error = None
        self.user_agent = environ.get("HTTP_USER_AGENT", "")
        self.referer = environ.get("HTTP_REFERER", "")
        self.body = None
        self.upstream_start = None     # monotonic, when the answering attempt began
        self.connect_time = None       # seconds, when that attempt opened a connection
        self.consumer = self.reason = None     # the authenticated client; why refused
        self.cache_status = None       # X-Cache-Status on a cached route
        self.attempts = None           # the failed attempts (observe.attempt_failed)

    def record(self):
        """The access log's record: the fields of README "Access log", in
        that order. Filled into a copy of ``RECORD`` (a 23-key dict display
        cost a third more); the fields that are mostly None stay so."""
        if self.body is not None:
            self.bytes_in = self.body.nbytes
        r = RECORD.copy()
        r["time"] = self.start
        r["client"] = self.client
        r["method"] = self.method
        r["target"] = self.target
        r["protocol"] = self.protocol
        r["host"] = self.host
        r["status"] = self.status
        r["bytes_in"] = self.bytes_in
        r["bytes_out"] = self.bytes_out
        r["duration"] = observe.micro(time.time() - self.start)
        if self.upstream_time is not None:
            r["upstream_time"] = observe.micro(self.upstream_time)
        r["route"] = self.route
        r["upstream"] = self.upstream
        r["backend"] = self.backend
        r["retries"] = self.retries
        r["request_id"] = self.request_id
        r["user_agent"] = self.user_agent
        r["referer"] = self.referer
        if self.error is not None:
            r["error"] = self.error
        if self.consumer is not None or self.reason is not None:
            r["consumer"], r["reason"] = self.consumer, self.reason
        if self.cache_status is not None:
            r["cache_status"] = self.cache_status
        if self.upstream_start is not None or self.attempts:
            r["attempts"] = observe.attempts(self)
        return r


RECORD = dict.fromkeys((
    "time", "client", "method", "target", "protocol", "host", "status", "bytes_in", "bytes_out",
    "duration", "upstream_time", "route", "upstream", "backend", "retries", "request_id", "error",
    "user_agent", "referer", "consumer", "reason", "cache_status", "attempts"))


class Recorder:
    """Where finished exchanges go: the access log and the metrics."""

    def __init__(self, access_cfg, stats):
        self.format_access = accesslog.setup(access_cfg)
        self.stats = stats

    def record(self, ex, extra=None):
        if self.format_access is not None:
            rec = ex.record()
            if extra:
                rec.update(extra)
            accesslog.access(self.format_access(rec))
        self.stats.record(ex)

    def upstream_failed(self, ex, e, elapsed, ejected=False):
        ex.error = e.kind
        observe.attempt_failed(ex, e.kind, elapsed)
        log.warning("upstream %s: route=%s upstream=%s backend=%s after=%.3fs request_id=%s: %s",
                    e.kind, ex.route, ex.upstream, ex.backend, elapsed, ex.request_id, e,
                    extra={"fields": {"event": "upstream_failed", "kind": e.kind, "route": ex.route,
                                      "upstream": ex.upstream, "backend": ex.backend,
                                      "after": round(elapsed, 6), "request_id": ex.request_id}})
        self.stats.attempt_failed(ex.upstream, ex.backend, e.kind, ejected)


class Attempt:
    """One try of one backend (rules 1 and 2)."""

    __slots__ = ("ex", "backends", "i", "t0", "open", "recorder")

    def __init__(self, recorder, ex, backends, i):
        self.recorder, self.ex, self.backends, self.i = recorder, ex, backends, i
        self.t0 = time.monotonic()
        self.open = True
        backends.started(i)

    def failed(self, e):
        """The attempt failed before a response head: count it against the
        backend when it is to blame, log it, end the attempt."""
        ex = self.ex
        ex.upstream_time = time.monotonic() - self.t0
        self.finish()
        if e.backend_fault:
            self.backends.failed(self.i, e.kind)
            self.recorder.upstream_failed(ex, e, ex.upstream_time,
                                          self.backends.ejected(ex.backend))

    def answered(self, resp, fail_status=frozenset()):
        ex = self.ex
        ex.upstream_time = time.monotonic() - self.t0
        ex.upstream_start, ex.connect_time = self.t0, resp.connect_time
        if resp.status in fail_status:
            self.backends.failed(self.i, f"status_{resp.status}")   # counted, still relayed

    def broke(self, e):
        """The response body broke off upstream."""
        self.backends.failed(self.i, e.kind)
        self.recorder.upstream_failed(self.ex, e, time.time() - self.ex.start,
                                      self.backends.ejected(self.ex.backend))

    def finish(self, completed=False):
        if self.open:
            self.open = False
            self.backends.finished(self.i)
            if completed:
                self.backends.succeeded(self.i)

    @staticmethod
    def may_retry(e, body, replayable):
        """Rule 2, for a failed attempt whose error is ``e``."""
        return e.backend_fault and ((e.never_sent and not (body and body.started)) or replayable)


def send(recorder, ex, backends, key, target, fields, body, fail_status=frozenset()):
    """Send the request to the backends ``backends.attempts`` offers until one
    answers; return (Attempt, transport.Response), or raise the last
    ProxyError (NoBackend when there was no backend to try)."""
    method = ex.method
    replayable = body is None and method in IDEMPOTENT
    last = None
    for i in backends.attempts(key, ex, fields):
        attempt = Attempt(recorder, ex, backends, i)
        try:
            resp = backends.transport.send(backends.backends[i], method, target, fields, body,
                                           replayable)
        except errors.ProxyError as e:
            attempt.failed(e)
            if not Attempt.may_retry(e, body, replayable):
                raise
            last = e
            continue
        attempt.answered(resp, fail_status)
        return attempt, resp
    raise last or errors.NoBackend(f"no available backend in upstream {backends.name}")


class Streamer:
    """The response body iterable handed to the server. Its ``close()``
    (called by the server in every case) ends the attempt, returns the
    connection and writes the record."""

    __slots__ = ("recorder", "ex", "attempt", "resp")

    def __init__(self, recorder, ex, attempt, resp):
        self.recorder, self.ex, self.attempt, self.resp = recorder, ex, attempt, resp

    def __iter__(self):
        ex = self.ex
        try:
            for piece in self.resp.body():
                ex.bytes_out += len(piece)
                yield piece
        except errors.ProxyError as e:
            self.attempt.broke(e)
            # Rule 3: never complete a broken response (nginx closes the
            # connection); an OSError makes the server reset it.
            raise ConnectionResetError(errno.ECONNRESET, f"upstream {e.kind} mid-body") from e

    def release(self):
        self.resp.close()
        self.attempt.finish(self.resp.completed)

    def close(self):
        ex = self.ex
        self.release()
        if not self.resp.completed and ex.error is None:
            ex.status, ex.error = 499, "client_abort"   # the client went away
        self.recorder.record(ex)


class Finished:
    """A short body the proxy wrote itself (errors)."""

    __slots__ = ("recorder", "ex", "body")

    def __init__(self, recorder, ex, body):
        self.recorder, self.ex, self.body = recorder, ex, body

    def __iter__(self):
        yield self.body

    def close(self):
        self.recorder.record(self.ex)


def respond(recorder, ex, attempt, resp, start_response, extra_headers=()):
    """Relay the backend's answer: its status and fields (hop-by-hop ones
    dropped), then its body through a Streamer."""
    ex.status = resp.status
    streamer = Streamer(recorder, ex, attempt, resp)
    headers = H.strip_hop_by_hop(resp.headers, H.RESPONSE_DROP)
    if extra_headers:
        headers += extra_headers
    try:
        start_response(f"{resp.status} {resp.reason}", headers)
    except ValueError as e:     # the server refuses a header it cannot write (a control byte)
        streamer.release()
        return fail(recorder, errors.InvalidResponse(f"unwritable response header: {e}"),
                             ex, start_response, sys.exc_info())
    return streamer


def fail(recorder, e, ex, start_response, exc_info=None):
    """The error answer for ``e`` (its status, its short body, its extra
    headers), recorded when sent."""
    ex.status = e.status
    ex.error = ex.error or e.kind
    if isinstance(e, errors.ClientAbort):
        # Nothing can reach the client; answer 400 on the wire, log 499.
        status_line, body = "400 Bad Request", b""
    else:
        status_line, body = e.status_line, (e.body + "\n").encode() if e.body else b""
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    headers += e.headers
    start_response(status_line, headers, exc_info)
    ex.bytes_out = len(body)
    return Finished(recorder, ex, body)


def request_body(request, limit, ex):
    """The request body as a BodySource (or None); 413 when its
    Content-Length is over ``limit`` (checked again while it streams)."""
    if not request.has_body():
        return None
    n = request.content_length
    if limit is not None and n is not None and n > limit:
        raise errors.BodyTooLarge()
    ex.body = BodySource(request.body(), limit)
    return ex.body
