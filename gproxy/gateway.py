"""The API gateway's admission step: authentication, then the rate limit.

``ProxyApp.admit`` calls ``Gate.admit(route, request, ex)`` once per request;
it returns when the request may go on, or raises a ProxyError that carries
its status and response fields (401, 403, 429, 503). A refused request never
reaches a backend: the handler has not chosen one yet.

Rule 1: authentication comes first, so ``key: consumer`` can use the
        consumer, and an unauthenticated flood cannot spend a consumer's
        quota.
Rule 2: on success the headers for the backend lose the credential (unless
        ``forward_credential``) and any client-sent consumer header, and gain
        the consumer's name: ``request.fields``, the list
        ``ProxyApp.upstream_headers`` forwards, is replaced by the edited one.
Rule 3: a key that is missing (``header:NAME`` absent) falls back to the
        client address, so leaving a header out never escapes a limit (Kong
        falls back the same way; nginx would not count such requests).
Rule 4: when the store fails, ``on_error`` decides: allow (the default, as
        Envoy's failure_mode_deny false) or deny (503).
"""

import logging

from . import errors, headers as H, ratelimit
from .ratestore import LocalStore, RedisStore

log = logging.getLogger("gproxy.error")


class RouteGate:
    def __init__(self, route, store, on_error_allow):
        self.auth = None
        if route.auth is not None:
            from .auth import RouteAuth     # PyJWT and cryptography: only where auth is used
            self.auth = RouteAuth(route.auth, route.name)
        rl = route.rate_limit
        self.limit = None
        if rl is not None:
            self.name = route.name
            self.policy = ratelimit.policy(rl.count, rl.period, rl.burst)
            # a change to any of these on HUP starts this route's buckets afresh
            self.policy_id = (f"{route.name}|{rl.count}/{rl.period}|{rl.burst}|"
                              f"{rl.key.kind}:{rl.key.name}").encode()
            self.limit = rl
            self.store = store
            self.header = rl.key.name.lower()
            self.on_error_allow = on_error_allow

    def admit(self, request, ex, client_ip):
        consumer = None
        if self.auth is not None:
            headers, kept = _split(request.fields, self.auth.drop)
            try:
                consumer = self.auth.authenticate(headers)
            except errors.ProxyError as e:
                ex.reason = e.detail
                raise
            ex.consumer = consumer
            kept.append((self.auth.consumer_header, consumer))
            request.fields = kept
        else:
            headers = {n.lower(): v for n, v in reversed(request.fields)}   # the first wins
        if self.limit is not None:
            self.check_rate(headers, ex, consumer, client_ip)

    def check_rate(self, headers, ex, consumer, client_ip):
        kind = self.limit.key.kind
        if kind == "route":
            key = b"r"
        elif kind == "consumer":
            key = b"c" + consumer.encode()
        else:
            value = headers.get(self.header) if kind == "header" else None
            key = (b"h" + value.encode("latin-1")) if value \
                else b"i" + client_ip(headers, ex).encode()
        d = self.store.decide(self.policy_id, self.policy, key)
        if d is None:                           # the store failed (logged, counted)
            ex.reason = "rate_limit_store_error"
            if self.on_error_allow:
                return
            raise errors.RateLimitUnavailable()
        if not d.allowed:
            ex.reason = "rate_limit"
            raise errors.TooManyRequests("rate_limit",
                                         headers=ratelimit.refusal_headers(self.name, self.policy, d))


def _split(fields, drop):
    """(lower-case name -> value, the first of repeated fields as nginx's
    ``$http_`` variables; the fields without those named in ``drop``), in
    one pass."""
    headers, kept = {}, []
    for f in fields:
        low = f[0].lower()
        if low not in headers:
            headers[low] = f[1]
        if low not in drop:
            kept.append(f)
    return headers, kept


class Gate:
    """Every route's gate, and the one rate-limit store of this worker."""

    def __init__(self, config, stats, is_trusted, directory):
        """``directory``: the arbiter's runtime directory (None: a table
        private to this process)."""
        limited = [r for r in config.routes if r.rate_limit is not None]
        store = None
        if limited:
            sc = config.rate_limit_store
            if sc.url is not None:
                store = RedisStore(sc, stats.rate_limit_store_error)
            else:
                store = _local_store(directory, _slots(sc.max_keys))
        allow = config.rate_limit_store.on_error == "allow"
        self.routes = {r.index: RouteGate(r, store, allow) for r in config.routes
                       if r.rate_limit is not None or r.auth is not None}
        self.is_trusted = is_trusted

    def admit(self, route, request, ex):
        gate = self.routes.get(route.index)
        if gate is not None:
            gate.admit(request, ex, self.client_ip)

    def client_ip(self, headers, ex):
        """The client address after trusted_proxies (as logged)."""
        return H.client_address(headers.get("x-forwarded-for"), ex.client, self.is_trusted)


def _local_store(directory, slots):
    """The table in the arbiter's runtime directory; one private to this
    worker when there is none or it cannot be used (limits then hold per
    worker: logged, never a worker that fails to boot)."""
    if directory is not None:
        try:
            return LocalStore(directory, slots)
        except OSError as e:
            log.error("rate-limit table in %s unusable (%s): limits hold per worker", directory, e)
    return LocalStore(None, slots)


def _slots(max_keys):
    """Twice the keys, a power of two: probing stays short at half load."""
    n = 16
    while n < 2 * max_keys:
        n *= 2
    return n
