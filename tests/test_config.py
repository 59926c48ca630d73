"""Config loading: good files parse to the right values, broken files name file, line and key."""

import subprocess
import sys
import textwrap

import pytest

from gproxy import config
from gproxy.errors import ConfigError

GOOD = """\
listen: ["127.0.0.1:8080", "127.0.0.1:8081"]
workers: 4
trusted_proxies: [127.0.0.1/32, "10.0.0.0/8"]
access_log: {format: combined, path: /var/log/gproxy/access.log}
upstreams:
  api:
    balance: consistent_hash
    hash_key: "header:X-User-Id"
    backends:
      - {url: "http://127.0.0.1:8081", weight: 2}
      - "https://api2.internal:8443"
    timeouts: {connect: 250ms, response_header: 30s, idle: 1m, total: 2m}
    retries: 1
    pool: {max_idle_per_backend: 8, idle_timeout: 90s}
    passive: {max_fails: 3, fail_timeout: 30s}
    preserve_host: false
routes:
  - {host: "*.example.com", path_prefix: /api/, upstream: api, methods: [GET, POST],
     strip_prefix: true, max_body: 10MB, name: api-v1}
"""


def test_good_config_values():
    c = config.parse(GOOD, "g.yaml")
    assert c.listen == ("127.0.0.1:8080", "127.0.0.1:8081") and c.workers == 4
    assert c.access_log.format == "combined"
    api = c.upstreams["api"]
    assert [b.name for b in api.backends] == ["127.0.0.1:8081", "api2.internal:8443"]
    assert [b.weight for b in api.backends] == [2, 1]
    assert api.backends[1].scheme == "https"
    assert (api.hash_key.kind, api.hash_key.name) == ("header", "X-User-Id")
    assert api.timeouts.connect == 0.25 and api.timeouts.idle == 60 and api.timeouts.total == 120
    assert api.passive.max_fails == 3 and api.preserve_host is False
    r = c.routes[0]
    assert r.max_body == 10 * 1024 * 1024 and r.methods == {"GET", "POST"} and r.name == "api-v1"


def test_defaults_state_their_values():
    c = config.parse("upstreams: {u: {backends: ['http://h:1']}}\nroutes: [{upstream: u}]\n")
    u = c.upstreams["u"]
    assert u.balance == "round_robin" and u.retries == 2 and u.preserve_host is True
    assert (u.passive.max_fails, u.passive.fail_timeout) == (1, 10)
    assert u.pool.max_idle_per_backend == 32
    assert c.routes[0].path_prefix == "/" and c.routes[0].name == "0"


def test_built_in_default_loads():
    c = config.parse(config.DEFAULT_YAML, "<built-in>")
    assert c.listen == ("127.0.0.1:8080",)


