"""Proxy authentication: ``Proxy-Authorization: Basic`` against an htpasswd file.

An adapter: it reads the file and runs the hash checks. The formats are
those Apache's ``htpasswd`` writes (bcrypt ``$2y$``, ``$apr1$`` MD5,
``{SHA}``, crypt, SHA-256/512 crypt), verified by libpass, the maintained
fork of passlib (passlib 1.7.4 breaks on bcrypt >= 4.1), with the ``bcrypt``
package for bcrypt.

Rules:
1. A bcrypt check costs about 0.3 s of CPU at cost 12. It runs in gevent's
   thread pool (bcrypt releases the GIL), so it never stalls the worker's
   other connections.
2. A success is remembered for ``CACHE_TTL`` seconds, keyed by a digest of
   the header value, so a client's every request does not pay the hash
   (Squid's ``credentialsttl``). Failures are not cached.
3. The file is read when the worker starts; a HUP (new workers) re-reads it.
"""

import base64
import binascii
import hashlib
import time

import gevent
from passlib.apache import HtpasswdFile

from .errors import ConfigError

CACHE_TTL = 300.0       # seconds; Squid's credentialsttl is 2 h
CACHE_MAX = 10000       # entries; the oldest half is dropped when full


class Htpasswd:
    def __init__(self, path):
        try:
            self.file = HtpasswdFile(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot use as htpasswd: {e}") from None
        self.path = path
        self._ok = {}       # sha256(header value) -> (user, expiry)

    def user(self, header_value, now=None):
        """The user a ``Proxy-Authorization`` value proves, or None."""
        if not header_value:
            return None
        now = time.monotonic() if now is None else now
        key = hashlib.sha256(header_value.encode("latin-1", "replace")).digest()
        hit = self._ok.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        creds = _basic(header_value)
        if creds is None:
            return None
        user, password = creds
        ok = gevent.get_hub().threadpool.apply(self.file.check_password, (user, password))
        if not ok:
            return None
        if len(self._ok) >= CACHE_MAX:
            for k in list(self._ok)[:CACHE_MAX // 2]:
                del self._ok[k]
        self._ok[key] = (user, now + CACHE_TTL)
        return user


def _basic(value):
    """``Basic base64(user:password)`` -> (user, password) or None (RFC 7617)."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password
