"""Addresses: CIDR lists and ``host:port``, one meaning for every check.

Rule 1: an IPv4-mapped IPv6 address is the IPv4 address it maps. A ``[::]``
        listener reports an IPv4 client as ``::ffff:127.0.0.1``; it matches
        ``127.0.0.1/32``, and a network written ``::ffff:10.0.0.0/104`` is
        ``10.0.0.0/8`` (RFC 4291 2.5.5.2). nginx's ``set_real_ip_from`` and
        ``allow`` do the same.
Rule 2: a zone index (``fe80::1%eth0``) is dropped before matching; what is
        not an IP address matches nothing.
Rule 3: ``host:port`` writes an IPv6 host in brackets (``[::1]:8080``, RFC
        3986 3.2.2) and reads only that form: ``::1:8080`` is refused, as
        gunicorn's bind would misread it.

Used by ``trusted_proxies``, the forward proxy's ``allow_clients`` and
``allow_private``, the admin allow list, and wherever an address is written
or read as ``host:port``. Pure functions; no I/O.
"""

import ipaddress

# The most addresses a Networks remembers; full, it starts over. X-Forwarded-For
# hops are client-chosen, so the cache must be bounded.
CACHE_MAX = 4096
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)


def unmapped(ip):
    """``::ffff:a.b.c.d`` -> ``a.b.c.d``; any other address as it is (Rule 1)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def address(text):
    """The address in ``text`` (Rules 1 and 2), or None when it is not one."""
    try:
        return unmapped(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def is_loopback(host):
    """``localhost``, ``127.0.0.0/8`` or ``::1``: a peer on this host."""
    ip = address(host)
    return host == "localhost" if ip is None else ip.is_loopback


def network(text):
    """``10.0.0.0/8``, ``10.1.2.3`` (a /32), ``::ffff:10.0.0.0/104`` (the IPv4
    ``10.0.0.0/8``); host bits are ignored. ValueError when not a network."""
    net = ipaddress.ip_network(text, strict=False)
    mapped = unmapped(net.network_address)
    if net.version == 6 and mapped is not net.network_address and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


class Networks(tuple):
    """A list of networks that answers ``match(addr)``; still a tuple of
    ``ipaddress`` networks, so it compares, hashes and iterates as one."""

    def __new__(cls, networks=()):
        return super().__new__(cls, (n if isinstance(n, _NETWORK_TYPES) else network(n)
                                     for n in networks))

    def __init__(self, networks=()):
        self._cache = {}

    def match(self, addr):
        """True when ``addr`` (text or an ``ipaddress`` address) is inside
        one of the networks (Rules 1 and 2)."""
        if not self:
            return False
        if not isinstance(addr, str):
            return self._match(unmapped(addr))
        hit = self._cache.get(addr)
        if hit is None:
            ip = address(addr)
            hit = ip is not None and self._match(ip)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[addr] = hit
        return hit

    def _match(self, ip):
        # ipaddress answers False across versions (IPv4 in an IPv6 network)
        return any(ip in net for net in self)


def join(host, port):
    """``host:port``; an IPv6 host in brackets (Rule 3)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split(text):
    """``host:port`` or ``[v6]:port`` -> (host without brackets, int port).
    ValueError, with the reason, for anything else (Rule 3)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPv6]:port")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {host!r}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("an IPv6 address is written in brackets, like [::1]:8080")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"not a port (1-65535): {port!r}")
    return host, int(port)
