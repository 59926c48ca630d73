"""Health decisions as transcripts (the clock is passed in), and the shared
health table's reader/writer rules in one process."""

import logging
import os

import pytest

from gproxy import config, lifecycle, netaddr
from gproxy.admin import client_allowed
from gproxy.errors import ConfigError
from gproxy.health import ActiveHealth, PassiveHealth, SharedPassive
from gproxy.healthtable import SEQ_AT, TableReader, TableWriter, UpstreamView, _SEQ, encode


# --- active: HAProxy rise/fall ----------------------------------------------------------

def run(h, script, start=0.0, step=1.0):
    """Feed ``script`` ('+' pass, '-' fail); return the state after each result."""
    out = []
    for n, c in enumerate(script):
        h.result(c == "+", start + n * step, "x")
        out.append("U" if h.up else "D")
    return "".join(out)


def test_first_failure_at_start_takes_the_backend_down():
    assert run(ActiveHealth(rise=2, fall=3), "-") == "D"


def test_confirmed_up_needs_fall_consecutive_failures():
    assert run(ActiveHealth(rise=2, fall=3), "+--+---") == "UUUUUUD"


def test_down_needs_rise_consecutive_successes():
    h = ActiveHealth(rise=2, fall=3)
    assert run(h, "-+-++") == "DDDDU"
    assert h.successes == 2 and h.failures == 0


def test_after_coming_back_it_needs_fall_failures_again():
    assert run(ActiveHealth(rise=2, fall=2), "-++-+--") == "DDUUUUD"


def test_restored_state_is_fully_established():
    h = ActiveHealth(rise=2, fall=3, up=True, confirmed=True)
    assert run(h, "--") == "UU"
    h = ActiveHealth(rise=2, fall=3, up=False, confirmed=True)
    assert run(h, "+") == "D"


def test_change_is_reported_with_reason_and_time():
    h = ActiveHealth(rise=1, fall=1)
    assert h.result(True, 1.0, "status 200") is False
    assert h.result(False, 2.0, "status 500") is True
    assert (h.up, h.reason, h.changed_at) == (False, "status 500", 2.0)
    assert h.result(False, 3.0, "status 500") is False


# --- passive, per worker: nginx -------------------------------------------------------

def test_worker_passive_window_and_probe():
    p = PassiveHealth(2, max_fails=2, fail_timeout=10.0)
    p.failure(0, 0.0)
    assert p.usable(0, 0.0)
    p.failure(0, 1.0)
    assert not p.usable(0, 1.0) and not p.usable(0, 11.0)
    assert p.usable(0, 11.1)                # the window from the last failure is over
    p.chosen(0, 11.1)                       # the probe
    p.failure(0, 11.2)                      # fails: out again at once (fails >= max_fails)
    assert not p.usable(0, 11.3)
    p.chosen(0, 21.3)
    p.success(0, 21.4)                      # the probe succeeded: fails reset
    assert p.fails[0] == 0 and p.usable(0, 21.5)


def test_worker_passive_single_backend_and_off():
    single = PassiveHealth(1, max_fails=1, fail_timeout=10.0)
    single.failure(0, 0.0)
    assert single.usable(0, 0.1)
    off = PassiveHealth(2, max_fails=0, fail_timeout=10.0)
    off.failure(0, 0.0)
    assert off.usable(0, 0.1)


# --- passive, shared by all workers (supervisor) ------------------------------------------

def test_shared_max_fails_within_fail_timeout_ejects_for_fail_timeout():
    p = SharedPassive(max_fails=3, fail_timeout=10.0)
    assert p.failure(0.0) is False and p.failure(4.0) is False
    assert p.failure(9.0) is True               # 3 within 10 s (from workers together)
    assert p.ejected(9.0) and p.ejected(18.9) and not p.ejected(19.0)
    assert "3 failures within 10s" in p.reason


