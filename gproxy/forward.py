"""The forward proxy: absolute-form requests and CONNECT tunnels.

    environ -> admit (client, auth, target, ports, hosts, Via loop)
            -> resolve once -> private/self checks on the addresses
            -> absolute-form: forward through pooled connections, stream back
               CONNECT: dial the checked address, 200, splice both ways

Called by ``ProxyApp`` for every request whose target is not a path. The
decisions are ``acl`` (pure); the I/O is ``transport`` (pooled HTTP),
``tunnel`` (sockets) and ``htpasswd``. Refusals are 403 with a short reason,
logged in the access log (``error``) and the error log.
"""

import ipaddress
import logging
import socket
import time


from . import acl, config as C, errors, headers as H, proxy, tunnel
from .transport import Transport

log = logging.getLogger("gproxy.error")

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"    # as Squid
# Request fields never passed on: hop-by-hop (Proxy-Authorization among
# them) and Expect, which gunicorn has already answered.
REQUEST_DROP = H.HOP_BY_HOP | {"expect"}


class Destinations:
    """The forward proxy's stand-in for an ``UpstreamState``: destinations
    are not balanced and have no passive health, so only the counters the
    response ``Streamer`` keeps, and one Transport whose per-destination
    pools live in a bounded LRU (``forward_proxy.pool``)."""

    name = "forward"

    def __init__(self, cfg):
        self.cfg = C.Upstream(name="forward", backends=(), timeouts=cfg.timeouts,
                              pool=C.Pool(max_idle_per_backend=cfg.pool.max_idle_per_destination),
                              retries=0, preserve_host=True)
        self.max_destinations = cfg.pool.max_destinations
        self.inflight = [0]
        self._transport = None

    @property
    def transport(self):
        if self._transport is None:     # after fork
            self._transport = Transport(self.cfg, pools=self.max_destinations)
        return self._transport

    def failed(self, i):
        pass

    def succeeded(self, i):
        pass


