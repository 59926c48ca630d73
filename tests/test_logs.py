"""Logs an operator can use: upstream failures name route, upstream,
backend, what failed and after how long; JSON or text; files that survive
logrotate (reopened on USR1); no credential ever written."""

import glob
import hashlib
import http.client
import json
import os
import signal

import pytest

from monitoring import StatsdListener, wait_until
from servers import free_port, raw_request


def get(g, path, headers=None, method="GET", body=None):
    c = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    try:
        r.read()
    except http.client.IncompleteRead:
        pass        # /cut/N: the upstream broke off mid-body, so does the proxy
    c.close()
    return r.status


def conf(b, top=""):
    dead = f"http://127.0.0.1:{free_port()}"
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
{top}
upstreams:
  web.pool:
    backends: ["{b.url}"]
    timeouts: {{response_header: 300ms}}
    retries: 0
  dead: {{backends: ["{dead}"]}}
routes:
  - {{path_prefix: /dead/, upstream: dead, name: down}}
  - {{path_prefix: /, upstream: web.pool, name: main}}
"""


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_error_log_names_route_upstream_backend_kind_and_time(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b, top="error_log: {format: json}"))
    assert get(g, "/dead/x") == 502
    assert get(g, "/sleep/1500") == 504
    fails = wait_until(lambda: [r for r in json_lines(g.stderr()) if r.get("event") == "upstream_failed"]
                       if len([r for r in json_lines(g.stderr()) if r.get("event") == "upstream_failed"]) >= 2
                       else None, 5, "two upstream failure lines")
    by_kind = {r["kind"]: r for r in fails}
    assert set(by_kind) == {"connect_error", "timeout"}, fails
    c = by_kind["connect_error"]
    assert (c["route"], c["upstream"], c["logger"], c["level"]) == ("down", "dead", "gproxy.error", "warning")
    assert c["backend"].startswith("127.0.0.1:") and c["after"] >= 0 and c["request_id"]
    t = by_kind["timeout"]
    assert (t["route"], t["upstream"], t["backend"]) == ("main", "web.pool", f"127.0.0.1:{b.port}")
    assert 0.25 <= t["after"] < 5, t
    assert "no response header within 0.3s" in t["message"], t
    # gunicorn's own lines are JSON too: every stderr line parses
    lines = [line for line in g.stderr().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), lines
    assert any(r["logger"] == "gunicorn.error" and "Booting worker" in r["message"]
               for r in json_lines(g.stderr()))


def test_text_error_log_line_says_what_failed_where_and_after_how_long(gproxy, backends):
    b, = backends(1)
    g = gproxy(conf(b))
    assert get(g, "/sleep/1500") == 504
    line = wait_until(lambda: next((x for x in g.stderr().splitlines() if "upstream timeout" in x), None),
                      5, "the timeout line")
    assert "[WARNING] gproxy.error: upstream timeout: route=main upstream=web.pool " \
           f"backend=127.0.0.1:{b.port} after=0." in line, line


def test_log_files_are_reopened_on_usr1_after_logrotate_moves_them(gproxy, backends, tmp_path):
    b, = backends(1)
    logs = tmp_path / "logs"
    logs.mkdir()
    access, error = logs / "access.log", logs / "error.log"
    g = gproxy(conf(b, top=f'access_log: {{format: json, path: "{access}"}}\n'
                            f'error_log: {{format: json, path: "{error}"}}'))
    assert get(g, "/before") == 200 and get(g, "/dead/before") == 502
    wait_until(lambda: access.exists() and "/dead/before" in access.read_text()
               and "upstream_failed" in error.read_text(), 5, "the first lines")
    # what logrotate does: move the files away, then signal the master
    os.rename(access, logs / "access.log.1")
    os.rename(error, logs / "error.log.1")
    os.kill(g.proc.pid, signal.SIGUSR1)
    wait_until(lambda: access.exists() and error.exists(), 10, "the log files to be reopened")
    assert get(g, "/after") == 200 and get(g, "/dead/after") == 502
    wait_until(lambda: "/dead/after" in access.read_text() and "upstream_failed" in error.read_text(),
               5, "the new lines in the new files")
    old_access = (logs / "access.log.1").read_text()
    assert "/before" in old_access and "/after" not in old_access
    assert [r["target"] for r in json_lines(access.read_text())] == ["/after", "/dead/after"]
    assert "/dead/after" not in (logs / "error.log.1").read_text()
    assert all(line.startswith("{") for line in error.read_text().splitlines())


GOOD_KEY = "sekret-goodkey-4719"
SECRETS = {
    "Authorization": "Bearer sekret-authz-4711",
    "Proxy-Authorization": "Basic c2VrcmV0LXByb3h5LTQ3MTI=",
    "Cookie": "session=sekret-cookie-4713",
    "X-Api-Key": "sekret-apikey-4714",
    "Api-Key": "sekret-apikey-4715",
}


@pytest.mark.parametrize("fmt", [("json", "json"), ("combined", "text")])
def test_credentials_never_reach_any_log_or_metric(gproxy, backends, tmp_path, fmt):
    access_fmt, error_fmt = fmt
    b, = backends(1)
    lst = StatsdListener()
    error = tmp_path / "error.log"
    try:
        # gateway routes: an API key that verifies (its consumer is logged, not
        # the key), one that does not, a rate limit keyed by the key header,
        # and a Redis store whose password must not reach the error log
        keys = tmp_path / "keys.yaml"
        keys.write_text(f'alice: "sha256:{hashlib.sha256(GOOD_KEY.encode()).hexdigest()}"\n')
        g = gproxy(conf(b, top=f"access_log: {{format: {access_fmt}}}\n"
                                f'error_log: {{format: {error_fmt}, path: "{error}", level: debug}}\n'
                                f"statsd: {{port: {lst.port}, gunicorn: true}}\n"
                                f'rate_limit_store: {{url: "redis://:sekret-redis-4718@127.0.0.1:{free_port()}/0"}}')
                   + f'  - {{path_prefix: /gw/, upstream: web.pool, auth: {{api_keys: {{file: "{keys}"}}}}}}\n'
                   + "  - {path_prefix: /rl/, upstream: web.pool, rate_limit: {rate: 1/m, key: 'header:X-Api-Key'}}\n"
                   + "  - {path_prefix: /rlm/, upstream: web.pool, rate_limit: {rate: 1/m, key: route}}\n")
        paths = ["/ok", "/dead/x", "/sleep/1500", "/status/500", "/cut/10", "/gw/wrong", "/rl/1"]
        statuses = [get(g, p, headers=SECRETS) for p in paths]
        assert statuses == [200, 502, 504, 500, 200, 401, 200], statuses
        assert get(g, "/gw/right", headers=dict(SECRETS, **{"X-Api-Key": GOOD_KEY})) == 200
        raw_request(g.port, b"GET /secret HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret-raw-4716\r\n"
                            b"Cookie: a=sekret-raw-4717\r\nContent-Length: 5\r\n\r\nab", timeout=1)
        wait_until(lambda: len([x for x in g.stdout().splitlines() if x.strip()]) >= 9, 10,
                   "nine access log lines")
        wait_until(lambda: lst.counters("gproxy.server.responses."), 5, "metrics")
    finally:
        lst.close()
    assert b.received[0].header("Authorization") == SECRETS["Authorization"], "the test must send them"
    outputs = {"stdout": g.stdout(), "stderr": g.stderr(), "error.log": error.read_text(),
               "statsd": "\n".join(lst.lines())}
    outputs.update({p: open(p, errors="replace").read() for p in glob.glob(str(tmp_path / "**" / "*.log"),
                                                                          recursive=True)})
    assert "upstream_failed" in outputs["error.log"] or "upstream connect_error" in outputs["error.log"]
    assert "rate_limit_store redis://:***@127.0.0.1" in outputs["error.log"], "the store error is logged"
    assert "consumer" in outputs["stdout"] and "alice" in outputs["stdout"]
    for where, text in outputs.items():
        for needle in ("sekret", "c2VrcmV0"):
            assert needle not in text, f"{needle!r} found in {where}"
