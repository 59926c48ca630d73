"""The forward proxy: absolute-form requests and CONNECT tunnels.

    environ -> admit (client, auth, target, ports, hosts, Via loop)
            -> resolve once -> private/self checks on the addresses
            -> absolute-form: forward through pooled connections, stream back
               CONNECT: dial the checked address, 200, splice both ways

Called by ``ProxyApp`` for CONNECT and the absolute-form requests that are
not for a route's host. The decisions are ``acl`` (pure); the I/O is
``exchange`` (the same attempts and streaming as the reverse proxy),
``tunnel`` (sockets) and ``htpasswd``. Refusals are 403 with a short reason,
logged in the access log (``error``) and the error log.
"""

import ipaddress
import logging
import socket

from . import acl, config as C, errors, exchange, headers as H, netaddr, tunnel
from .transport import Transport

log = logging.getLogger("gproxy.error")

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"    # as Squid
# Request fields never passed on: hop-by-hop (Proxy-Authorization among
# them) and Expect, which the server answers itself.
REQUEST_DROP = H.HOP_BY_HOP | {"expect", "host"}     # Host: set from the target


class Destinations(exchange.BackendSet):
    """The addresses one destination resolved to, tried in order (only the
    ones checked by the ACLs): the forward proxy's ``BackendSet``. Origins
    are not balanced and have no passive health; a failure is logged and
    counted in the metrics like an upstream's."""

    name = "forward"

    def __init__(self, dest, addresses, transport):
        self.backends = [_backend(ip, dest) for ip in addresses]
        self.transport = transport
        self.inflight = [0] * len(self.backends)

    def attempts(self, key, ex, fields):
        for i, b in enumerate(self.backends):
            ex.backend, ex.retries = b.name, i
            yield i

    def started(self, i):
        self.inflight[i] += 1

    def finished(self, i):
        self.inflight[i] -= 1