class ForwardProxy:
    def __init__(self, app, config):
        self.app = app
        self.cfg = cfg = config.forward_proxy
        self.tunnel_cfg = config.tunnel
        self.auth = None
        if cfg.enabled and cfg.auth is not None:
            from .htpasswd import Htpasswd     # libpass only where auth is used
            self.auth = Htpasswd(cfg.auth.htpasswd)
        self.listeners = _listeners(config.listen)
        port = self.listeners[0][1] if self.listeners else 0
        self.via_name = cfg.via_name or f"{socket.gethostname()}:{port}"
        self.limits = C.Route(upstream="forward", max_body=cfg.max_body, name="forward")
        self.destinations = Destinations(cfg)

    @staticmethod
    def handles(ex):
        """Absolute-form and CONNECT are ours; origin-form (and ``*``) are not."""
        return ex.method == "CONNECT" or not (ex.target.startswith("/") or ex.target == "*")

    def __call__(self, environ, start_response, ex):
        ex.route = "forward"
        connect = ex.method == "CONNECT"
        try:
            dest, addresses = self.admit(environ, ex, connect)
            if connect:
                return self.connect(environ, ex, dest, addresses)
            return self.forward(environ, start_response, ex, dest, addresses)
        except acl.Refusal as r:
            return self.refuse(r, ex, start_response)
        except errors.ProxyAuthRequired:
            return self.challenge(environ, ex)
        except errors.ProxyError as e:
            return self.app.fail(e, ex, start_response)

    # -- admit: every check before any byte goes anywhere ---------------------

    def admit(self, environ, ex, connect):
        cfg = self.cfg
        if not cfg.enabled:
            raise acl.Refusal("forward_disabled", "forward proxying is not enabled")
        acl.check_client(ex.client, cfg.allow_clients)
        if self.auth is not None and self.auth.user(environ.get("HTTP_PROXY_AUTHORIZATION")) is None:
            raise errors.ProxyAuthRequired()
        dest = acl.parse_connect(ex.target) if connect else acl.parse_absolute(ex.target)
        ex.backend = dest.name
        acl.check_destination(dest, cfg, connect)
        if cfg.via and acl.via_loop([environ.get("HTTP_VIA", "")], self.via_name):
            raise acl.Refusal("loop", "the request already passed through this proxy (Via)")
        addresses = resolve(dest)
        acl.check_addresses(dest, addresses, cfg)
        acl.check_not_self(addresses, dest.port, self.own_addresses(environ))
        return dest, addresses

    def own_addresses(self, environ):
        own = list(self.listeners)
        try:
            ip, port = environ["gunicorn.socket"].getsockname()[:2]
            own.append((ipaddress.ip_address(ip.split("%", 1)[0]), port))
        except (KeyError, OSError, ValueError, TypeError):
            pass    # not a TCP socket (unix:): the listeners are all we know
        return own

    # -- absolute-form --------------------------------------------------------

    def forward(self, environ, start_response, ex, dest, addresses):
        body = self.app.admit(environ, self.limits, ex)
        fields = self.request_headers(environ, ex, dest)
        dests = self.destinations
        replayable = body is None and ex.method in proxy.IDEMPOTENT
        last = None
        for ip in addresses:
            backend = _backend(ip, dest)
            dests.inflight[0] += 1
            t0 = time.monotonic()
            try:
                resp = dests.transport.send(backend, ex.method, dest.target, fields, body, replayable)
            except errors.ProxyError as e:
                dests.inflight[0] -= 1
                ex.upstream_time = time.monotonic() - t0
                if not (e.never_sent and not (body and body.started)):
                    raise
                self.app.upstream_failed(ex, e, 0.0)
                last = e
                continue
            resp.index = 0
            ex.upstream_time = time.monotonic() - t0
            ex.status = resp.status
            out = H.strip_hop_by_hop(resp.headers, H.RESPONSE_DROP)
            if self.cfg.via:
                out.append(("Via", f"{_version(ex)} {self.via_name}"))
            start_response(f"{resp.status} {resp.reason}", out)
            return proxy.Streamer(self.app, ex, dests, resp)
        raise last

    def request_headers(self, environ, ex, dest):
        """The request fields for the origin, a list of (name, value) pairs."""
        raw = getattr(environ["wsgi.input"], "gproxy_headers", None)
        fields = [(H.title(n), v) for n, v in raw] if raw is not None \
            else proxy._environ_fields(environ)
        # RFC 9112 3.2.2: a proxy replaces Host with the target's authority.
        out = [("Host", dest.authority)]
        out += [(n, v) for n, v in H.strip_hop_by_hop(fields, REQUEST_DROP) if n != "Host"]
        if self.cfg.via:
            out.append(("Via", f"{_version(ex)} {self.via_name}"))
        if self.cfg.x_forwarded_for:
            out.append(("X-Forwarded-For", H.forwarded_for(environ.get("HTTP_X_FORWARDED_FOR"),
                                                          ex.client, True)))
        return out

    # -- CONNECT --------------------------------------------------------------

    def connect(self, environ, ex, dest, addresses):
        upstream = tunnel.dial(addresses, dest.port, self.cfg.timeouts.connect)
        ex.status = 200
        return tunnel.carry(self.app, ex, environ, upstream, ESTABLISHED, self.tunnel_cfg)

    # -- refusals ---------------------------------------------------------------

    def refuse(self, r, ex, start_response):
        log.warning("forward proxy refused %s: client=%s %s %s: %s",
                    r.reason, ex.client, ex.method, ex.target, r.detail)
        ex.error = r.reason
        e = errors.Forbidden(r.detail)
        e.body = f"Forbidden: {r.detail}"
        return self.app.fail(e, ex, start_response)

    def challenge(self, environ, ex):
        """407, written to the socket: gunicorn drops Proxy-Authenticate from
        start_response. The connection stays usable (gunicorn reads past the
        request body to the next request), except after CONNECT."""
        body = b"Proxy authentication required.\n"
        head = ("HTTP/1.1 407 Proxy Authentication Required\r\n"
                f'Proxy-Authenticate: Basic realm="{self.cfg.auth.realm}", charset="UTF-8"\r\n'
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if ex.method == "CONNECT" else "") + "\r\n")
        ex.status, ex.error, ex.bytes_out = 407, "proxy_auth", len(body)
        try:
            environ["gunicorn.socket"].sendall(head.encode("latin-1") + body)
        except OSError:
            ex.status = 499
        self.app.record(ex)
        return tunnel.ALREADY_HANDLED


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
    hostport = f"[{host}]:{dest.port}" if ip.version == 6 else f"{host}:{dest.port}"
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
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
            out.append((None if ip.is_unspecified else ip, int(port)))
        except ValueError:
            out.append((None, int(port)))
    return out
