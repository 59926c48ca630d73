"""The gproxy fixture itself: it starts and stops real gunicorn processes for
every other test, so its guarantees are tested too."""

import os
import signal

import pytest

from servers import GProxy, alive, children, worker_serving


def conf(b):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 2
upstreams: {{api: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: api}}]
"""


def test_start_returns_with_every_worker_serving_and_its_own_admin_port(tmp_path, backends):
    """The fixture returned once the listening socket accepted (the arbiter's
    backlog), before every worker had installed its signal handlers; and every
    gproxy shared the admin port 127.0.0.1:9901."""
    b, = backends(1)
    g = GProxy(tmp_path, conf(b)).start()
    try:
        pids = g.worker_pids()
        assert len(pids) == 2 and all(map(worker_serving, pids)), pids
        with open(g.config_path) as f:
            text = f.read()
        assert f'admin: {{listen: "127.0.0.1:{g.admin_port}"}}' in text and g.admin_port != 9901
        assert os.path.isdir(g.runtime_dir()), "the runtime directory is the fixture's own"
    finally:
        g.stop()
    assert g.proc.returncode == 0 and not os.path.exists(g.runtime_base)


def test_stop_fails_the_test_when_gproxy_had_to_be_killed(tmp_path, backends):
    """The fixture waited 10 s after TERM and then SIGKILLed gproxy without a
    word; a kill is now a failure that names the signal it ignored."""
    b, = backends(1)
    g = GProxy(tmp_path, conf(b)).start()
    kids = children(g.proc.pid)
    os.kill(g.proc.pid, signal.SIGSTOP)         # an arbiter that cannot answer
    with pytest.raises(AssertionError, match="ignored QUIT for 0.5s and was SIGKILLed"):
        g.stop(timeout=0.5)
    assert g.proc.returncode == -signal.SIGKILL
    # Its workers and supervisor follow their arbiter (gunicorn's parent check,
    # the supervisor's parent-death signal).
    from servers import wait_until
    wait_until(lambda: not any(map(alive, kids)), 10, "the orphaned workers and supervisor to exit")
