"""Where rate-limit buckets live: a table shared by every worker of this
arbiter, or Redis shared by every gproxy pointing at it.

An adapter: the only module that touches the table file or Redis. The
decision is ``ratelimit.decide`` (pure); a store reads one TAT, decides and
writes it back as one atomic step.

Rule 1: a bucket is named by a 16-byte digest of (policy id, key). The policy
        id holds the route's name, rate, burst and key kind, so a HUP that
        changes a route's limit starts that route's buckets afresh and keeps
        every other bucket. Keys (header values, addresses, consumers) are
        stored only as digests: no credential reaches the table or Redis.
Rule 2: the local table is a file in this arbiter's runtime directory
        (``ratelimit-<slots>.table``), mmap'd by every worker: it outlives the
        workers a HUP replaces, and a USR2 upgrade's new arbiter has its own.
        Its geometry is in its name, so a worker never maps a file that
        another generation sized differently.
Rule 3: a decision holds ``flock`` on the table for a few microseconds (no
        I/O and no greenlet switch inside). The kernel drops the lock of a
        process that dies, so a killed worker never wedges the others. The
        file is opened after fork: each worker has its own open file
        description, which is what makes flock exclude the others.
Rule 4: slots are probed linearly in a window of ``PROBE``; an empty slot or
        one whose TAT is past (a full bucket, Rule 1 of ``ratelimit``) is
        free. A full window evicts its oldest bucket (that key starts full),
        logged once per worker.
Rule 5: Redis: one EVALSHA per decision (the GCRA in Lua, Redis's own clock
        so that instances need not agree on time), bounded by ``timeout``
        whatever happens on the socket. A failure decides by ``on_error``,
        is counted in a metric and logged at most once per ``LOG_EVERY``.
"""

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time

from . import ratelimit

log = logging.getLogger("gproxy.error")

HEADER = 64
MAGIC = b"GPRL"
LAYOUT = 1
SLOT = 32                   # digest 16, TAT i64, 8 spare
PROBE = 16
_TAT = struct.Struct("<q")
_WINDOW_TATS = struct.Struct("<" + "16x q 8x" * PROBE)
NAMES_KEPT = 4096          # (policy, key) -> digest remembered per worker
LOG_EVERY = 10.0            # seconds between two error-log lines of one store


def digest(policy_id, key):
    """16 bytes naming a bucket; ``policy_id`` holds no NUL byte."""
    return hashlib.blake2b(policy_id + b"\0" + key, digest_size=16).digest()


def now_us():
    # CLOCK_MONOTONIC: one clock for every process of the host.
    return time.monotonic_ns() // 1000


class LocalStore:
    """The shared table; ``directory`` None gives a table private to this
    process (no runtime directory: gproxy run without gunicorn.conf.py)."""

    def __init__(self, directory, slots):
        self.slots = slots
        size = HEADER + (slots + PROBE) * SLOT
        self.fd = None
        if directory is None:
            self.mm = mmap.mmap(-1, size)
        else:
            path = os.path.join(directory, f"ratelimit-{slots}.table")
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self.fd).st_size < size:
                    os.ftruncate(self.fd, size)     # sparse: zeros are empty slots
                self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
                if self.mm[:4] != MAGIC:
                    self.mm[:8] = MAGIC + struct.pack("<I", LAYOUT)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.full_logged = False
        self.names = {}

    def decide(self, policy_id, p, key):
        name = self.names.get((policy_id, key))
        if name is None:
            name = self._name(policy_id, key)
        d, start = name
        mm, fd = self.mm, self.fd
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = now_us()
            at, evicted = self._slot(d, start, now)
            tat = _TAT.unpack_from(mm, at + 16)[0] if mm[at:at + 16] == d else None
            decision = ratelimit.decide(p, tat, now)
            if decision.allowed:
                _TAT.pack_into(mm, at + 16, decision.tat)
                mm[at:at + 16] = d
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        if evicted and not self.full_logged:
            self.full_logged = True
            log.warning("rate-limit table full around a slot: evicted the oldest bucket "
                        "(its key starts with a full burst); raise rate_limit_store.max_keys "
                        "(logged once per worker)")
        return decision

    def _name(self, policy_id, key):
        """A bucket's digest and the offset of its home slot, remembered for
        the keys seen lately (hashing is a fifth of a decision's cost)."""
        d = digest(policy_id, key)
        name = (d, HEADER + (int.from_bytes(d[:8], "little") % self.slots) * SLOT)
        if len(self.names) >= NAMES_KEPT:
            self.names.clear()
        self.names[(policy_id, key)] = name
        return name

    def _slot(self, d, start, now):
        """The byte offset of ``d``'s slot, or of the slot to give it, and
        whether that evicts a live bucket."""
        end = start + PROBE * SLOT
        mm = self.mm
        hit = mm.find(d, start, end)
        while hit >= 0:
            if (hit - start) % SLOT == 0:
                return hit, False
            hit = mm.find(d, hit + 1, end)
        tats = _WINDOW_TATS.unpack_from(mm, start)
        oldest = min(range(PROBE), key=tats.__getitem__)
        # empty (0) or past (a full bucket) is free; else the oldest goes
        return start + oldest * SLOT, tats[oldest] >= now

    def close(self):
        self.mm.close()
        if self.fd is not None:
            os.close(self.fd)


LUA = """
-- GCRA, the same arithmetic as gproxy/ratelimit.py (integer microseconds).
-- KEYS[1] bucket; ARGV interval, burst, [now for tests]. Returns
-- {allowed 0|1, wait_us}.
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local now
if ARGV[3] and ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < now or tat - now > tau + interval then
  tat = now
end
if tat - now > tau then
  return {0, tat - now - tau}
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1)
local wait = new - now - tau
if wait < 0 then wait = 0 end
return {1, wait}
"""


class RedisStore:
    """Buckets in Redis. ``count_error`` is called once per failed decision."""

    def __init__(self, cfg, count_error):
        import gevent
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.cfg = cfg
        self.timeout_cls = gevent.Timeout
        self.errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            cfg.url, socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.sha = hashlib.sha1(LUA.encode()).hexdigest()
        self.no_script = redis.exceptions.NoScriptError
        self.count_error = count_error
        self.last_log = None
        self.failures = 0

    def decide(self, policy_id, p, key, now=None):
        name = self.cfg.key_prefix + digest(policy_id, key).hex()
        args = [p.interval, p.burst] + ([now] if now is not None else [])
        try:
            with self.timeout_cls(self.cfg.timeout, TimeoutError("no answer within the timeout")):
                try:
                    allowed, wait = self.client.evalsha(self.sha, 1, name, *args)
                except self.no_script:          # a new or flushed Redis: once
                    allowed, wait = self.client.eval(LUA, 1, name, *args)
        except (TimeoutError, *self.errors) as e:
            return self.failed(e, p)
        return ratelimit.Decision(bool(allowed), 0, int(wait))

    def failed(self, e, p):
        self.count_error()
        self.failures += 1
        t = time.monotonic()
        if self.last_log is None or t - self.last_log >= LOG_EVERY:
            log.error("rate_limit_store %s: %s: %s; deciding by on_error=%s "
                      "(%d failures since the last line; next line in %ds at most)",
                      _safe_url(self.cfg.url), type(e).__name__, e, self.cfg.on_error,
                      self.failures, LOG_EVERY)
            self.last_log, self.failures = t, 0
        return None

    def close(self):
        self.client.close()


def _safe_url(url):
    """The URL without a password, for the error log."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
