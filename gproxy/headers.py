"""Header rules, pure functions: hop-by-hop stripping and forwarding headers.

Rule 1: hop-by-hop fields (RFC 9110 7.6.1) and every field named in
        ``Connection`` are dropped in both directions; ``Proxy-Connection``
        (a de-facto hop-by-hop field) too.
Rule 2: ``X-Forwarded-For`` is extended only when the peer is trusted;
        otherwise an incoming one is discarded, so clients cannot spoof
        their address (golang/go#50465).
Rule 3: every other field passes unchanged, repeated fields stay repeated.
"""

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-authenticate",
    "proxy-authorization",
))

# Request fields the proxy itself sets or must not pass on.
#   host: set first in the upstream field list (the client's or the backend's)
#   expect: the server answers 100-continue to the client itself when the
#   body is read, and h1 does not wait for a backend's 100.
REQUEST_DROP = HOP_BY_HOP | {"host", "expect", "x-forwarded-for", "x-forwarded-proto",
                             "x-forwarded-host", "x-request-id"}

# Response fields the server writes itself: nginx also hides the upstream
# Date and Server.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}


def connection_tokens(values):
    """Lower-cased names listed in one or more ``Connection`` values."""
    tokens = set()
    for value in values:
        for token in value.split(","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def strip_hop_by_hop(fields, drop):
    """Yield (name, value) pairs not in ``drop`` nor named by ``Connection``.

    ``fields`` is a list of (name, value) pairs with names in any case.
    """
    out = []
    conn = None
    for field in fields:
        name = field[0].lower()
        if name in drop:
            if name == "connection" or name == "proxy-connection":
                conn = (conn or []) + [field[1]]
            continue
        out.append(field)
    if conn:
        listed = connection_tokens(conn)
        out = [f for f in out if f[0].lower() not in listed]
    return out


def forwarded_for(incoming, peer, peer_trusted):
    """The ``X-Forwarded-For`` value to send upstream (nginx's
    ``$proxy_add_x_forwarded_for``, but only for a trusted peer)."""
    if incoming and peer_trusted:
        return f"{incoming}, {peer}"
    return peer


def client_address(incoming_xff, peer, is_trusted):
    """The client's address: walk X-Forwarded-For from the right past trusted
    proxies (nginx ``real_ip_recursive on``)."""
    if not incoming_xff or not is_trusted(peer):
        return peer
    hops = [h.strip() for h in incoming_xff.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


def cookie(header, name):
    """The value of cookie ``name`` in a ``Cookie`` header value, or ""."""
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""
