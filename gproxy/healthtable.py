"""The shared health table and the failure reports: how the supervisor and the
workers share backend health.

Rule 1: only the supervisor writes the table. It is a plain file in the
        runtime directory of this arbiter (``health.table``), mmap'd by every
        process; not ``multiprocessing.shared_memory``, whose resource tracker
        unlinks a segment when a reader exits (before Python 3.13).
Rule 2: readers never block and never make a syscall on the hot path: one
        ``unpack_from`` of the sequence number; an unchanged number means the
        decoded state held by the reader is current.
Rule 3: a torn read retries on the sequence number (a seqlock): the writer
        makes it odd, writes, then makes it even; a reader that saw an odd
        number, or a different number after reading, reads again (bounded;
        after that it keeps its last state).
Rule 4: every publish carries a heartbeat (CLOCK_MONOTONIC, the same clock in
        every process of the host). A reader whose heartbeat is older than
        ``stale_after`` treats every backend as available (fail open) and logs
        that once; it logs again when the table is fresh again.
Rule 5: the payload is decoded only when its version changes (a heartbeat
        alone does not change it), so readers pay for a decode only when some
        backend's state changed.
Rule 6: a process that dies mid-update wedges nothing: there is no lock, and
        the next writer continues from the sequence number it finds.
Rule 7: workers report failures with a non-blocking AF_UNIX datagram
        (``failures.sock``); when the supervisor's queue is full or it is not
        running the report is dropped, never waited for.

Layout (little-endian): magic ``GPHT``, layout u32, seq u64, heartbeat f64,
version u64, payload length u32, padding to 64 bytes, then the JSON payload
``{"upstream": {"backend": [up, drained, ejected_until, reason], ...}, ...}``.
On x86-64 stores are not reordered with other stores, which is what the
seqlock relies on.
"""

import json
import logging
import mmap
import os
import socket
import struct

log = logging.getLogger("gproxy.error")

TABLE = "health.table"
FAILURES = "failures.sock"
SIZE = 1 << 20                  # 1 MiB, sparse: room for about 8,000 backends
HEADER = 64
MAGIC = b"GPHT"
LAYOUT = 1
_MAGIC = struct.Struct("<4sI")
_SEQ = struct.Struct("<Q")
_BODY = struct.Struct("<dQI")
SEQ_AT, BODY_AT = 8, 16
READ_TRIES = 100


def table_path(runtime_dir):
    return os.path.join(runtime_dir, TABLE)


def failures_path(runtime_dir):
    return os.path.join(runtime_dir, FAILURES)


class TableFull(Exception):
    """The payload does not fit in the table."""


# --- the writer (supervisor) ----------------------------------------------------

