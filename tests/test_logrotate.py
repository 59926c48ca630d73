"""Real logrotate with ops/logrotate.conf, three rotations under load: every
request's access-log line is in one of the files, and every process (the
supervisor too) writes to the new files afterwards."""

import gzip
import os
import shutil
import subprocess
import sys

import pytest

from loadgen import Load
from servers import REPO, free_port, wait_until

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def rotate_conf(tmp_path, g):
    """ops/logrotate.conf with this test's paths (the substitutions its header names)."""
    text = open(os.path.join(REPO, "ops", "logrotate.conf")).read()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    text = (text.replace("/var/log/gproxy", str(tmp_path / "logs"))
            .replace("/opt/gproxy/venv/bin/gproxy", f"{sys.executable} -m gproxy.cli")
            .replace("/etc/gproxy/gproxy.yaml", g.config_path)
            .replace("su gproxy gproxy", f"su {user} {group}"))
    path = tmp_path / "logrotate.conf"
    path.write_text(text)
    return path


def lines(logdir, stem):
    n = []
    for f in sorted(os.listdir(logdir)):
        if f.startswith(stem):
            opener = gzip.open if f.endswith(".gz") else open
            with opener(logdir / f, "rt") as fh:
                n.extend(fh.read().splitlines())
    return n


@pytest.mark.parametrize("buffer", ["", ", buffer: 4KB, flush: 1h"], ids=["unbuffered", "buffered"])
def test_rotation_under_load_loses_no_line(gproxy, backends, tmp_path, buffer):
    """Buffered: the workers hold up to 4 KB of lines each (a 1 h flush),
    written before each USR1 reopen and when they exit."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    b = backends(1)[0]
    g = gproxy(f"""\
listen: ["127.0.0.1:{{port}}"]
workers: 2
admin: {{listen: "127.0.0.1:{free_port()}"}}
access_log: {{format: json, path: {logdir}/access.log{buffer}}}
error_log: {{path: {logdir}/error.log}}
upstreams: {{app: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: app}}]
""")
    wait_until(lambda: g.cli("status").returncode == 0, 10, "the admin endpoint")
    conf = rotate_conf(tmp_path, g)
    state = tmp_path / "logrotate.state"
    load = Load(g.port, connections=3, max_seconds=60).start().progress(50)
    for _ in range(3):
        load.progress(100)
        r = subprocess.run([LOGROTATE, "-f", "-s", str(state), str(conf)], env=g.env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    load.progress(100)
    load.stop()
    assert load.failures == [] and load.ok >= 450, load.summary()
    if not buffer:
        wait_until(lambda: len(lines(logdir, "access.log")) >= load.ok, 5, "every access-log line")
    files = sorted(os.listdir(logdir))
    assert {"access.log", "access.log.1", "access.log.2.gz", "access.log.3.gz"} <= set(files), files
    assert os.path.getsize(logdir / "access.log") > 0       # the workers write to the new file
    # the supervisor and the arbiter write to the new error.log
    assert g.cli("drain", "app", b.url.split("//")[1]).returncode == 0
    wait_until(lambda: "drained backend" in (logdir / "error.log").read_text(), 5,
               "the supervisor's line in the new error.log")
    os.kill(g.proc.pid, 1)          # HUP: the arbiter logs it
    wait_until(lambda: "Handling signal: hup" in (logdir / "error.log").read_text(), 5,
               "the arbiter's line in the new error.log")
    if buffer:
        g.stop(graceful=True)       # the last lines are held until the workers exit
    got = lines(logdir, "access.log")
    print(f"logrotate x3 under load: {load.ok} requests, {len(got)} access-log lines in {files}")
    assert len(got) == load.ok
    assert all(line.startswith("{") and line.endswith("}") for line in got)
