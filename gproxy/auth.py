"""Client authentication on routes: API keys, HTTP Basic, JWT.

An adapter (it reads the htpasswd file and runs PyJWT and libpass); the
configuration, key files included, was read and checked by ``config``.

Rule 1: a route may accept several methods (``METHODS``); each says whether
        the request carries its kind of credential and verifies it. The first
        that verifies gives the consumer. A request with no credential of any
        kind gets every method's challenge (RFC 9110 11.6.1: one
        ``WWW-Authenticate`` per scheme); a wrong one gets the failing
        method's challenge and reason.
Rule 2: API keys are looked up by their SHA-256 digest, never compared in
        clear: the file holds digests only, and a timing difference in the
        lookup tells an attacker about a digest, which it cannot steer
        (passlib and PyJWT compare in constant time for Basic and HMAC).
Rule 3: the credential never reaches a log line, a metric or, unless
        ``forward_credential``, the backend: every header a method reads is
        dropped. A client's own ``X-Consumer`` is always dropped, so the
        backend can trust the one gproxy adds.
Rule 4: files are read when the worker starts; a HUP (new workers) reads the
        new ones. A file that became unusable since the config was checked
        makes the route answer 500 (nginx does for an unreadable
        auth_basic_user_file) and is logged; it never stops the worker.
"""

import hashlib
import logging
import re

import jwt

from . import errors
from .errors import ConfigError

log = logging.getLogger("gproxy.error")

_CONSUMER = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,255}$")    # printable, fits a header


class Refused(Exception):
    """A credential that did not verify; ``reason`` goes to the access log."""

    def __init__(self, reason, error=None):
        super().__init__(reason)
        self.reason = reason
        self.error = error      # RFC 6750 3.1 error code for a Bearer challenge


def _bearer(headers):
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ApiKeys:
    """``X-Api-Key: KEY`` or ``Authorization: Bearer KEY``."""
    scheme = "Bearer"

    def __init__(self, cfg, realm):
        self.keys = cfg.keys
        self.header = cfg.header.lower()
        self.reads = (self.header, "authorization")
        self.realm = realm

    def credential(self, headers):
        return headers.get(self.header) or _bearer(headers)

    def verify(self, key):
        consumer = self.keys.get(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest())
        if consumer is None:
            raise Refused("bad_api_key", "invalid_token")
        return consumer

    def challenge(self, refused=None):
        return _bearer_challenge(self.realm, refused)


class Basic:
    """``Authorization: Basic`` against an htpasswd file (htpasswd.py, also
    the forward proxy's)."""
    scheme = "Basic"
    reads = ("authorization",)

    def __init__(self, cfg, realm):
        from .htpasswd import Htpasswd
        self.file = Htpasswd(cfg.htpasswd)
        self.realm = cfg.realm or realm

    def credential(self, headers):
        value = headers.get("authorization", "")
        return value if value[:6].lower() == "basic " else None

    def verify(self, value):
        user = self.file.user(value)
        if user is None:
            raise Refused("bad_password")
        return user

    def challenge(self, refused=None):
        return f'Basic realm="{self.realm}", charset="UTF-8"'     # RFC 7617 2.1


# PyJWT's errors, most specific first, as access-log reasons.
JWT_REASONS = (
    (jwt.ExpiredSignatureError, "token_expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid"),
    (jwt.InvalidAudienceError, "token_audience"),
    (jwt.InvalidIssuerError, "token_issuer"),
    (jwt.MissingRequiredClaimError, "token_claim_missing"),
    (jwt.InvalidSignatureError, "token_signature"),
    (jwt.InvalidAlgorithmError, "token_algorithm"),
    (jwt.DecodeError, "token_malformed"),
    (jwt.PyJWTError, "token_invalid"),
)


class Jwt:
    """``Authorization: Bearer <JWT>``: signature, exp, nbf, iss, aud; the
    consumer is ``sub``."""
    scheme = "Bearer"
    reads = ("authorization",)

    def __init__(self, cfg, realm):
        self.cfg = cfg
        self.realm = realm
        self.options = {"require": ["exp", "sub"] + (["iss"] if cfg.issuer else [])
                        + (["aud"] if cfg.audience else [])}
        self.jwks = None
        if cfg.jwks is not None:
            try:
                self.jwks = {k.key_id: k for k in jwt.PyJWKSet.from_json(cfg.jwks).keys}
            except jwt.PyJWKSetError as e:
                raise ConfigError(f"jwks_file: {e}") from None
        self.key = cfg.secret or cfg.public_key

    def credential(self, headers):
        return _bearer(headers)

    def verify(self, token):
        try:
            claims = jwt.decode(token, self._key(token), algorithms=list(self.cfg.algorithms),
                                audience=list(self.cfg.audience) or None, issuer=self.cfg.issuer,
                                leeway=self.cfg.leeway, options=self.options)
        except jwt.PyJWTError as e:
            raise Refused(next(r for cls, r in JWT_REASONS if isinstance(e, cls)),
                          "invalid_token") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _CONSUMER.match(sub):
            raise Refused("token_subject", "invalid_token")
        return sub

    def _key(self, token):
        if self.jwks is None:
            return self.key
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None and len(self.jwks) == 1:
            return next(iter(self.jwks.values()))
        key = self.jwks.get(kid)
        if key is None:
            raise jwt.InvalidSignatureError("no key with this kid")
        return key

    def challenge(self, refused=None):
        return _bearer_challenge(self.realm, refused)


def _bearer_challenge(realm, refused):
    # RFC 6750 3: no error code when the request had no credential at all.
    if refused is None or refused.error is None:
        return f'Bearer realm="{realm}"'
    return f'Bearer realm="{realm}", error="{refused.error}"'


METHODS = {"api_keys": ApiKeys, "basic": Basic, "jwt": Jwt}


class RouteAuth:
    """The authentication of one route."""

    def __init__(self, cfg, route_name, quiet=False):
        self.cfg = cfg
        self.broken = None
        try:
            self.methods = [cls(getattr(cfg, key), cfg.realm) for key, cls in METHODS.items()
                            if getattr(cfg, key) is not None]
        except ConfigError as e:
            if not quiet:
                log.error("route %s: authentication unavailable, answering 500: %s", route_name, e)
            self.methods, self.broken = [], str(e)
        reads = {n for m in self.methods for n in m.reads}
        self.drop = frozenset(() if cfg.forward_credential else reads) | {cfg.consumer_header.lower()}
        self.consumer_header = cfg.consumer_header

    def authenticate(self, headers):
        """The consumer for the request's ``headers`` (lower-case name ->
        value), or raises Unauthorized / ConsumerForbidden with the reason in
        ``detail``."""
        if self.broken is not None:
            raise errors.AuthUnavailable("auth_unavailable")
        refused = None
        for m in self.methods:
            credential = m.credential(headers)
            if credential is None:
                continue
            try:
                consumer = m.verify(credential)
            except Refused as r:
                refused = (m, r)
                continue
            if self.cfg.consumers is not None and consumer not in self.cfg.consumers:
                raise errors.ConsumerForbidden("consumer_not_allowed")
            return consumer
        if refused is None:
            challenges = dict.fromkeys(m.challenge() for m in self.methods)   # one per scheme
            raise errors.Unauthorized("no_credential", headers=_challenges(challenges))
        m, r = refused
        raise errors.Unauthorized(r.reason, headers=_challenges([m.challenge(r)]))


def _challenges(values):
    return [("WWW-Authenticate", v) for v in values]