class TableWriter:
    """The one writer. Reopening an existing table continues its sequence and
    version, and ``restored`` holds what the previous writer last published."""

    def __init__(self, path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self.mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.restored = {}
        self.seq = self.version = 0
        magic, layout = _MAGIC.unpack_from(self.mm, 0)
        if magic == MAGIC and layout == LAYOUT:
            self._restore()
        else:
            _MAGIC.pack_into(self.mm, 0, MAGIC, LAYOUT)

    def _restore(self):
        seq = _SEQ.unpack_from(self.mm, SEQ_AT)[0]
        self.seq = seq + (seq & 1)          # a writer died mid-update: move on
        _, self.version, n = _BODY.unpack_from(self.mm, BODY_AT)
        if 0 < n <= SIZE - HEADER:
            try:
                self.restored = json.loads(self.mm[HEADER:HEADER + n])
            except ValueError as e:
                log.warning("health table %s: previous state unreadable (%s); starting afresh",
                            self.path, e)

    def publish(self, now, payload=None):
        """Write a heartbeat, and the payload (bytes) when given."""
        if payload is not None and len(payload) > SIZE - HEADER:
            raise TableFull(f"health state is {len(payload)} bytes, the table holds {SIZE - HEADER}")
        mm = self.mm
        _SEQ.pack_into(mm, SEQ_AT, self.seq + 1)        # odd: writing
        if payload is not None:
            mm[HEADER:HEADER + len(payload)] = payload
            self.version += 1
            _BODY.pack_into(mm, BODY_AT, now, self.version, len(payload))
        else:
            _BODY.pack_into(mm, BODY_AT, now, self.version, _BODY.unpack_from(mm, BODY_AT)[2])
        self.seq += 2
        _SEQ.pack_into(mm, SEQ_AT, self.seq)            # even: done

    def close(self):
        self.mm.close()


def encode(states):
    """states: {upstream: {backend: (up, drained, ejected_until, reason)}}."""
    return json.dumps(states, separators=(",", ":")).encode()


# --- the reader (workers) -------------------------------------------------------

class TableReader:
    """A worker's view of the table; ``fresh(now)`` is the hot path."""

    REOPEN = 0.5        # seconds between attempts while the file is missing

    def __init__(self, path, stale_after):
        self.path = path
        self.stale_after = stale_after
        self.mm = None
        self.next_open = 0.0
        self.seq = -1
        self.heartbeat = float("-inf")
        self.version = 0
        self.states = {}
        self.was_fresh = False
        self.asked_at = None

    def fresh(self, now):
        """True when the table holds current state (then ``states`` is it).
        One balancing decision asks once per backend with the same ``now``:
        the first answer stands for the rest (one snapshot per decision)."""
        if now == self.asked_at:
            return self.was_fresh
        self.asked_at = now
        mm = self.mm
        if mm is None:
            if now < self.next_open or not self._open(now):
                return False
            mm = self.mm
        if _SEQ.unpack_from(mm, SEQ_AT)[0] != self.seq:
            self._read()
        ok = now - self.heartbeat <= self.stale_after and self.version > 0
        if ok is not self.was_fresh:
            self._changed(ok, now)
        return ok

    def _open(self, now):
        self.next_open = now + self.REOPEN
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size < SIZE:
                return False
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        if _MAGIC.unpack_from(mm, 0) != (MAGIC, LAYOUT):
            mm.close()
            return False
        self.mm = mm
        return True

    def _read(self):
        mm = self.mm
        for _ in range(READ_TRIES):
            s1 = _SEQ.unpack_from(mm, SEQ_AT)[0]
            if s1 & 1:
                continue
            heartbeat, version, n = _BODY.unpack_from(mm, BODY_AT)
            payload = mm[HEADER:HEADER + n] if version != self.version else None
            if _SEQ.unpack_from(mm, SEQ_AT)[0] != s1:
                continue                    # torn: the writer moved on meanwhile
            if payload is not None:
                try:
                    self.states = json.loads(payload)
                except ValueError as e:
                    log.error("health table %s: bad payload (%s); keeping the last state", self.path, e)
                    self.seq = s1
                    return
                self.version = version
            self.seq, self.heartbeat = s1, heartbeat
            return

    def _changed(self, ok, now):
        self.was_fresh = ok
        if ok:
            log.info("health table %s: shared health state in use", self.path)
        elif self.version:
            log.warning("health table %s: no heartbeat for %.1fs (more than %gs); "
                        "failing open: every backend counts as available until the supervisor is back",
                        self.path, now - self.heartbeat, self.stale_after)


class UpstreamView:
    """One upstream's backends, by index, as the table says.
    ``usable(i, now)`` is False only for a backend the supervisor marked down,
    drained or ejected; a backend the table does not know is usable."""

    __slots__ = ("table", "upstream", "names", "version", "flags")

    def __init__(self, table, upstream, names):
        self.table, self.upstream, self.names = table, upstream, list(names)
        self.version = -1
        self.flags = [(True, 0.0)] * len(self.names)

    def usable(self, i, now):
        table = self.table
        if not table.fresh(now):
            return True                     # no supervisor or stale: fail open
        if table.version != self.version:
            self._rebuild()
        up, until = self.flags[i]
        return up and now >= until

    def _rebuild(self):
        table = self.table
        known = table.states.get(self.upstream, {})
        flags = []
        for name in self.names:
            s = known.get(name)
            flags.append((True, 0.0) if s is None else (bool(s[0]) and not s[1], float(s[2])))
        self.flags, self.version = flags, table.version


# --- failure reports ------------------------------------------------------------

class FailureReporter:
    """Worker side: fire-and-forget datagrams to the supervisor."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.warned = False

    def report(self, upstream, backend, kind):
        msg = f"{upstream}\t{backend}\t{kind}".encode("utf-8", "replace")
        try:
            self.sock.sendto(msg, self.path)
        except BlockingIOError:
            pass                            # the supervisor is behind: drop, never wait
        except OSError as e:                # not running (ENOENT, ECONNREFUSED) or worse
            if not self.warned:
                self.warned = True
                log.warning("failure report to %s dropped (%s); ejection stays local to this "
                            "worker until the supervisor listens again", self.path, e.strerror)
        else:
            self.warned = False


class FailureReceiver:
    """Supervisor side: the bound datagram socket; ``receive()`` returns one
    ``(upstream, backend, kind)`` or None after ``timeout`` seconds."""

    def __init__(self, path, timeout=0.5):
        try:
            os.unlink(path)                 # left by a killed supervisor
        except FileNotFoundError:
            pass
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(timeout)

    def receive(self):
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        parts = data.decode("utf-8", "replace").split("\t")
        if len(parts) != 3:
            log.warning("failure report ignored: malformed %r", data[:100])
            return None
        return tuple(parts)

    def close(self):
        self.sock.close()


class WorkerHealth:
    """What one worker holds: the table reader and the failure reporter."""

    def __init__(self, runtime_dir, stale_after):
        self.runtime_dir = runtime_dir
        self.table = TableReader(table_path(runtime_dir), stale_after)
        self.reporter = FailureReporter(failures_path(runtime_dir))

    def view(self, upstream, names):
        return UpstreamView(self.table, upstream, names)
