"""Routing: which route serves a request. Pure; no I/O.

Rule 1: the host decides first, as nginx ``server_name``: an exact host beats
        the longest ``*.suffix``, which beats a route with no host.
Rule 2: among routes of that host, the longest ``path_prefix`` that matches
        the raw (still percent-encoded) path wins; ties go to the earlier route.
Rule 3: a route with ``methods`` matches only those methods.
No match is a 404 (``errors.NoRoute``), decided by the caller.
"""


HOSTS_KEPT = 1024       # distinct Host values whose split is remembered


def split_host(host_header):
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    if not host_header:
        return ""
    host = host_header.strip().lower()
    if host.endswith("]"):
        return host
    head, sep, port = host.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return head
    return host


class Router:
    def __init__(self, routes):
        self.exact = {}     # host -> [route]
        self.wildcard = []  # (suffix, [route]) longest suffix first
        self.anyhost = []
        self._hosts = {}    # Host header -> split_host of it: a few values repeat
        wild = {}
        for r in routes:
            if r.host is None:
                self.anyhost.append(r)
            elif r.host.startswith("*."):
                wild.setdefault(r.host[1:], []).append(r)  # ".example.com"
            else:
                self.exact.setdefault(split_host(r.host), []).append(r)
        self.wildcard = sorted(wild.items(), key=lambda kv: -len(kv[0]))

    def names_host(self, host):
        """True when a route is written for this host (exactly or by a
        ``*.suffix``); routes with no host do not count."""
        h = split_host(host)
        return h in self.exact or any(h.endswith(suffix) for suffix, _ in self.wildcard)

    def match(self, host, path, method):
        """The route for (Host header, raw path, method), or None."""
        h = self._hosts.get(host)
        if h is None:
            h = split_host(host)
            if len(self._hosts) < HOSTS_KEPT:
                self._hosts[host] = h
        groups = []
        if h in self.exact:
            groups.append(self.exact[h])
        for suffix, rs in self.wildcard:
            if h.endswith(suffix):
                groups.append(rs)
        groups.append(self.anyhost)
        for routes in groups:
            best = None
            for r in routes:
                if path.startswith(r.path_prefix) and (r.methods is None or method in r.methods):
                    if best is None or len(r.path_prefix) > len(best.path_prefix):
                        best = r
            if best is not None:
                return best
        return None


def upstream_target(route, raw_target):
    """The request target sent upstream: byte-exact, minus the prefix if stripped."""
    if not route.strip_prefix:
        return raw_target
    rest = raw_target[len(route.path_prefix):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest
