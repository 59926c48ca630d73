"""Backend health decisions. Pure: the clock is passed in, no I/O.

Passive health, nginx semantics (``ngx_http_upstream_round_robin.c``):

Rule 1: a failure (connect error, timeout, invalid or reset response) sets
        ``fails += 1`` and ``checked = accessed = now``.
Rule 2: a backend with ``fails >= max_fails`` is unavailable while
        ``now - checked <= fail_timeout``.
Rule 3: after the window it is offered again (one probe); choosing it sets
        ``checked = now``; a success then resets ``fails`` (nginx resets
        only when ``accessed < checked``, i.e. on the probe after the window).
Rule 4: ``max_fails = 0`` turns the accounting off, and an upstream of one
        backend is never marked down (nginx does the same).
"""


class PassiveHealth:
    __slots__ = ("max_fails", "fail_timeout", "fails", "checked", "accessed", "single")

    def __init__(self, n, max_fails=1, fail_timeout=10.0):  # nginx defaults
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.fails = [0] * n
        self.checked = [0.0] * n
        self.accessed = [0.0] * n
        self.single = n == 1

    def usable(self, i, now):
        if self.max_fails == 0 or self.single or self.fails[i] < self.max_fails:
            return True
        return now - self.checked[i] > self.fail_timeout

    def chosen(self, i, now):
        if self.max_fails and self.fails[i] >= self.max_fails and now - self.checked[i] > self.fail_timeout:
            self.checked[i] = now       # the probe after the window

    def failure(self, i, now):
        if self.max_fails == 0:
            return
        self.fails[i] += 1
        self.checked[i] = self.accessed[i] = now

    def success(self, i, now):
        if self.fails[i] and self.accessed[i] < self.checked[i]:
            self.fails[i] = 0


# --- active checks ------------------------------------------------------------
#
# HAProxy semantics (``inter``/``rise``/``fall``), as its manual states them:
#
# Rule 5: a backend that is up goes down after ``fall`` consecutive failed
#         checks; one that is down comes back after ``rise`` consecutive
#         successful checks. A result of the other kind resets the count.
# Rule 6: at start a backend is up, but the first failed check takes it down
#         (HAProxy: "up, but will fall down at first failure"); a success
#         first makes it fully up, after which Rule 5 applies.
# Rule 7: a state given from outside (restored after a supervisor restart) is
#         taken as fully established.


class ActiveHealth:
    """Rise/fall state of one backend's active checks."""

    __slots__ = ("rise", "fall", "up", "successes", "failures", "confirmed", "reason", "changed_at")

    def __init__(self, rise=2, fall=3, up=True, confirmed=False, reason="initial", now=0.0):
        self.rise, self.fall = rise, fall      # HAProxy defaults 2 and 3
        self.up = up
        self.confirmed = confirmed
        self.successes = self.failures = 0
        self.reason = reason
        self.changed_at = now

    def result(self, ok, now, reason=""):
        """Record one check result; return True when ``up`` changed."""
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        was = self.up
        if self.up and not ok and (self.failures >= self.fall or not self.confirmed):
            self.up = False
        elif not self.up and ok and self.successes >= self.rise:
            self.up = True
        if ok and self.up:
            self.confirmed = True
        if self.up != was:
            self.reason, self.changed_at = reason, now
            if not self.up:
                self.confirmed = True   # coming back needs ``rise`` successes
        return self.up != was


# --- passive health shared by every worker ---------------------------------------
#
# The supervisor sees failure reports from all workers, but no successes
# (reporting every success would cost every request a syscall), so it keeps
# nginx's rule in its window form:
#
# Rule 8: ``max_fails`` failures reported within ``fail_timeout`` (by any
#         workers together) make the backend unavailable for ``fail_timeout``
#         from the last of them; the count then starts again from zero.
# Rule 9: ``max_fails = 0`` turns this off; an upstream of one backend is never
#         ejected (Rule 4).


class SharedPassive:
    """The aggregated passive state of one backend, in the supervisor."""

    __slots__ = ("max_fails", "fail_timeout", "single", "recent", "ejected_until", "reason")

    def __init__(self, max_fails=1, fail_timeout=10.0, single=False, ejected_until=0.0):
        self.max_fails, self.fail_timeout = max_fails, fail_timeout   # nginx defaults
        self.single = single
        self.recent = []            # times of failures inside the window
        self.ejected_until = ejected_until
        self.reason = ""

    def failure(self, now, reason="failure"):
        """Record one reported failure; return True when it ejects the backend."""
        if self.max_fails == 0 or self.single:
            return False
        horizon = now - self.fail_timeout
        self.recent = [t for t in self.recent if t >= horizon]
        self.recent.append(now)
        if len(self.recent) < self.max_fails:
            return False
        newly = not self.ejected(now)
        self.ejected_until = now + self.fail_timeout
        self.recent = []
        self.reason = f"{self.max_fails} failures within {self.fail_timeout:g}s, last: {reason}"
        return newly

    def ejected(self, now):
        return now < self.ejected_until

    def failures_in_window(self, now):
        horizon = now - self.fail_timeout
        return sum(1 for t in self.recent if t >= horizon)