def test_shared_failures_outside_the_window_do_not_add_up():
    p = SharedPassive(max_fails=2, fail_timeout=10.0)
    assert p.failure(0.0) is False
    assert p.failure(10.5) is False             # the first one left the window
    assert p.failures_in_window(10.5) == 1
    assert p.failure(11.0) is True


def test_shared_count_restarts_after_an_ejection():
    p = SharedPassive(max_fails=2, fail_timeout=5.0)
    p.failure(0.0)
    assert p.failure(1.0) is True
    assert not p.ejected(6.0)
    assert p.failure(6.5) is False              # one failure after the window: not yet
    assert p.failure(7.0) is True


def test_shared_failure_while_ejected_extends_and_is_not_new():
    p = SharedPassive(max_fails=1, fail_timeout=5.0)
    assert p.failure(0.0) is True
    assert p.failure(3.0) is False              # still ejected: not a new ejection
    assert p.ejected(7.9) and not p.ejected(8.0)


def test_shared_single_backend_and_off():
    assert SharedPassive(1, 10.0, single=True).failure(0.0) is False
    assert SharedPassive(0, 10.0).failure(0.0) is False


# --- the shared table ------------------------------------------------------------------------

@pytest.fixture
def table(tmp_path):
    return str(tmp_path / "health.table")


def test_reader_sees_published_state_and_fails_open_when_stale(table, caplog):
    w = TableWriter(table)
    r = TableReader(table, stale_after=5.0)
    view = UpstreamView(r, "web", ["a:1", "b:2", "new:3"])
    w.publish(100.0, encode({"web": {"a:1": [True, False, 0.0, ""], "b:2": [False, False, 0.0, "down"]}}))
    assert view.usable(0, 100.1) and not view.usable(1, 100.1)
    assert view.usable(2, 100.1), "a backend the table does not know is usable"
    w.publish(101.0)                                    # heartbeat only
    assert r.version == 1 and not view.usable(1, 105.9)
    with caplog.at_level(logging.WARNING, logger="gproxy.error"):
        assert view.usable(1, 106.1) and view.usable(1, 107.0)     # stale: fail open
    assert sum("failing open" in m for m in caplog.messages) == 1, "logged once"
    w.publish(107.0)
    assert not view.usable(1, 107.1)


def test_drain_and_ejection_deadline(table):
    w = TableWriter(table)
    view = UpstreamView(TableReader(table, 5.0), "web", ["a:1", "b:2"])
    w.publish(10.0, encode({"web": {"a:1": [True, True, 0.0, "drained"], "b:2": [True, False, 12.0, "x"]}}))
    assert not view.usable(0, 10.5)
    assert not view.usable(1, 11.9) and view.usable(1, 12.0)


def test_torn_read_retries_then_keeps_the_last_state(table):
    w = TableWriter(table)
    r = TableReader(table, 5.0)
    view = UpstreamView(r, "web", ["a:1"])
    w.publish(1.0, encode({"web": {"a:1": [False, False, 0.0, ""]}}))
    assert not view.usable(0, 1.0)
    _SEQ.pack_into(w.mm, SEQ_AT, w.seq + 1)             # a writer stopped mid-update
    assert not view.usable(0, 1.5), "an odd sequence must not be read as new state"
    assert r.seq == w.seq


def test_a_new_writer_continues_and_restores(table):
    w = TableWriter(table)
    w.publish(1.0, encode({"web": {"a:1": [True, True, 3.0, "drained"]}}))
    _SEQ.pack_into(w.mm, SEQ_AT, w.seq + 1)             # killed mid-update
    w2 = TableWriter(table)
    assert w2.restored == {"web": {"a:1": [True, True, 3.0, "drained"]}}
    assert w2.seq % 2 == 0 and w2.seq > w.seq
    r = TableReader(table, 5.0)
    w2.publish(2.0, encode({}))
    assert r.fresh(2.0) and r.version == w2.version


