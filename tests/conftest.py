import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from servers import Backend, GProxy  # noqa: E402


@pytest.fixture
def backends():
    """backends(n) -> list of started Backend servers, stopped after the test."""
    made = []

    def make(n=1, prefix="b"):
        new = [Backend(f"{prefix}{len(made) + i + 1}") for i in range(n)]
        made.extend(new)
        return new

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def gproxy(tmp_path):
    """gproxy(yaml_text) -> a started GProxy; '{port}' in the text is its port."""
    started = []

    def start(text, **kw):
        d = tmp_path / f"gp{len(started)}"
        d.mkdir()
        g = GProxy(d, text, **kw)
        started.append(g)
        return g.start()

    yield start
    failures = []
    for g in started:           # stop every one, then report a forced kill
        try:
            g.stop()
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)
