"""Upgrade (WebSocket) pass-through on reverse routes.

    route -> choose a backend (the route's policy) -> send the upgrade request
          -> 101: relay it, then splice both ways (``tunnel``)
          -> anything else: relay it as a normal response

Only the protocols in ``tunnel.upgrade_protocols`` (default ``websocket``)
are passed on; any other ``Upgrade`` is dropped as the hop-by-hop field it
is and the request is proxied normally, so a client cannot open, say, an
``h2c`` channel past the proxy's routing (golang/go#80416).
"""

import ssl
import time

from . import errors, headers as H, proxy, tunnel


class Upgrades:
    def __init__(self, app, tunnel_cfg):
        self.app = app
        self.cfg = tunnel_cfg
        self.protocols = frozenset(tunnel_cfg.upgrade_protocols)

    def requested(self, environ):
        """RFC 9110 7.8: Upgrade counts only with the "upgrade" connection option."""
        value = environ.get("HTTP_UPGRADE")
        if not value or "upgrade" not in H.connection_tokens([environ.get("HTTP_CONNECTION", "")]):
            return False
        names = [p.strip().split("/", 1)[0].lower() for p in value.split(",") if p.strip()]
        return bool(names) and all(n in self.protocols for n in names)

    def relay(self, environ, start_response, ex, up, target, fields, body, key):
        if body is not None:
            raise errors.BadRequest("an Upgrade request must not have a body")
        fields = fields + [("Connection", "Upgrade"), ("Upgrade", environ["HTTP_UPGRADE"])]
        i, sock = self.dial(ex, up, fields, key)
        up.inflight[i] += 1
        t0 = time.monotonic()
        try:
            sock.sendall(_head(ex.method, target, fields))
            status, reason, headers, head, rest = tunnel.read_head(sock, up.cfg.timeouts.response_header)
        except errors.ProxyError as e:
            up.inflight[i] -= 1
            sock.close()
            up.failed(i)
            self.app.upstream_failed(ex, e, time.monotonic() - t0)
            raise
        except OSError as e:
            up.inflight[i] -= 1
            sock.close()
            up.failed(i)
            raise errors.UpstreamReset(f"sending the upgrade request: {e.strerror or e}") from e
        ex.upstream_time = time.monotonic() - t0
        ex.status = status
        if status != 101:
            resp = tunnel.RawResponse(sock, status, reason, headers, rest, ex.method,
                                      up.cfg.timeouts.idle)
            resp.index = i
            start_response(f"{status} {reason}", H.strip_hop_by_hop(headers, H.RESPONSE_DROP))
            return proxy.Streamer(self.app, ex, up, resp)
        up.succeeded(i)
        return self.splice(environ, ex, up, i, sock, head, rest)

    def dial(self, ex, up, fields, key):
        """A connected socket to a backend chosen by the route's policy; a
        backend that refuses is skipped (nothing was sent to it)."""
        last = None
        for i in up.attempts(key, ex, fields):
            backend = up.backends[i]
            try:
                sock = tunnel.dial([backend.host], backend.port, up.cfg.timeouts.connect)
                if backend.scheme == "https":
                    sock = _tls(sock, backend.host)
            except errors.ProxyError as e:
                up.failed(i, e.kind)
                self.app.upstream_failed(ex, e, 0.0)
                last = e
                continue
            return i, sock
        raise last or errors.NoBackend(f"no available backend in upstream {up.name}")

    def splice(self, environ, ex, up, i, sock, head, rest):
        try:
            return tunnel.carry(self.app, ex, environ, sock, head, self.cfg, to_client=rest)
        finally:
            up.inflight[i] -= 1


def _tls(sock, host):
    try:
        return ssl.create_default_context().wrap_socket(sock, server_hostname=host)
    except OSError as e:    # ssl.SSLError included
        sock.close()
        raise errors.UpstreamConnectError(f"TLS handshake with {host}: {e}") from e


def _head(method, target, fields):
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
