"""Talking to a running gproxy for the operator commands (``gproxy reload``,
``status``, ``drain``, ``reopen-logs``, ``drain-instance``): its admin
endpoint and its arbiter.

An adapter: plain ``http.client`` to the admin endpoint, ``/proc`` and
signals for the arbiter. Everything it finds out is checked against the
config file the operator named, so a command never acts on another
instance that happens to hold the admin port:

Rule 1: the arbiter is the pid in ``pidfile`` when the config sets one
        (gunicorn writes it); ``/status`` must name the same arbiter.
Rule 2: without a pidfile, the arbiter is the one ``/status`` names, and the
        config file that instance runs (resolved against the arbiter's working
        directory) must be the file given to the command.
"""

import hashlib
import http.client
import json
import os
import time

from . import netaddr


class ControlError(Exception):
    """What the command prints before exiting 1."""


def admin_request(address, method, path, timeout=10):
    """(status, decoded JSON or text) from the admin endpoint at ``host:port``."""
    try:
        host, port = netaddr.split(address)
    except ValueError as e:
        raise ControlError(f"admin address {address!r}: {e}") from None
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request(method, path)
        r = c.getresponse()
        body = r.read()
        c.close()
    except OSError as e:
        raise ControlError(f"cannot reach the admin endpoint at {address}: {e.strerror or e}") from None
    text = body.decode("utf-8", "replace")
    if r.getheader("Content-Type", "").startswith("application/json"):
        return r.status, json.loads(text)
    return r.status, text


def read_pidfile(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise ControlError(f"cannot read the arbiter's pid from {path}: "
                           f"{getattr(e, 'strerror', None) or e}") from None


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def instance_config_file(st):
    """The config file the instance behind ``/status`` runs, as an absolute
    path (a relative one is taken from its arbiter's working directory)."""
    source = st["config"]["file"]
    if source.startswith("<") or os.path.isabs(source):
        return source
    try:
        return os.path.join(os.readlink(f"/proc/{st['arbiter_pid']}/cwd"), source)
    except OSError:
        return source


def same_file(a, b):
    if a.startswith("<") or b.startswith("<"):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find_instance(address, config_file, pidfile):
    """``/status`` of the instance the operator means, checked (Rules 1, 2)."""
    code, st = admin_request(address, "GET", "/status")
    if code != 200 or not isinstance(st, dict):
        raise ControlError(f"admin endpoint {address} answered {code}: {st}")
    if pidfile:
        pid = read_pidfile(pidfile)
        if pid != st["arbiter_pid"]:
            raise ControlError(
                f"the admin endpoint {address} belongs to another gproxy (arbiter pid "
                f"{st['arbiter_pid']}, config {st['config']['file']}), not to the one in "
                f"{pidfile} (pid {pid}{'' if alive(pid) else ', not running'})")
    elif not same_file(instance_config_file(st), config_file):
        raise ControlError(
            f"the admin endpoint {address} belongs to a gproxy running "
            f"{instance_config_file(st)} (arbiter pid {st['arbiter_pid']}), not {config_file}")
    return st


def file_digest(cfg_source, default_text):
    if cfg_source == "<built-in>":
        return hashlib.sha256(default_text.encode()).hexdigest()
    with open(cfg_source, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def wait_reloaded(address, before, digest, timeout):
    """After a HUP: the supervisor's ``/status`` once it has handled it.
    Returns its ``config`` section; raises if it reports a reload error, shows
    another file, or does not answer within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            code, st = admin_request(address, "GET", "/status", timeout=2)
        except ControlError as e:
            last = str(e)       # a supervisor restarting, or the admin port moving
        else:
            if code == 200 and st["config"].get("reloads", 0) > before:
                c = st["config"]
                if c["reload_error"]:
                    raise ControlError(f"reload failed, the previous configuration keeps serving: "
                                       f"{c['reload_error']}")
                if c["sha256"] != digest:
                    raise ControlError(f"reloaded, but /status shows config sha256 {c['sha256'][:16]}, "
                                       f"not {digest[:16]} (the file changed again?)")
                return c
        time.sleep(0.1)
    raise ControlError(f"no reload seen on {address} within {timeout:g}s" + (f" ({last})" if last else ""))


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True

