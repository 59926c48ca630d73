"""The access log's buffer (nginx ``access_log ... buffer= flush=``): lines
gathered per worker are written within ``flush``, when the buffer fills,
before a USR1 reopen closes the file, and when a worker exits."""

import os

from gunicorn.config import Config as GunicornConfig
from gunicorn.glogging import Logger as GunicornLogger

from gproxy import accesslog, config
from servers import get_status, wait_until


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def conf(b, path, buffer):
    return f"""
listen: ["127.0.0.1:{{port}}"]
workers: 1
access_log: {{format: json, path: {path}, {buffer}}}
upstreams: {{app: {{backends: ["{b.url}"]}}}}
routes: [{{upstream: app}}]
"""


def test_gathered_lines_are_written_within_flush(gproxy, backends, tmp_path):
    b, = backends(1)
    log = str(tmp_path / "access.log")
    g = gproxy(conf(b, log, "buffer: 64KB, flush: 300ms"))
    for i in range(5):
        assert get_status(g, f"/n{i}") == 200
    wait_until(lambda: len(lines(log)) == 5, 3, "5 lines within the 300 ms flush")
    assert [line.count('"target":"/n') for line in lines(log)] == [1] * 5


def test_a_full_buffer_is_written_and_a_stopping_worker_writes_the_rest(gproxy, backends, tmp_path):
    b, = backends(1)
    log = str(tmp_path / "access.log")
    g = gproxy(conf(b, log, "buffer: 1KB, flush: 1h"))
    assert get_status(g, "/first") == 200
    assert lines(log) == [], "one line is held (1 KB buffer, 1 h flush)"
    for i in range(19):
        assert get_status(g, f"/n{i}") == 200
    # every line is over 300 bytes: at most three are held at any time
    wait_until(lambda: len(lines(log)) >= 17, 5, "the full buffers written")
    assert len(lines(log)) < 20, "the last lines are held"
    g.stop(graceful=True)
    got = lines(log)
    assert len(got) == 20 and '"/first"' in got[0], got


def test_usr1_reopen_writes_the_gathered_lines_to_the_old_file_first(tmp_path):
    log = tmp_path / "access.log"
    cfg = config.parse(f"access_log: {{path: {log}, buffer: 64KB, flush: 1h}}").access_log
    try:
        accesslog.setup(cfg)
        accesslog.access(b"before\n")
        os.rename(log, tmp_path / "access.log.1")       # logrotate's move
        # what a worker does on USR1: gunicorn reopens every FileHandler
        GunicornLogger(GunicornConfig()).reopen_files()
        accesslog.access(b"after\n")
        assert lines(tmp_path / "access.log.1") == ["before"]
        assert lines(log) == [], "held until the flush"
    finally:
        accesslog.setup(config.parse("access_log: {format: off}").access_log)
    assert lines(log) == ["after"], "written when the handler was replaced"
