"""Rate-limit decisions: GCRA (the generic cell rate algorithm), pure.

No I/O and no clock of its own: the caller passes ``now`` and the stored
state, and stores what comes back (``ratestore`` does, in shared memory or in
Redis, where the same arithmetic runs as a Lua script).

Rule 1: the whole state of a bucket is one integer, its theoretical arrival
        time (TAT), in microseconds of the store's clock. A key with no TAT,
        or a TAT in the past, is a full bucket: forgetting an idle key loses
        nothing.
Rule 2: with ``interval`` = 1/rate and ``tau`` = burst x interval, a request
        at ``now`` is admitted when ``TAT - now <= tau``; the TAT then moves
        to ``max(TAT, now) + interval``. So after an idle spell ``burst + 1``
        requests pass at once and then one per ``interval``: exactly nginx's
        ``limit_req rate=R burst=B nodelay`` (burst 0, nginx's default, admits
        one request per interval and no more).
Rule 3: a refused request changes nothing (nginx and redis-cell alike), so a
        client hammering a refused key cannot push its own refill back.
Rule 4: integer microseconds, so Python and Lua (doubles, exact up to 2^53)
        agree to the microsecond; a rate above 1,000,000/s is refused by the
        config (the interval would round to zero).
"""

from typing import NamedTuple

US = 1_000_000


class Policy(NamedTuple):
    interval: int       # microseconds between two requests at the steady rate
    burst: int          # requests admitted beyond the rate after an idle spell
    count: int          # the rate as written: ``count`` per ``period`` seconds
    period: int
    tau: int            # burst x interval: how far ahead of now a TAT may be


def policy(count, period, burst=0):
    """``count`` requests per ``period`` seconds, with ``burst`` (nginx semantics)."""
    interval = max(1, round(period * US / count))
    return Policy(interval, burst, count, period, interval * burst)


class Decision(NamedTuple):
    allowed: bool
    tat: int            # the state to store (unchanged when refused)
    wait: int           # microseconds until the next request would be admitted (0: now)


def decide(p, tat, now):
    """Admit or refuse one request at ``now`` for a bucket whose state is
    ``tat`` (None for a key never seen)."""
    interval, tau = p.interval, p.tau
    if tat is None or tat < now or tat - now > tau + interval:
        # Past: a full bucket. More than a full bucket ahead: a torn or
        # foreign value; start afresh rather than lock the key out.
        tat = now
    if tat - now > tau:
        return Decision(False, tat, tat - now - tau)
    tat += interval
    return Decision(True, tat, max(0, tat - now - tau))


def refusal_headers(name, p, d):
    """The response fields of a 429: ``Retry-After`` (RFC 9110 10.2.3, whole
    seconds, rounded up) and the IETF httpapi draft's ``RateLimit-Policy``
    (the rate as configured: ``q`` requests per ``w`` seconds) and
    ``RateLimit`` (``r`` requests left now, ``t`` seconds until one is)."""
    seconds = max(1, -(-d.wait // US))
    return [("Retry-After", str(seconds)),
            ("RateLimit-Policy", f'"{name}";q={p.count};w={p.period}'),
            ("RateLimit", f'"{name}";r=0;t={seconds}')]
