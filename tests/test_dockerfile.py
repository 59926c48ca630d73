"""The Dockerfile's contract without a container runtime (podman cannot run
containers on the CI machine: see the README): its CMD, run with its ENV in
an empty working directory (no config mounted), serves the built-in default
on $GPROXY_LISTEN, and its HEALTHCHECK command passes against it."""

import json
import os
import re
import subprocess
import sys

from servers import REPO, free_port, wait_until

DOCKERFILE = open(os.path.join(REPO, "Dockerfile")).read()


def instruction(name):
    """The JSON-array arguments of the last ``name`` instruction (continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.*)$", text, re.M)
    assert found, name
    return found[-1]


def test_cmd_with_no_config_serves_the_default_and_the_healthcheck_passes(tmp_path):
    env_line = instruction("ENV")
    image_env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    assert image_env["GPROXY_LISTEN"] == "0.0.0.0:8080"
    port = free_port()
    # the same variables, on loopback and a free port for the test
    env = dict(os.environ, **{k: v.replace("0.0.0.0:8080", f"127.0.0.1:{port}").replace("127.0.0.1:8080", f"127.0.0.1:{port}")
                              for k, v in image_env.items()})
    env.pop("GPROXY_CONFIG", None)
    env["PYTHONPATH"] = REPO
    cmd = json.loads(instruction("CMD"))
    assert cmd[:3] == ["gunicorn", "-c", "python:gproxy.gunicorn_conf"]
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "wb"))
    try:
        health = json.loads(re.search(r"CMD\s+(\[.*\])", instruction("HEALTHCHECK")).group(1))
        assert health[0] == "python"

        def healthy():
            return subprocess.run([sys.executable, *health[1:]], env=env, capture_output=True).returncode == 0
        wait_until(healthy, 15, "the HEALTHCHECK command to pass")
        assert f"Listening at: http://127.0.0.1:{port}" in (tmp_path / "stderr").read_text()
    finally:
        proc.terminate()
        proc.wait(15)
    assert re.search(r"--stop-timeout (\d+)", DOCKERFILE) and "graceful_timeout" in DOCKERFILE
