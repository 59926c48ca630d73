"""The operator's commands against a running gproxy: reload with feedback,
drain and enable a backend, status with a broken file and against the wrong
instance, reopen-logs, the LB health path and drain-instance; the packaged
gunicorn settings from any directory; ${VAR} in config values; every YAML
block of the README passes ``gproxy check``."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from loadgen import Load
from servers import REPO, alive, free_port, supervisor_pid, wait_until

from gproxy import config
from gproxy.errors import ConfigError

CONF = """\
listen: ["127.0.0.1:{port}"]
workers: 1
pidfile: PIDFILE
admin: {listen: "127.0.0.1:ADMIN"}
health_path: /-/health
drain_delay: 1500ms
access_log: {format: "off"}
upstreams:
  app:
    backends: [BACKENDS]
routes: [{upstream: app}]
"""


def conf(tmp_path, backends, admin, pidfile=True):
    return (CONF.replace("PIDFILE", str(tmp_path / "gproxy.pid") if pidfile else "null")
            .replace("ADMIN", str(admin)).replace("BACKENDS", ", ".join(f'"{b.url}"' for b in backends)))


# this checkout's gproxy for "python -m gproxy.cli", whatever is installed
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def name(b):
    return b.url.split("//", 1)[1]


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def running(gproxy, backends, tmp_path):
    admin = free_port()
    bs = backends(2)
    g = gproxy(conf(tmp_path, bs, admin))
    g.admin, g.bs = admin, bs
    wait_until(lambda: g.cli("status").returncode == 0, 10, "the admin endpoint")
    return g


def test_reload_waits_for_the_new_config_and_reports_a_failed_one(running, tmp_path, backends):
    g = running
    extra = backends(1)[0]
    g.write_config(conf(tmp_path, g.bs + [extra], g.admin))
    r = g.cli("reload")
    assert r.returncode == 0, r.stderr
    st = json.loads(g.cli("status", "--json").stdout)
    assert r.stdout.strip().endswith(f"(sha256 {st['config']['sha256'][:16]}) in arbiter pid {g.proc.pid}")
    assert [b["name"] for b in st["upstreams"]["app"]["backends"]][-1] == name(extra)
    # A file that does not validate: refused before any signal, exit 1
    with open(g.config_path, "a") as f:
        f.write("bogus: 1\n")
    bad = g.cli("reload")
    assert bad.returncode == 1 and "bogus: unknown key" in bad.stderr and "test failed" in bad.stderr
    # A file that validates here but not in the server (an env variable the
    # server lacks): the reload error from /status, exit 1, old config serving
    g.write_config(conf(tmp_path, g.bs, g.admin).replace("workers: 1", "workers: ${ONLY_HERE}"))
    env_only_here = dict(g.env, ONLY_HERE="1")
    bad = subprocess.run([sys.executable, "-m", "gproxy.cli", "reload", "--config", g.config_path],
                         env=env_only_here, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stdout
    assert "reload failed, the previous configuration keeps serving" in bad.stderr
    assert "ONLY_HERE is not set" in bad.stderr
    assert get(f"{g.url}/x")[0] == 200


def test_drain_and_enable_a_backend(running):
    g = running
    b1 = g.bs[0]
    r = g.cli("drain", "app", name(b1))
    assert r.returncode == 0 and r.stdout.strip().endswith("drained"), r
    before = len(b1.received)
    for _ in range(6):
        assert get(f"{g.url}/x")[0] == 200
    assert len(b1.received) == before
    assert "drained" in g.cli("status").stdout
    assert g.cli("enable", "app", name(b1)).stdout.strip().endswith(": up")
    unknown = g.cli("drain", "app", "10.9.9.9:1")
    assert unknown.returncode == 1 and "has no backend '10.9.9.9:1'" in unknown.stderr


def test_status_with_a_broken_file_uses_the_default_admin_address(gproxy, backends, tmp_path):
    bs = backends(1)
    g = gproxy(conf(tmp_path, bs, 9901, pidfile=False))     # the default admin address
    wait_until(lambda: g.cli("status").returncode == 0, 30,
               "this instance's supervisor on 9901 (another gproxy on this machine may hold it)")
    with open(g.config_path, "a") as f:
        f.write("routes: twice\n")
    r = g.cli("status")
    assert r.returncode == 0, r.stderr
    assert "duplicate key" in r.stderr and "using the default admin address" in r.stderr
    assert f"arbiter pid {g.proc.pid}" in r.stdout and name(bs[0]) in r.stdout


def test_status_refuses_another_instance(running, gproxy, backends, tmp_path):
    """Config A names the admin port that instance B holds: refused, by the
    pidfile (A's) and without one (B runs another file)."""
    b = running
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    a_conf = a_dir / "gproxy.yaml"
    a_conf.write_text(conf(a_dir, b.bs, b.admin).replace("{port}", str(free_port())))
    (a_dir / "gproxy.pid").write_text(f"{os.getpid()}\n")       # some other process
    for text in (a_conf.read_text(), a_conf.read_text().replace(f"pidfile: {a_dir}/gproxy.pid", "pidfile: null")):
        a_conf.write_text(text)
        r = subprocess.run([sys.executable, "-m", "gproxy.cli", "status", "--config", str(a_conf)],
                           env=b.env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, r.stdout
        assert "belongs to" in r.stderr and str(b.proc.pid) in r.stderr
    assert b.cli("status").returncode == 0


def test_health_path_and_drain_instance(running):
    g = running
    assert get(f"{g.url}/-/health") == (200, b"ok\n")
    assert get(f"{g.url}/-/health?x=1")[0] == 200
    load = Load(g.port, max_seconds=30).start().progress(20)
    t0 = time.monotonic()
    drain = subprocess.Popen([sys.executable, "-m", "gproxy.cli", "drain-instance", "--config", g.config_path],
                             env=g.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: get(f"{g.url}/-/health")[0] == 503, 5, "the health path to answer 503")
    assert get(f"{g.url}/x")[0] == 200         # still serving while the LB takes it out
    time.sleep(max(0.0, 1.2 - (time.monotonic() - t0)))
    load.stop()                                # the LB has stopped sending
    out, err = drain.communicate(timeout=30)
    assert drain.returncode == 0, err
    assert "graceful stop of arbiter pid" in out and "stopped" in out
    assert time.monotonic() - t0 >= 1.5
    assert not alive(g.proc.pid) and g.proc.wait(5) == 0
    print(f"drain-instance: {load.summary()}")
    assert load.failures == [] and load.ok > 20, load.summary()


def test_drain_instance_can_be_cancelled(running):
    g = running
    r = g.cli("drain-instance", "--no-wait")
    assert r.returncode == 0
    assert get(f"{g.url}/-/health")[0] == 503
    assert g.cli("drain-instance", "--cancel").returncode == 0
    assert get(f"{g.url}/-/health")[0] == 200
    time.sleep(2.0)         # past drain_delay: no stop came
    assert alive(g.proc.pid)


def test_reopen_logs_reaches_every_process_and_the_supervisor_survives_usr1(gproxy, backends, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    bs = backends(1)
    text = conf(tmp_path, bs, free_port()).replace(
        'access_log: {format: "off"}',
        f'access_log: {{path: {logdir}/access.log}}\nerror_log: {{path: {logdir}/error.log}}')
    g = gproxy(text)
    wait_until(lambda: g.cli("status").returncode == 0, 10, "the admin endpoint")
    sup = supervisor_pid(g)
    os.kill(sup, signal.SIGUSR1)            # what systemctl kill -s USR1 (all processes) does
    time.sleep(0.5)
    assert supervisor_pid(g) == sup         # alive, not restarted
    os.rename(logdir / "error.log", logdir / "error.log.1")
    assert g.cli("reopen-logs").returncode == 0
    wait_until(lambda: (logdir / "error.log").exists(), 5, "a new error.log")
    assert g.cli("drain", "app", name(bs[0])).returncode == 0     # the supervisor logs this
    wait_until(lambda: "drained backend" in (logdir / "error.log").read_text(), 5,
               "the supervisor's line in the new file")
    assert "drained backend" not in (logdir / "error.log.1").read_text()


def test_packaged_settings_from_any_directory_and_a_hup_rereads_them(gproxy, backends, tmp_path):
    """``gunicorn -c python:gproxy.gunicorn_conf`` (no gunicorn.conf.py in the
    working directory); a HUP applies a changed worker count."""
    bs = backends(1)
    g = gproxy(conf(tmp_path, bs, free_port()), conf="python:gproxy.gunicorn_conf")
    assert not os.path.exists(os.path.join(g.workdir, "gunicorn.conf.py"))
    assert get(f"{g.url}/x")[0] == 200
    g.write_config(conf(tmp_path, bs, _admin(g)).replace("workers: 1", "workers: 3"))
    assert g.cli("reload").returncode == 0
    wait_until(lambda: len(g.worker_pids()) == 3, 15, "three workers after the HUP")


def _admin(g):
    return int(re.search(r'listen: "127.0.0.1:(\d+)"', open(g.config_path).read()).group(1))


def test_env_variables_in_config_values(tmp_path, monkeypatch):
    monkeypatch.setenv("GP_WORKERS", "3")
    monkeypatch.setenv("GP_BACKEND", "http://10.0.0.5:8080")
    monkeypatch.delenv("GP_UNSET", raising=False)
    text = ('workers: ${GP_WORKERS}\nadmin: {listen: "127.0.0.1:${GP_ADMIN_PORT:-9911}"}\n'
            'upstreams: {a: {backends: ["${GP_BACKEND}"]}}\nruntime_dir: "$${literal}"\n')
    c = config.parse(text, "e.yaml")
    assert c.workers == 3 and c.admin.listen == "127.0.0.1:9911"
    assert c.upstreams["a"].backends[0].name == "10.0.0.5:8080" and c.runtime_dir == "${literal}"
    with pytest.raises(ConfigError) as e:
        config.parse("workers: 2\nstatsd:\n  host: ${GP_UNSET}\n", "e.yaml")
    assert str(e.value).startswith("e.yaml:3: statsd.host: environment variable GP_UNSET is not set")
    f = tmp_path / "e.yaml"
    f.write_text("workers: 2\nstatsd:\n  host: ${GP_UNSET}\n")
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(f)], capture_output=True, text=True,
                       env=ENV)
    assert r.returncode == 1 and f"{f}:3: statsd.host: environment variable GP_UNSET" in r.stderr


def readme_yaml_blocks():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M)]


def jwks():
    """A JWKS with one RSA public key, for the README's jwks_file."""
    import base64
    from cryptography.hazmat.primitives.asymmetric import rsa
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()

    def b64(i):
        return base64.urlsafe_b64encode(i.to_bytes((i.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
                                 "n": b64(n.n), "e": b64(n.e)}]})


# A block that starts "# NAME: ..." is the file NAME that the other examples name
FILES = {m.group(1): block for _, block in readme_yaml_blocks()
         for m in [re.match(r"# ([\w.-]+\.ya?ml):", block)] if m}


@pytest.mark.parametrize("line,block", [(n, b) for n, b in readme_yaml_blocks()
                                        if not re.match(r"# [\w.-]+\.ya?ml:", b)],
                         ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_readme_yaml_block_passes_gproxy_check(tmp_path, line, block):
    (tmp_path / "users.htpasswd").write_text("")     # the file the forward-proxy example names
    (tmp_path / "jwks.json").write_text(jwks())      # and the gateway example
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    f = tmp_path / f"readme-{line}.yaml"
    f.write_text(block)
    r = subprocess.run([sys.executable, "-m", "gproxy.cli", "check", str(f)], capture_output=True,
                       text=True, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, f"README.md line {line}: {r.stderr}"
