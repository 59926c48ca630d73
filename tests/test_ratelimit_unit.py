"""GCRA transcripts (gproxy/ratelimit.py): the clock is passed in, so every
step is exact. The same transcript runs through the Redis Lua script in
tests/test_ratelimit_redis.py."""

from gproxy import ratelimit
from gproxy.ratelimit import US

# (time in ms, admitted?) for 10/s, burst 2: three at once, then one per 100 ms
TRANSCRIPT_10S_BURST2 = [
    (0, True), (0, True), (0, True), (0, False), (50, False),
    (100, True), (150, False), (200, True), (200, False),
    (1000, True), (1000, True), (1000, True), (1000, False),   # idle: a full burst again
]


def run(p, transcript):
    tat, got = None, []
    for ms, _ in transcript:
        d = ratelimit.decide(p, tat, ms * 1000)
        if d.allowed:
            tat = d.tat
        got.append((ms, d.allowed))
    return got


def test_burst_then_one_per_interval_then_full_burst_after_idle():
    p = ratelimit.policy(10, 1, burst=2)
    assert run(p, TRANSCRIPT_10S_BURST2) == TRANSCRIPT_10S_BURST2


def test_burst_zero_is_nginx_default_one_per_interval():
    p = ratelimit.policy(10, 1, burst=0)
    assert run(p, [(0, True), (10, False), (99, False), (100, True), (150, False)]) == \
        [(0, True), (10, False), (99, False), (100, True), (150, False)]


def test_refusal_changes_nothing_and_says_when_to_come_back():
    p = ratelimit.policy(2, 1, burst=1)           # interval 500 ms
    d1 = ratelimit.decide(p, None, 0)
    d2 = ratelimit.decide(p, d1.tat, 0)
    refused = ratelimit.decide(p, d2.tat, 100_000)
    assert (d1.allowed, d2.allowed, refused.allowed) == (True, True, False)
    assert refused.tat == d2.tat, "a refusal must not move the bucket"
    assert refused.wait == 400_000, f"got {refused.wait}, want 400 ms until the next admission"
    assert ratelimit.decide(p, refused.tat, 500_000).allowed


def test_per_minute_rates_and_long_run_rate():
    p = ratelimit.policy(600, 60, burst=5)        # 10/s
    assert p.interval == 100_000
    tat, admitted = None, 0
    for ms in range(0, 10_000, 7):                # hammering every 7 ms for 10 s
        d = ratelimit.decide(p, tat, ms * 1000)
        if d.allowed:
            tat, admitted = d.tat, admitted + 1
    # burst + 1 at 0 ms, then one per 100 ms up to 9,900 ms: rate x time + burst
    assert admitted == 10 * 10 + 5, admitted


def test_garbage_state_starts_afresh_instead_of_locking_out():
    p = ratelimit.policy(1, 1, burst=0)
    assert ratelimit.decide(p, 10**15, 0).allowed


def test_refusal_headers_follow_rfc_9110_and_the_httpapi_draft():
    p = ratelimit.policy(10, 1, burst=50)
    d = ratelimit.Decision(False, 0, 1_300_000)
    assert ratelimit.refusal_headers("api", p, d) == [
        ("Retry-After", "2"), ("RateLimit-Policy", '"api";q=10;w=1'), ("RateLimit", '"api";r=0;t=2')]
    assert ratelimit.refusal_headers("api", p, ratelimit.Decision(False, 0, 1))[0] == ("Retry-After", "1")
    assert US == 1_000_000


# --- the local table (gproxy/ratestore.py) ----------------------------------------

def test_table_is_shared_between_processes_and_a_killed_holder_wedges_nothing(tmp_path):
    import fcntl
    import os
    import signal
    import time
    from gproxy.ratestore import LocalStore
    p = ratelimit.policy(1, 60, burst=0)
    a = LocalStore(str(tmp_path), 64)
    assert a.decide(b"r", p, b"k").allowed
    locked_r, locked_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                # a worker that dies holding the lock
        b = LocalStore(str(tmp_path), 64)
        fcntl.flock(b.fd, fcntl.LOCK_EX)
        os.write(locked_w, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"x"
        probe = os.open(tmp_path / "ratelimit-64.table", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the child must hold the lock")
        except BlockingIOError:
            pass
        finally:
            os.close(probe)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
    t0 = time.monotonic()
    c = LocalStore(str(tmp_path), 64)           # another process's view: the same bucket
    assert not c.decide(b"r", p, b"k").allowed
    assert time.monotonic() - t0 < 1


def test_full_table_evicts_the_oldest_bucket_and_logs_once(tmp_path, caplog):
    from gproxy.ratestore import PROBE, LocalStore
    p = ratelimit.policy(1, 60, burst=0)
    s = LocalStore(str(tmp_path), 1)            # one home slot: a window of PROBE slots
    for i in range(PROBE):
        assert s.decide(b"r", p, b"%d" % i).allowed
    assert not s.decide(b"r", p, b"0").allowed, "still tracked"
    with caplog.at_level("WARNING", logger="gproxy.error"):
        assert s.decide(b"r", p, b"new").allowed
        assert s.decide(b"r", p, b"newer").allowed
    assert len([r for r in caplog.records if "table full" in r.getMessage()]) == 1
    assert s.decide(b"r", p, b"0").allowed, "the oldest bucket was evicted: it starts full"