BROKEN = [
    # (file text, expected message)
    ("listen: [\n  '127.0.0.1:80'\n  bad: x\n", "b.yaml:3: not valid YAML"),
    ("workers: 2\nworkerz: 3\n", "b.yaml:2: workerz: unknown key"),
    ("workers: two\n", "b.yaml:1: workers: expected an integer, got 'two'"),
    ("workers: 0\n", "b.yaml:1: workers: must be at least 1, got 0"),
    ("listen: [localhost]\n", "b.yaml:1: listen[0]: expected host:port, got 'localhost'"),
    ("upstreams:\n  api:\n    backends:\n      - http://127.0.0.1:1\n      - ftp://x:21\n",
     "b.yaml:5: upstreams.api.backends[1]: not an http(s) URL: 'ftp://x:21'"),
    ("upstreams:\n  api:\n    backends:\n      - {url: 'http://h:1/path'}\n",
     "b.yaml:4: upstreams.api.backends[0].url: a backend URL is scheme://host:port only"),
    ("upstreams:\n  api:\n    backends: []\n", "b.yaml:3: upstreams.api.backends: an upstream needs at least one backend"),
    ("upstreams:\n  api:\n    backends: ['http://h:1']\n    timeouts:\n      connect: soon\n",
     "b.yaml:5: upstreams.api.timeouts.connect: expected a duration like 250ms or 10s, got 'soon'"),
    ("upstreams:\n  api:\n    backends: ['http://h:1']\n    balance: fastest\n",
     "b.yaml:4: upstreams.api.balance: expected one of round_robin, least_conn, random, consistent_hash"),
    ("upstreams:\n  api:\n    backends: ['http://h:1']\n    balance: consistent_hash\n",
     "b.yaml:4: upstreams.api.balance: consistent_hash needs a hash_key"),
    ("upstreams:\n  api:\n    backends: ['http://h:1']\n    hash_key: header\n",
     "b.yaml:4: upstreams.api.hash_key: header needs a name"),
    ("upstreams:\n  api:\n    backends: ['http://h:1', {url: 'http://h:1', weight: 2}]\n",
     "b.yaml:3: upstreams.api.backends[1]: duplicate backend h:1"),
    ("upstreams:\n  api: {backends: ['http://h:1']}\nroutes:\n  - path_prefix: /x\n    upstream: apii\n",
     "b.yaml:5: routes[0].upstream: no upstream named 'apii'"),
    ("upstreams:\n  api: {backends: ['http://h:1']}\nroutes:\n  - {upstream: api, path_prefix: x/}\n",
     "b.yaml:4: routes[0].path_prefix: must start with '/', got 'x/'"),
    ("upstreams:\n  api: {backends: ['http://h:1']}\nroutes:\n  - {upstream: api, max_body: lots}\n",
     "b.yaml:4: routes[0].max_body: expected a size like 64KB or 10MB, got 'lots'"),
    ("upstreams:\n  api: {backends: ['http://h:1']}\nroutes:\n  - {upstream: api, methods: [get]}\n",
     "b.yaml:4: routes[0].methods[0]: expected an upper-case method name, got 'get'"),
    ("trusted_proxies: [10.0.0.0/33]\n", "b.yaml:1: trusted_proxies[0]: not an IP address or CIDR block"),
    ("workers: 2\nworkers: 3\n", "b.yaml:2: workers: duplicate key"),
    ("access_log: {format: xml}\n", "b.yaml:1: access_log.format: expected one of json, combined, fields, off, got 'xml'"),
    ("access_log:\n  format: json\n  buffer: 64MB\n",
     "b.yaml:3: access_log.buffer: must be between 0 and 16777216 bytes, got 67108864"),
    ("access_log:\n  buffer: 64KB\n  flush: 0s\n", "b.yaml:3: access_log.flush: must be between 0.01s and 3600s"),
    ("statsd:\n  port: 8125\n  flush_interval: 5m\n", "b.yaml:3: statsd.flush_interval: must be between 0.01s and 60s"),
    ("statsd:\n  port: 8125\n  timer_samples: 0\n", "b.yaml:3: statsd.timer_samples: must be at least 1, got 0"),
    ("upstreams:\n  api:\n    backends: ['http://h:1']\n    pool: {max_idle: 3}\n",
     "b.yaml:4: upstreams.api.pool.max_idle: unknown key"),
    ("- just\n- a list\n", "b.yaml:1: (top level): expected a mapping, got list"),
]


@pytest.mark.parametrize("text,message", BROKEN, ids=[m.split(": ")[1] for _, m in BROKEN])
def test_broken_config_names_file_line_and_key(text, message):
    with pytest.raises(ConfigError) as e:
        config.parse(text, "b.yaml")
    assert str(e.value).startswith(message), f"got {e.value}, want {message}"


def test_load_reports_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        config.load(str(tmp_path / "missing.yaml"))


def test_gproxy_check_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        upstreams:
          api:
            backends: ["http://127.0.0.1:1", "gopher://x"]
        """))
    ok = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "test is successful" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1
    assert f"{bad}:3: upstreams.api.backends[1]: not an http(s) URL: 'gopher://x'" in ko.stderr


def test_gunicorn_refuses_to_start_on_a_broken_config(tmp_path):
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = tmp_path / "gproxy.yaml"
    bad.write_text("listen: ['127.0.0.1:1']\nwrkers: 2\n")
    p = subprocess.run([sys.executable, "-m", "gunicorn", "-c", os.path.join(repo, "gunicorn.conf.py"),
                        "gproxy.wsgi"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, GPROXY_CONFIG=str(bad), PYTHONPATH=repo))
    assert p.returncode != 0
    assert f"{bad}:2: wrkers: unknown key" in p.stderr


def test_bare_off_means_off():
    # YAML 1.1 reads an unquoted `off` as false
    assert config.parse("access_log: {format: off}").access_log.format == "off"
    assert config.parse("access_log: {buffer: off}").access_log.buffer == 0


def test_access_log_buffer_defaults_as_nginx():
    assert config.parse("workers: 1").access_log.buffer == 0, "unbuffered unless asked (nginx)"
    assert config.parse("access_log: {flush: 5s}").access_log.buffer == 64 * 1024, "flush= alone gathers 64k"
    got = config.parse("access_log: {buffer: 8KB}").access_log
    assert (got.buffer, got.flush) == (8192, 1.0), got
