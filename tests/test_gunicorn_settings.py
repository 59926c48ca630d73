"""What ``gproxy check`` accepts, gunicorn can use: durations reach gunicorn
without truncation, values gunicorn cannot take are refused with file, line
and key, and an empty file is an error. Regression tests, each naming the bug
it pins."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from gproxy import config
from gproxy.errors import ConfigError
from servers import REPO

CONF_PY = os.path.join(REPO, "gunicorn.conf.py")

# Loads gunicorn.conf.py the way the arbiter does (at start and on every HUP),
# so gunicorn's own validators judge each setting; prints what gunicorn got.
GUNICORN_LOAD = r"""
import json, os, sys
from gunicorn.app.base import Application
from gunicorn.config import Config
out = {}
for path in sys.argv[2:]:
    os.environ["GPROXY_CONFIG"] = path
    sys.modules.pop("gproxy.gunicorn_conf", None)     # as lifecycle.forget_settings on HUP
    app = Application.__new__(Application)
    app.cfg, app.usage, app.prog = Config(), None, None
    app.load_config_from_file(sys.argv[1])
    out[path] = {"keepalive": app.cfg.keepalive, "graceful_timeout": app.cfg.graceful_timeout,
                 "bind": app.cfg.bind, "statsd_host": app.cfg.statsd_host}
print(json.dumps(out))
"""


def gunicorn_settings(tmp_path, texts):
    paths = []
    for i, text in enumerate(texts):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(text)
        paths.append(str(p))
    r = subprocess.run([sys.executable, "-c", GUNICORN_LOAD, CONF_PY, *paths], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, f"gunicorn refused a config gproxy accepted: {r.stderr}"
    got = json.loads(r.stdout)
    return [got[p] for p in paths]


def check(path):
    return subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(path)],
                          capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=REPO))


def test_sub_second_durations_round_up_for_gunicorn(tmp_path):
    """keepalive_timeout 500ms was truncated to 0 by int() in gunicorn.conf.py,
    which turns keep-alive off; gunicorn takes whole seconds, so round up."""
    got = gunicorn_settings(tmp_path, ["keepalive_timeout: 500ms\ngraceful_timeout: 1500ms\n",
                                       "keepalive_timeout: 0\ngraceful_timeout: 0\n"])
    assert got[0]["keepalive"] == 1 and got[0]["graceful_timeout"] == 2, f"got {got[0]}"
    assert got[1]["keepalive"] == 0 and got[1]["graceful_timeout"] == 0, "0 stays 0 (keep-alive off)"


def test_keepalive_500ms_keeps_client_connections_open(gproxy, backends):
    """keepalive_timeout 500ms was truncated to 0 by int(): gunicorn then
    closed every client connection after one response."""
    b, = backends(1)
    g = gproxy(f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
keepalive_timeout: 500ms
upstreams: {{api: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: api}}]
""")
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        f = s.makefile("rb")
        for i in range(2):
            s.sendall(b"GET /r%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            status = f.readline()
            head = []
            while (line := f.readline()) not in (b"\r\n", b""):
                head.append(line.lower())
            length = next(int(h.split(b":")[1]) for h in head if h.startswith(b"content-length:"))
            f.read(length)
            assert status.startswith(b"HTTP/1.1 200"), f"request {i}: got {status!r}"
            assert b"connection: close\r\n" not in head, f"request {i}: keep-alive was turned off"
    assert [r.target for r in b.received] == ["/r0", "/r1"]


def test_the_largest_accepted_durations_are_usable_by_gunicorn(tmp_path):
    """graceful_timeout: .inf passed gproxy check, and int(inf) then failed
    inside gunicorn.conf.py; every accepted value must load in gunicorn."""
    top = "2147483647ms"            # config.MAX_DURATION
    got = gunicorn_settings(tmp_path, [
        f"keepalive_timeout: {top}\ngraceful_timeout: {top}\n"
        'listen: ["[::1]:8080", "0.0.0.0:8081"]\nstatsd: {host: "::1", port: 8125, gunicorn: true}\n'])
    assert got[0]["keepalive"] == 2147484 and got[0]["graceful_timeout"] == 2147484, f"got {got[0]}"
    assert got[0]["bind"] == ["[::1]:8080", "0.0.0.0:8081"] and got[0]["statsd_host"] == ["::1", 8125]


@pytest.mark.parametrize("value, message", [
    (".inf", "must be at most 24 days"),
    ("-.inf", "must be a duration of 0 or more"),
    (".nan", "must be a duration of 0 or more"),
    ("1.0e+300", "must be at most 24 days"),
    ("2147483648ms", "must be at most 24 days"),
    ("597h", "must be at most 24 days"),
    ("-1", "must be a duration of 0 or more"),
])
@pytest.mark.parametrize("key", ["graceful_timeout", "keepalive_timeout", "upstreams.api.timeouts.connect"])
def test_durations_refuse_infinite_nan_and_huge_values(key, value, message):
    """.inf, .nan and 1e300 passed the duration parser; gunicorn (int()), socket
    timeouts and gevent timers cannot take them, so the server failed after the check."""
    if key.startswith("upstreams"):
        text = f"upstreams:\n  api:\n    backends: ['http://h:1']\n    timeouts:\n      connect: {value}\n"
        line = 5
    else:
        text = f"workers: 1\n{key}: {value}\n"
        line = 2
    with pytest.raises(ConfigError) as e:
        config.parse(text, "d.yaml")
    want = f"d.yaml:{line}: {key}: {message}"
    assert str(e.value).startswith(want), f"got {e.value}, want {want}"


def test_hup_with_an_infinite_graceful_timeout_keeps_serving(gproxy, backends):
    """graceful_timeout: .inf passed the check, and a HUP with it exited the
    arbiter: every client connection was refused until someone restarted it.
    Now check refuses it and a HUP keeps the old configuration running."""
    b, = backends(1)
    text = f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
upstreams: {{api: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: api}}]
"""
    g = gproxy(text)
    g.wait_supervisor()         # it has a good config to keep
    with open(g.config_path, "a") as f:
        f.write("graceful_timeout: .inf\n")
    r = check(g.config_path)
    assert r.returncode == 1 and f"{g.config_path}:8: graceful_timeout: must be at most 24 days" in r.stderr, r.stderr
    g.hup()                     # returns once new workers serve
    assert "reload failed, keeping the previous configuration" in g.stderr(), g.stderr()[-2000:]
    assert g.proc.poll() is None, f"the arbiter exited: {g.stderr()[-2000:]}"
    import requests
    assert requests.get(g.url + "/after", timeout=5).status_code == 200
    assert b.received[-1].target == "/after"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n", "{}\n"])
def test_an_empty_file_is_an_error(tmp_path, text):
    """An empty config file (or one with only comments) started a proxy with
    no routes, answering 404 to everything, instead of naming the mistake."""
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(p))
    want = re.compile(re.escape(f"{p}: no settings: the file is empty or holds only comments"))
    assert want.match(str(e.value)), f"got {e.value}"
    r = check(p)
    assert r.returncode == 1 and want.search(r.stderr), r.stderr
