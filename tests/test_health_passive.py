"""Passive health with nginx max_fails/fail_timeout semantics, clock passed in."""

from gproxy.health import PassiveHealth


def test_max_fails_within_window_makes_backend_unavailable_for_fail_timeout():
    h = PassiveHealth(2, max_fails=2, fail_timeout=10)
    h.failure(0, now=100)
    assert h.usable(0, 101)             # one failure of two
    h.failure(0, now=102)
    assert not h.usable(0, 103)
    assert not h.usable(0, 112)         # 10 s after the last failure, still out
    assert h.usable(0, 112.5)           # window over: offered again
    assert h.usable(1, 103)


def test_probe_after_window_success_resets_failure_probe_failure_restarts_window():
    h = PassiveHealth(2, max_fails=1, fail_timeout=10)
    h.failure(0, now=0)
    assert not h.usable(0, 5)
    h.chosen(0, now=11)                 # the probe
    h.failure(0, now=11.1)
    assert not h.usable(0, 20)          # new window from 11.1
    assert h.usable(0, 21.2)
    h.chosen(0, now=21.2)
    h.success(0, now=21.3)
    assert h.fails[0] == 0 and h.usable(0, 21.4)


def test_success_inside_the_window_does_not_reset():
    # nginx resets fails only when accessed < checked (a probe after the window)
    h = PassiveHealth(2, max_fails=2, fail_timeout=10)
    h.failure(0, now=0)
    h.success(0, now=1)
    h.failure(0, now=2)
    assert not h.usable(0, 3)


def test_max_fails_zero_and_single_backend_never_mark_down():
    h = PassiveHealth(2, max_fails=0, fail_timeout=10)
    for t in range(5):
        h.failure(0, now=t)
    assert h.usable(0, 5)
    single = PassiveHealth(1, max_fails=1, fail_timeout=10)
    single.failure(0, now=0)
    assert single.usable(0, 1)
