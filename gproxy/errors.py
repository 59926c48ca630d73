"""Error vocabulary: every error that ends a request carries its HTTP status.

The handler has one ``except ProxyError``; the status, the short body and the
metric/log ``kind`` all come from the class, so there is no mapping ladder.
Statuses follow nginx (``ngx_http_upstream_next``) and HAProxy's wording.
"""


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file, line and key."""


class ProxyError(Exception):
    status = 502
    reason = "Bad Gateway"
    kind = "error"
    body = "The proxy could not complete the request."
    # A failure the backend is to blame for (counts toward passive health).
    backend_fault = False
    # True when the request certainly never reached the backend.
    never_sent = False
    # Extra response header fields of the error answer, e.g. a challenge.
    headers = ()

    def __init__(self, detail="", *, headers=None):
        super().__init__(detail or self.body)
        self.detail = detail
        if headers:
            self.headers = headers

    @property
    def status_line(self):
        return f"{self.status} {self.reason}"


class BadRequest(ProxyError):
    status, reason, kind = 400, "Bad Request", "bad_request"
    body = "Bad request."


class RequestTimeout(ProxyError):
    # nginx client_body_timeout: 408, and the connection is closed.
    status, reason, kind = 408, "Request Timeout", "client_timeout"
    body = "The request body did not arrive in time."


class NoRoute(ProxyError):
    status, reason, kind = 404, "Not Found", "no_route"
    body = "No route matches this request."


class BodyTooLarge(ProxyError):
    status, reason, kind = 413, "Content Too Large", "body_too_large"
    body = "The request body is larger than this route accepts."


class UnsupportedCoding(ProxyError):
    # RFC 9112 6.1: a server that does not understand a transfer coding answers 501.
    status, reason, kind = 501, "Not Implemented", "unsupported_coding"
    body = "Only the chunked transfer coding is supported."


class NoBackend(ProxyError):
    status, reason, kind = 503, "Service Unavailable", "no_backend"
    body = "No server is available to handle this request."  # HAProxy's wording


class UpstreamConnectError(ProxyError):
    status, reason, kind = 502, "Bad Gateway", "connect_error"
    body = "The upstream server refused or dropped the connection."
    backend_fault = True
    never_sent = True


class UpstreamTimeout(ProxyError):
    status, reason, kind = 504, "Gateway Timeout", "timeout"
    body = "The upstream server didn't respond in time."  # HAProxy's wording
    backend_fault = True


class UpstreamConnectTimeout(UpstreamTimeout):
    never_sent = True


class UpstreamReset(ProxyError):
    status, reason, kind = 502, "Bad Gateway", "reset"
    body = "The upstream server closed the connection without a complete response."
    backend_fault = True


class InvalidResponse(ProxyError):
    status, reason, kind = 502, "Bad Gateway", "invalid_response"
    body = "The server returned an invalid or incomplete response."  # HAProxy's wording
    backend_fault = True


class NotCached(ProxyError):
    # RFC 9111 5.2.1.7: only-if-cached and nothing usable stored
    status, reason, kind = 504, "Gateway Timeout", "not_cached"
    body = "The response is not in the cache."


class CacheEntryGone(ProxyError):
    # a stale entry that was to stand in for an upstream error was evicted meanwhile
    status, reason, kind = 502, "Bad Gateway", "cache_entry_gone"
    body = "The upstream server failed and no stored response could stand in."


class ClientAbort(ProxyError):
    # nginx logs 499 for a client that went away; nothing is sent to anyone.
    status, reason, kind = 499, "Client Closed Request", "client_abort"
    body = ""


class Forbidden(ProxyError):
    # Squid answers http_access denials with 403; so do the forward-proxy ACLs.
    status, reason, kind = 403, "Forbidden", "forbidden"
    body = "Access denied by the proxy's rules."


class ProxyAuthRequired(ProxyError):
    # RFC 9110 15.5.8; the forward proxy sets the Proxy-Authenticate challenge.
    status, reason, kind = 407, "Proxy Authentication Required", "proxy_auth"
    body = "Proxy authentication required."


class DnsError(ProxyError):
    # nginx answers 502 when a proxied name cannot be resolved.
    status, reason, kind = 502, "Bad Gateway", "dns_error"
    body = "The proxy could not resolve the destination host."


# --- the API gateway's refusals (gateway.py): never sent to a backend -----------

class Unauthorized(ProxyError):
    # RFC 9110 15.5.2: a 401 carries at least one WWW-Authenticate challenge.
    status, reason, kind = 401, "Unauthorized", "unauthorized"
    body = "Authentication required."


class ConsumerForbidden(ProxyError):
    # RFC 9110 15.5.4: authenticated, and still not allowed.
    status, reason, kind = 403, "Forbidden", "consumer_forbidden"
    body = "This consumer is not allowed on this route."


class TooManyRequests(ProxyError):
    # RFC 6585 4 (nginx limit_req answers 503 unless limit_req_status 429).
    status, reason, kind = 429, "Too Many Requests", "rate_limited"
    body = "Too many requests."


class RateLimitUnavailable(ProxyError):
    # rate_limit_store.on_error: deny, and the store did not answer.
    status, reason, kind = 503, "Service Unavailable", "rate_limit_store"
    body = "The rate limit cannot be checked now."


class AuthUnavailable(ProxyError):
    # nginx answers 500 when auth_basic_user_file cannot be read.
    status, reason, kind = 500, "Internal Server Error", "auth_unavailable"
    body = "Authentication is not available."
