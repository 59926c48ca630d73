import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from servers import REPO, Backend, GProxy  # noqa: E402


def pytest_configure(config):
    """Byte-compile gproxy once, before the test processes start. Every
    test starts gproxy processes (the arbiter, the supervisor, the workers),
    each of which imports gproxy; without .pyc files each of them compiles
    the modules it imports again (about 70 ms a process), as it does in a
    fresh clone or wherever PYTHONDONTWRITEBYTECODE is set. compileall
    writes them regardless and rewrites only those older than their source."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        import compileall
        compileall.compile_dir(os.path.join(REPO, "gproxy"), quiet=1)


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
