"""Forward-proxy access control: pure decisions, no I/O.

Rule 1: never an open proxy. A request is refused unless every check
        passes: the client is in ``allow_clients``; the port is allowed for
        the method (``connect_ports`` for CONNECT, ``http_ports`` otherwise);
        the host matches no ``deny_hosts`` glob and, when ``allow_hosts`` is
        set, one of those; it is not addressed to this proxy.
Rule 2: names are matched as written, but the address check is done on what
        the name *resolved to* (once), and the proxy then connects to exactly
        that checked address: a name that resolves to 127.0.0.1 or
        10.0.0.5 cannot reach internal services (``block_private_destinations``),
        and a second resolution cannot swap the address in between.
Rule 3: every refusal is a ``Refusal`` with a short, loggable reason; the
        handler turns it into 403.

Target parsing lives here too, because the checks depend on it: CONNECT's
authority-form and the absolute-form are parsed from ``RAW_URI`` (gunicorn's
``PATH_INFO`` turns ``CONNECT localhost:443`` into ``443``).
"""

import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from . import errors, netaddr


@dataclass(frozen=True)
class Destination:
    host: str           # lower-case name or IP literal, no brackets, no trailing dot
    port: int
    target: str = ""    # origin-form path?query to send (absolute-form only)
    authority: str = ""     # host[:port] as for the Host header

    @property
    def name(self):
        return netaddr.join(self.host, self.port)


class Refusal(Exception):
    """An ACL said no; ``reason`` is a short token for logs (``denied_host``)."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")


def _host_port(authority, default_port):
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port) or BadRequest."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise errors.BadRequest("bad IPv6 literal in the request target")
        host, rest = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise errors.BadRequest("bad IPv6 literal in the request target") from None
        if rest and not rest.startswith(":"):
            raise errors.BadRequest("bad authority in the request target")
        port = rest[1:] if rest else ""
    else:
        host, sep, port = authority.partition(":")
        if sep and not port:
            raise errors.BadRequest("empty port in the request target")
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]    # "example.com." must not dodge deny_hosts
        if not _NAME.match(host):
            raise errors.BadRequest("bad host in the request target")
    if port == "":
        if default_port is None:
            raise errors.BadRequest("CONNECT needs host:port")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.BadRequest("bad port in the request target")
    return host, int(port)


def parse_connect(raw_uri):
    """``CONNECT host:port`` (RFC 9110 9.3.6: the authority-form only)."""
    host, port = _host_port(raw_uri, None)
    return Destination(host, port, authority=raw_uri)


def parse_absolute(raw_uri):
    """``http://host[:port]/path?q`` -> Destination with origin-form target.

    Only ``http``: a client that wants TLS to the origin uses CONNECT."""
    scheme, sep, rest = raw_uri.partition("://")
    if not sep:
        raise errors.BadRequest("the request target must be a path or an absolute http URI")
    if scheme.lower() != "http":
        raise errors.BadRequest(f"scheme {scheme!r} is not proxied; use CONNECT for https")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, target = rest[:cut], rest[cut:].split("#", 1)[0]
    if "@" in authority:
        raise errors.BadRequest("credentials in the request target are not accepted")
    host, port = _host_port(authority, 80)
    if not target.startswith("/"):
        target = "/" + target       # "http://h?q" and "http://h"
    return Destination(host, port, target, authority)


# --- the checks ---------------------------------------------------------------

def port_allowed(port, ranges):
    return any(lo <= port <= hi for lo, hi in ranges)


def check_client(addr, allow_clients):
    if netaddr.address(addr) is None:
        raise Refusal("client_denied", f"client {addr!r} is not an IP address")
    if not allow_clients.match(addr):
        raise Refusal("client_denied", f"client {addr} is not in allow_clients")


def check_destination(dest, cfg, connect):
    """Port and host-name rules (before any DNS lookup)."""
    ports = cfg.connect_ports if connect else cfg.http_ports
    if not port_allowed(dest.port, ports):
        key = "connect_ports" if connect else "http_ports"
        raise Refusal("denied_port", f"port {dest.port} is not in {key}")
    host = dest.host
    for glob in cfg.deny_hosts:
        if fnmatchcase(host, glob):
            raise Refusal("denied_host", f"{host} matches deny_hosts {glob!r}")
    if cfg.allow_hosts and not any(fnmatchcase(host, g) for g in cfg.allow_hosts):
        raise Refusal("denied_host", f"{host} matches no allow_hosts glob")


def via_loop(via_values, via_name):
    """True when one of the Via fields names this proxy (RFC 9110 7.6.3)."""
    for value in via_values:
        for hop in value.split(","):
            parts = hop.split()
            if len(parts) >= 2 and parts[1].lower() == via_name.lower():
                return True
    return False


# Checked in this order; the first match names the refusal.
PRIVATE_KINDS = (
    ("unspecified", lambda ip: ip.is_unspecified),
    ("loopback", lambda ip: ip.is_loopback),
    ("link-local", lambda ip: ip.is_link_local),
    ("multicast", lambda ip: ip.is_multicast),
    ("private", lambda ip: ip.is_private),
    ("non-global", lambda ip: not ip.is_global),    # 100.64/10, reserved, ...
)


def private_kind(ip):
    """The kind of non-public address ``ip`` is, or None for a public one."""
    ip = netaddr.unmapped(ip)
    for kind, test in PRIVATE_KINDS:
        if test(ip):
            return kind
    return None


def check_addresses(dest, addresses, cfg):
    """``addresses``: every address the host resolved to. One private
    address refuses the whole name (a DNS answer that mixes a public and an
    internal address must not reach the internal one on a retry)."""
    if not cfg.block_private_destinations:
        return
    for ip in addresses:
        kind = private_kind(ip)
        if kind is not None and not cfg.allow_private.match(ip):
            raise Refusal("private_destination",
                          f"{dest.host} resolves to {kind} address {ip}")


def check_not_self(addresses, port, own):
    """``own``: (ip or None for a wildcard listener, port) of this proxy's
    listening sockets and of the connection the request came in on."""
    for ip in addresses:
        ip = netaddr.unmapped(ip)
        for own_ip, own_port in own:
            if port == own_port and (ip == own_ip or (own_ip is None and ip.is_loopback)):
                raise Refusal("loop", f"{ip}:{port} is this proxy")