class ForwardProxy:
    def __init__(self, recorder, config):
        self.recorder = recorder
        self.cfg = cfg = config.forward_proxy
        self.tunnel_cfg = config.tunnel
        self.auth = None
        if cfg.enabled and cfg.auth is not None:
            from .htpasswd import Htpasswd     # libpass only where auth is used
            self.auth = Htpasswd(cfg.auth.htpasswd)
        self.listeners = _listeners(config.listen)
        port = self.listeners[0][1] if self.listeners else 0
        self.via_name = cfg.via_name or f"{socket.gethostname()}:{port}"
        self.pool_cfg = C.Upstream(
            name="forward", backends=(), timeouts=cfg.timeouts,
            pool=C.Pool(max_idle_per_backend=cfg.pool.max_idle_per_destination),
            retries=0, preserve_host=True)
        self._transport = None

    @property
    def transport(self):
        """One Transport whose per-destination pools live in a bounded LRU
        (``forward_proxy.pool``); made after fork."""
        if self._transport is None:
            self._transport = Transport(self.pool_cfg, pools=self.cfg.pool.max_destinations)
        return self._transport

    def __call__(self, request, start_response, ex):
        ex.route = "forward"
        connect = ex.method == "CONNECT"
        try:
            dest, addresses = self.admit(request, ex, connect)
            if connect:
                return self.connect(request, ex, dest, addresses)
            return self.forward(request, start_response, ex, dest, addresses)
        except acl.Refusal as r:
            return self.refuse(r, ex, start_response)
        except errors.ProxyError as e:
            return exchange.fail(self.recorder, e, ex, start_response)

    # -- admit: every check before any byte goes anywhere ---------------------

    def admit(self, request, ex, connect):
        cfg = self.cfg
        if not cfg.enabled:
            raise acl.Refusal("forward_disabled", "forward proxying is not enabled")
        acl.check_client(ex.client, cfg.allow_clients)
        if self.auth is not None and self.auth.user(_field(request, "proxy-authorization")) is None:
            e = errors.ProxyAuthRequired()
            e.headers = (("Proxy-Authenticate", f'Basic realm="{cfg.auth.realm}", charset="UTF-8"'),)
            raise e
        dest = acl.parse_connect(ex.target) if connect else acl.parse_absolute(ex.target)
        ex.backend = dest.name
        acl.check_destination(dest, cfg, connect)
        if cfg.via and acl.via_loop([_field(request, "via") or ""], self.via_name):
            raise acl.Refusal("loop", "the request already passed through this proxy (Via)")
        addresses = resolve(dest)
        acl.check_addresses(dest, addresses, cfg)
        acl.check_not_self(addresses, dest.port, self.own_addresses(request))
        return dest, addresses

    def own_addresses(self, request):
        own = list(self.listeners)
        try:
            ip, port = request.local_address()[:2]
            own.append((netaddr.unmapped(ipaddress.ip_address(ip.split("%", 1)[0])), port))
        except (OSError, ValueError, TypeError):
            pass    # not a TCP socket (unix:): the listeners are all we know
        return own

    # -- absolute-form --------------------------------------------------------

    def forward(self, request, start_response, ex, dest, addresses):
        body = exchange.request_body(request, self.cfg.max_body, ex)
        fields = self.request_headers(request, ex, dest)
        dests = Destinations(dest, addresses, self.transport)
        attempt, resp = exchange.send(self.recorder, ex, dests, None, dest.target, fields, body)
        via = (("Via", f"{_version(ex)} {self.via_name}"),) if self.cfg.via else ()
        return exchange.respond(self.recorder, ex, attempt, resp, start_response, via)

    def request_headers(self, request, ex, dest):
        """The request fields for the origin, a list of (name, value) pairs."""
        # RFC 9112 3.2.2: a proxy replaces Host with the target's authority.
        out = [("Host", dest.authority)] + H.strip_hop_by_hop(request.fields, REQUEST_DROP)
        if self.cfg.via:
            out.append(("Via", f"{_version(ex)} {self.via_name}"))
        if self.cfg.x_forwarded_for:
            out.append(("X-Forwarded-For", H.forwarded_for(_field(request, "x-forwarded-for"),
                                                          ex.client, True)))
        return out

    # -- CONNECT --------------------------------------------------------------

    def connect(self, request, ex, dest, addresses):
        upstream = tunnel.dial(addresses, dest.port, self.cfg.timeouts.connect)
        ex.status = 200
        return tunnel.carry(self.recorder, ex, request, upstream, ESTABLISHED, self.tunnel_cfg)

    # -- refusals ---------------------------------------------------------------

    def refuse(self, r, ex, start_response):
        log.warning("forward proxy refused %s: client=%s %s %s: %s",
                    r.reason, ex.client, ex.method, ex.target, r.detail)
        ex.error = r.reason
        e = errors.Forbidden(r.detail)
        e.body = f"Forbidden: {r.detail}"
        return exchange.fail(self.recorder, e, ex, start_response)


def _field(request, name):
    """The first value of the request field ``name`` (lower case), or None."""
    for n, v in request.fields:
        if n.lower() == name:
            return v
    return None


def resolve(dest):
    """Every address of ``dest.host``, resolved once (the checked addresses
    are the ones connected to)."""
    try:
        return [ipaddress.ip_address(dest.host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise errors.DnsError(f"{dest.host}: {e}") from e
    out = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    if not out:
        raise errors.DnsError(f"{dest.host}: no address")
    return out


def _backend(ip, dest):
    host = str(ip)
    hostport = netaddr.join(host, dest.port)
    return C.Backend(url=f"http://{hostport}", scheme="http", host=host, port=dest.port,
                     name=hostport)


def _version(ex):
    return ex.protocol.partition("/")[2] or "1.1"


def _listeners(listen):
    """(ip, port) of each TCP listener; ip None for a wildcard or a name."""
    out = []
    for addr in listen:
        if addr.startswith("unix:"):
            continue
        host, port = netaddr.split(addr)
        ip = netaddr.address(host)
        out.append((None if ip is None or ip.is_unspecified else ip, port))
    return out
