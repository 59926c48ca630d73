"""Upgrade (WebSocket) pass-through on reverse routes.

    route -> the request goes through the same exchange as any other
          -> 101: relay its head, then splice both ways (``tunnel``)
          -> anything else: relay it as a normal response

Only the protocols in ``tunnel.upgrade_protocols`` (default ``websocket``)
are passed on; any other ``Upgrade`` is dropped as the hop-by-hop field it
is and the request is proxied normally, so a client cannot open, say, an
``h2c`` channel past the proxy's routing (golang/go#80416).
"""

from . import errors, exchange, headers as H, tunnel


class Upgrades:
    def __init__(self, recorder, tunnel_cfg):
        self.recorder = recorder
        self.cfg = tunnel_cfg
        self.protocols = frozenset(tunnel_cfg.upgrade_protocols)

    def requested(self, environ):
        """RFC 9110 7.8: Upgrade counts only with the "upgrade" connection option."""
        value = environ.get("HTTP_UPGRADE")
        if not value or "upgrade" not in H.connection_tokens([environ.get("HTTP_CONNECTION", "")]):
            return False
        names = [p.strip().split("/", 1)[0].lower() for p in value.split(",") if p.strip()]
        return bool(names) and all(n in self.protocols for n in names)

    def relay(self, request, start_response, ex, up, target, fields, body, key):
        if body is not None:
            raise errors.BadRequest("an Upgrade request must not have a body")
        upgrade = next(v for n, v in request.fields if n.lower() == "upgrade")
        fields = fields + [("Connection", "Upgrade"), ("Upgrade", upgrade)]
        attempt, resp = exchange.send(self.recorder, ex, up, key, target, fields, None)
        if resp.status != 101:
            return exchange.respond(self.recorder, ex, attempt, resp, start_response)
        ex.status = 101
        head = _head(resp)
        sock, rest = resp.detach()
        try:
            return tunnel.carry(self.recorder, ex, request, sock, head, self.cfg, to_client=rest)
        finally:
            attempt.finish(completed=True)


def _head(resp):
    """The 101 head as relayed to the client: the backend's fields, with
    Connection and Upgrade (hop-by-hop, but they are the switch itself)."""
    lines = [f"HTTP/1.1 101 {resp.reason or 'Switching Protocols'}"]
    lines += [f"{n}: {v}" for n, v in resp.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
