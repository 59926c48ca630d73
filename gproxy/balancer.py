"""Balance policies: which backend of an upstream gets the next request. Pure.

Each policy is a small class with one ``choose(ok, key)``: ``ok(i)`` says
whether backend ``i`` may be used now (available and not already tried for
this request); ``key`` is the hash key (bytes) for ``consistent_hash``.
``choose`` returns an index, or ``None`` when nothing is usable.
Policies hold only their own bookkeeping; availability (health, ejection,
drain) lives with the caller, behind ``ok``, so every policy honours it alike.

Rule 1: ``round_robin`` is nginx's smooth weighted round robin.
Rule 2: ``least_conn`` picks the fewest in-flight requests relative to
        weight; ties are broken by the smooth round robin (as nginx).
Rule 3: ``random`` is the power of two choices (nginx ``random two
        least_conn``, Envoy's least-request).
Rule 4: ``consistent_hash`` is nginx ``hash $key consistent``: the same key
        lands on the same backend as under nginx, and removing one backend
        moves only the keys it owned. An empty key falls back to round robin.
"""

import random as _random
import struct
import zlib
from bisect import bisect_left


class RoundRobin:
    """nginx ``ngx_http_upstream_get_peer``: current += weight; pick the max;
    the chosen one pays the total."""

    def __init__(self, weights, inflight=None, rng=None):
        self.weights = list(weights)
        self.current = [0] * len(self.weights)

    def choose(self, ok, key=None):
        best = None
        total = 0
        current = self.current
        for i, w in enumerate(self.weights):
            if not ok(i):
                continue
            current[i] += w
            total += w
            if best is None or current[i] > current[best]:
                best = i
        if best is not None:
            current[best] -= total
        return best


class LeastConn:
    """Fewest in-flight requests per unit of weight; ties go round robin."""

    def __init__(self, weights, inflight, rng=None):
        self.weights = list(weights)
        self.inflight = inflight        # shared list, kept by the caller
        self.rr = RoundRobin(weights)

    def choose(self, ok, key=None):
        best = None
        ties = []
        for i, w in enumerate(self.weights):
            if not ok(i):
                continue
            load = self.inflight[i] / w
            if best is None or load < best:
                best, ties = load, [i]
            elif load == best:
                ties.append(i)
        if not ties:
            return None
        if len(ties) == 1:
            return ties[0]
        tie = set(ties)
        return self.rr.choose(lambda i: i in tie)


class Random:
    """Power of two choices: two random usable backends (by weight), the one
    with fewer in-flight requests wins."""

    def __init__(self, weights, inflight, rng=None):
        self.weights = list(weights)
        self.inflight = inflight
        self.rng = rng or _random.Random()

    def choose(self, ok, key=None):
        usable = [i for i in range(len(self.weights)) if ok(i)]
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        weights = [self.weights[i] for i in usable]
        a, b = self.rng.choices(usable, weights, k=2)
        if a == b:
            return a
        la, lb = self.inflight[a] / self.weights[a], self.inflight[b] / self.weights[b]
        return a if la <= lb else b


def _split_server(server):
    """nginx splits the server string at the last ':' followed only by digits."""
    if server.startswith("unix:"):
        return server.encode(), b""
    host, sep, port = server.rpartition(":")
    if sep and port.isdigit():
        return host.encode(), port.encode()
    return server.encode(), b""


def ketama_points(servers, weights, per_weight=160):
    """The sorted ring of (hash, index) as nginx builds it
    (``ngx_http_upstream_update_chash``): 160 points per unit of weight, each
    the crc32 of the previous point (4 bytes little-endian) continued from the
    running crc32 of ``host \\0 port``; duplicate hashes dropped, first kept."""
    points = []
    for index, (server, weight) in enumerate(zip(servers, weights)):
        host, port = _split_server(server)
        base = zlib.crc32(port, zlib.crc32(b"\0", zlib.crc32(host)))
        prev = 0
        for _ in range(weight * per_weight):
            prev = zlib.crc32(struct.pack("<I", prev), base)
            points.append((prev, index))
    points.sort(key=lambda p: p[0])     # stable: ties keep config order, as qsort in nginx? see dedupe
    ring = []
    last = None
    for h, i in points:
        if h != last:
            ring.append((h, i))
            last = h
    return ring


class ConsistentHash:
    """nginx ``hash $key consistent`` (ketama)."""

    TRIES = 20      # nginx walks 20 points before falling back to round robin

    def __init__(self, weights, inflight=None, rng=None, servers=()):
        self.weights = list(weights)
        ring = ketama_points(servers, self.weights)
        self.hashes = [h for h, _ in ring]
        self.owners = [i for _, i in ring]
        self.rr = RoundRobin(weights)

    def choose(self, ok, key=None):
        if not key or len(self.weights) == 1:
            return self.rr.choose(ok)
        n = len(self.hashes)
        at = bisect_left(self.hashes, zlib.crc32(key))
        for step in range(self.TRIES):
            i = self.owners[(at + step) % n]
            if ok(i):
                return i
        return self.rr.choose(ok)

    def owner(self, key):
        """The backend a key maps to when all are usable (for tests and tools)."""
        return self.choose(lambda i: True, key)


BALANCERS = {
    "round_robin": RoundRobin,
    "least_conn": LeastConn,
    "random": Random,
    "consistent_hash": ConsistentHash,
}


def make_policy(upstream, inflight, rng=None):
    """The policy object for a config ``Upstream``."""
    weights = [b.weight for b in upstream.backends]
    cls = BALANCERS[upstream.balance]
    if cls is ConsistentHash:
        return cls(weights, inflight, rng, servers=[b.name for b in upstream.backends])
    return cls(weights, inflight, rng)
