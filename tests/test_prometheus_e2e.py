"""End to end with the real Prometheus server (Debian's ``prometheus``):
it scrapes gproxy's /metrics with ops/monitoring/prometheus.yml (target and
interval changed) and stores exactly the requests that were sent."""

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from monitoring import _stop as stop_process
from servers import REPO, free_port, wait_until
from test_observe import proxy_of_two, request

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (.ci/install installs it)")


@pytest.fixture
def prometheus(tmp_path):
    procs = []

    def start(target):
        with open(os.path.join(REPO, "ops", "monitoring", "prometheus.yml")) as f:
            cfg = yaml.safe_load(f)
        cfg["global"]["scrape_interval"] = "1s"
        cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        return port

    yield start
    for p in procs:
        stop_process(p)


def query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
    except OSError:
        return None
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_counts_sent(gproxy, backends, prometheus):
    g, aport, _, _ = proxy_of_two(gproxy, backends)
    for i in range(12):
        assert request(g, f"/p{i}")[0] == 200
    for _ in range(3):
        assert request(g, "/status/503")[0] == 503
    port = prometheus(f"127.0.0.1:{aport}")
    wait_until(lambda: query(port, 'up{job="gproxy"}') == 1.0, 30, "Prometheus scraping gproxy")
    wait_until(lambda: query(port, "sum(gproxy_requests_total)") == 15.0, 10, "15 requests in Prometheus")
    assert query(port, 'sum(gproxy_requests_total{code_class="2xx"})') == 12.0
    assert query(port, 'sum(gproxy_requests_total{code_class="5xx"})') == 3.0
    assert query(port, "sum(gproxy_request_duration_seconds_count)") == 15.0
    assert query(port, 'gproxy_upstream_available_backends{upstream="web"}') == 2.0
    assert query(port, "gproxy_workers") == 2.0