def test_reader_without_a_table_is_open_and_retries(table):
    r = TableReader(table, 5.0)
    view = UpstreamView(r, "web", ["a:1"])
    assert view.usable(0, 0.0) and r.mm is None
    TableWriter(table).publish(0.1, encode({"web": {"a:1": [False, False, 0.0, ""]}}))
    assert view.usable(0, 0.2), "no reopen before REOPEN seconds"
    assert not view.usable(0, 0.6)


# --- admin, config, runtime directory -------------------------------------------------------

def test_admin_client_allowed():
    nets, none = netaddr.Networks(["10.0.0.0/8"]), netaddr.Networks()
    assert client_allowed("127.0.0.1", none) and client_allowed("::1", none)
    assert client_allowed("::ffff:127.0.0.1", none)
    assert not client_allowed("192.0.2.7", none) and not client_allowed("10.1.2.3", none)
    assert client_allowed("10.1.2.3", nets) and not client_allowed("junk", nets)


@pytest.mark.parametrize("text, want", [
    ("upstreams: {a: {backends: [http://x:1], health_check: {rise: 0}}}",
     "f.yaml:1: upstreams.a.health_check.rise: must be at least 1, got 0"),
    ("upstreams: {a: {backends: [http://x:1], health_check: {expect: 399-200}}}",
     "f.yaml:1: upstreams.a.health_check.expect: expected statuses between 100 and 599, low first"),
    ("upstreams: {a: {backends: [http://x:1], health_check: {path: health}}}",
     "f.yaml:1: upstreams.a.health_check.path: must start with '/'"),
    ("upstreams: {a: {backends: [http://x:1], health_check: {intervall: 1s}}}",
     "f.yaml:1: upstreams.a.health_check.intervall: unknown key"),
    ("upstreams: {a: {backends: [http://x:1], passive: {fail_status: [404]}}}",
     "f.yaml:1: upstreams.a.passive.fail_status[0]: must be at least 500, got 404"),
    ("admin: {listen: nowhere}", "f.yaml:1: admin.listen: expected host:port"),
    ("admin: {allow: [300.1.1.1]}", "f.yaml:1: admin.allow[0]: not an IP address or CIDR block"),
    ("supervisor: {stale_after: soon}", "f.yaml:1: supervisor.stale_after: expected a duration"),
])
def test_config_errors_name_file_line_and_key(text, want):
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.yaml")
    assert str(e.value).startswith(want), str(e.value)


def test_config_defaults_state_their_precedents():
    cfg = config.parse("upstreams: {a: {backends: [http://x:1], health_check: {path: /h}}}")
    hc = cfg.upstreams["a"].health_check
    assert (hc.interval, hc.check_timeout, hc.rise, hc.fall, hc.expect) == (2.0, 2.0, 2, 3, (200, 399))
    assert cfg.admin.listen == "127.0.0.1:9901" and cfg.admin.allow == ()
    assert cfg.supervisor.stale_after == 5.0
    assert cfg.upstreams["a"].passive.fail_status == frozenset()
    assert config.parse("upstreams: {a: {backends: [http://x:1]}}").upstreams["a"].health_check is None


def test_runtime_dir_is_keyed_by_the_arbiter_pid(tmp_path):
    cfg = config.parse(f"runtime_dir: {tmp_path}")
    assert lifecycle.runtime_dir(cfg, 1234) == os.path.join(str(tmp_path), "gproxy-1234")
    assert lifecycle.runtime_dir(cfg, 1234) != lifecycle.runtime_dir(cfg, 1235)


def test_sweep_removes_only_dead_arbiters_dirs(tmp_path):
    dead = tmp_path / "gproxy-999999999"
    live = tmp_path / f"gproxy-{os.getppid()}"
    other = tmp_path / "unrelated"
    for d in (dead, live, other):
        d.mkdir()
    lifecycle.sweep_stale(str(tmp_path / f"gproxy-{os.getpid()}"))
    assert not dead.exists() and live.exists() and other.exists()

