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
