"""The cache store: body files plus one SQLite index, shared by every process.

    <path>/index.sqlite     one row per stored response (key, variant, JSON
                            record, size, last use); WAL, so readers never
                            wait for a writer
    <path>/objects/ab/<id>  the body, one file per stored response
    <path>/tmp/<pid>.<id>   a body being written
    <path>/locks/<abc>      4096 lock files for collapsed forwarding (flock)

Rule 1: a body is written to ``tmp/``, renamed into ``objects/`` once it is
        complete, and only then indexed; the index row is the commit point.
        A process killed mid-write leaves a tmp file (removed by the next
        process that opens the store, when its pid is dead) and never a row
        that points at a truncated body.
Rule 2: a row is replaced or deleted before its file is unlinked; a reader
        that opened the file keeps reading the old inode, a reader that
        finds the file gone treats it as a miss.
Rule 3: ``max_size`` bounds the sum of the body sizes; the writer that goes
        past it evicts the least recently used rows in the same transaction.
        Last use is written at most every ``TOUCH_EVERY`` seconds per entry,
        so a hit seldom writes (nginx also updates its LRU lazily).
Rule 4: one SQLite connection per process, opened after fork; every write
        is one short IMMEDIATE transaction.
Rule 5: each process keeps the index rows it read (and the bodies of small
        entries) in memory while ``index.gen``, a counter every writer
        increments after its commit (under ``gen.lock``), has not moved; a
        hit on a hot key then touches neither SQLite nor the file system.
        A reader checks the counter before it queries, so what it keeps is
        never older than the counter value it keeps it under.

Chosen by measurement over diskcache and LMDB: see README "Cache store".
"""

import errno
import fcntl
import hashlib
import io
import json
import logging
import mmap
import os
import sqlite3
import struct
import time

log = logging.getLogger("gproxy.error")

TOUCH_EVERY = 10.0      # seconds between last-use updates of one entry
READ_SIZE = 256 * 1024  # a hit is sent in reads this large
MEMO_ENTRIES = 4096     # index rows kept per process (Rule 5)
MEMO_BODY = 16 * 1024   # bodies up to this size are kept with their row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(
    id TEXT PRIMARY KEY, pkey TEXT NOT NULL, skey TEXT NOT NULL, url TEXT NOT NULL,
    record TEXT NOT NULL, size INTEGER NOT NULL, atime REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS entries_key ON entries(pkey, skey);
CREATE INDEX IF NOT EXISTS entries_atime ON entries(atime);
CREATE INDEX IF NOT EXISTS entries_url ON entries(url);
CREATE TABLE IF NOT EXISTS totals(one INTEGER PRIMARY KEY CHECK (one = 1),
    bytes INTEGER NOT NULL, count INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_ins AFTER INSERT ON entries BEGIN
    UPDATE totals SET bytes = bytes + new.size, count = count + 1; END;
CREATE TRIGGER IF NOT EXISTS entries_del AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - old.size, count = count - 1; END;
"""


def digest(text):
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class Entry:
    """One indexed response: its record (see ``cachepolicy.stored``)."""

    __slots__ = ("id", "record", "atime", "body")

    def __init__(self, id, record, atime):
        self.id, self.record, self.atime = id, record, atime
        self.body = None        # the body itself, once read, when it is small


class Store:
    def __init__(self, path, max_size):
        self.path = path
        self.max_size = max_size
        self._db = None
        self._pid = None
        self._gen = None        # the mmap'd write counter (Rule 5)
        self._memo, self._memo_gen = {}, None

    # -- the connection --------------------------------------------------------

    @property
    def db(self):
        if self._pid != _PID[0]:
            self._open()
        return self._db

    def _open(self):
        for sub in ("objects", "tmp", "locks"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        db = sqlite3.connect(os.path.join(self.path, "index.sqlite"), timeout=10,
                             isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=10000")
        # Every worker opens the index at its first cached request, often at
        # the same moment; switching a new file to WAL takes an exclusive lock
        # that SQLite may refuse at once ("database is locked") rather than
        # wait for: take turns, bounded.
        deadline = time.monotonic() + 10
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                if db.in_transaction:
                    db.execute("ROLLBACK")
                time.sleep(0.02)
        db.execute("PRAGMA synchronous=NORMAL")     # a crash may lose the last rows, not corrupt
        self._gen = _counter(os.path.join(self.path, "index.gen"))
        self._gen_lock = os.open(os.path.join(self.path, "gen.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._db, self._pid = db, os.getpid()
        self._memo, self._memo_gen = {}, None
        self._sweep_tmp()

    def _sweep_tmp(self):
        """Remove bodies left half-written by processes that died (Rule 1)."""
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            pid = name.split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _unlink(os.path.join(tmp, name))

    def object_path(self, id):
        return os.path.join(self.path, "objects", id[:2], id)

    # -- reading ---------------------------------------------------------------

    def variants(self, pkey):
        """Every stored response for a primary key, the newest first."""
        db = self.db
        gen = _GEN.unpack_from(self._gen, 0)[0]     # before the query (Rule 5)
        if gen != self._memo_gen:
            self._memo.clear()
            self._memo_gen = gen
        found = self._memo.get(pkey)
        if found is None:
            rows = db.execute("SELECT id, record, atime FROM entries WHERE pkey = ? "
                              "ORDER BY rowid DESC", (pkey,)).fetchall()
            found = [Entry(i, json.loads(r), a) for i, r, a in rows]
            if len(self._memo) >= MEMO_ENTRIES:
                del self._memo[next(iter(self._memo))]
            self._memo[pkey] = found
        return found

    def open_body(self, entry):
        """The body as a file object, or None when it was evicted meanwhile
        (Rule 2); small bodies are read once and kept (Rule 5)."""
        if entry.body is not None:
            return io.BytesIO(entry.body)
        try:
            f = open(self.object_path(entry.id), "rb", buffering=0)
        except FileNotFoundError:
            return None
        if entry.record.get("size", MEMO_BODY + 1) > MEMO_BODY:
            return f
        with f:
            entry.body = f.read()
        return io.BytesIO(entry.body)

    def touch(self, entry, now):
        if now - entry.atime >= TOUCH_EVERY:
            entry.atime = now
            with _write(self.db) as db:
                db.execute("UPDATE entries SET atime = ? WHERE id = ?", (now, entry.id))

    def _changed(self):
        """Count a committed change (Rule 5); writers take turns on gen.lock
        so that no increment is lost."""
        fd = self._gen_lock
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            n = _GEN.unpack_from(self._gen, 0)[0]
            _GEN.pack_into(self._gen, 0, (n + 1) & 0xFFFFFFFFFFFFFFFF)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- writing ---------------------------------------------------------------

    def writer(self, pkey, skey, url):
        return Writer(self, pkey, skey, url)

    def commit(self, pkey, skey, url, id, record, size, now):
        """Index a complete body (already renamed into place); evict past max_size."""
        doomed = []
        with _write(self.db) as db:
            old = db.execute("SELECT id FROM entries WHERE pkey = ? AND skey = ?",
                             (pkey, skey)).fetchone()
            if old:
                db.execute("DELETE FROM entries WHERE id = ?", old)
                doomed.append(old[0])
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (id, pkey, skey, url, _dumps(record), size, now))
            doomed += self._evict(db)
        self._changed()
        for d in doomed:
            _unlink(self.object_path(d))

    def _evict(self, db):
        total, = db.execute("SELECT bytes FROM totals").fetchone()
        doomed = []
        while total > self.max_size:
            rows = db.execute("SELECT id, size FROM entries ORDER BY atime LIMIT 64").fetchall()
            if not rows:
                break
            for id, size in rows:
                if total <= self.max_size:
                    break
                db.execute("DELETE FROM entries WHERE id = ?", (id,))
                doomed.append(id)
                total -= size
        return doomed

    def update(self, entry, record):
        """Replace a record after a 304 (the body stays)."""
        with _write(self.db) as db:
            db.execute("UPDATE entries SET record = ? WHERE id = ?", (_dumps(record), entry.id))
        self._changed()

    def remove(self, ids):
        if not ids:
            return 0
        with _write(self.db) as db:
            n = 0
            for id in ids:
                n += db.execute("DELETE FROM entries WHERE id = ?", (id,)).rowcount
        self._changed()
        for id in ids:
            _unlink(self.object_path(id))
        return n

    def remove_key(self, pkey):
        ids = [r[0] for r in self.db.execute("SELECT id FROM entries WHERE pkey = ?", (pkey,))]
        return self.remove(ids)

    def purge(self, url, prefix=False):
        """Delete entries whose URL (``host/path?query``) is ``url``, or
        starts with it; returns how many."""
        if prefix:
            like = url.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = self.db.execute("SELECT id FROM entries WHERE url LIKE ? ESCAPE '\\'", (like,))
        else:
            rows = self.db.execute("SELECT id FROM entries WHERE url = ?", (url,))
        return self.remove([r[0] for r in rows])

    def stats(self):
        total, count = self.db.execute("SELECT bytes, count FROM totals").fetchone()
        return {"path": self.path, "entries": count, "bytes": total, "max_size": self.max_size}

    # -- collapsed forwarding --------------------------------------------------

    def try_lock(self, pkey):
        """An exclusive flock for one key (striped), or None when another
        request (any process) holds it. Closing the file releases it."""
        name = os.path.join(self.path, "locks", digest(pkey)[:3])   # 4096 stripes
        f = open(name, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        return f


class Writer:
    """A body being written: ``write`` pieces, then ``finish`` or ``abort``."""

    __slots__ = ("store", "pkey", "skey", "url", "id", "tmp", "file", "size")

    def __init__(self, store, pkey, skey, url):
        self.store, self.pkey, self.skey, self.url = store, pkey, skey, url
        self.id = os.urandom(16).hex()
        self.store.db  # noqa: B018 -- open (and sweep) before creating a tmp file
        self.tmp = os.path.join(store.path, "tmp", f"{os.getpid()}.{self.id}")
        self.file = open(self.tmp, "wb")
        self.size = 0

    def write(self, piece):
        self.file.write(piece)
        self.size += len(piece)

    def finish(self, record, now):
        self.file.close()
        final = self.store.object_path(self.id)
        try:
            os.rename(self.tmp, final)
        except FileNotFoundError:       # the first body under this prefix
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(self.tmp, final)
        try:
            self.store.commit(self.pkey, self.skey, self.url, self.id, record, self.size, now)
        except BaseException:
            _unlink(final)
            raise

    def abort(self):
        if not self.file.closed:
            self.file.close()
        _unlink(self.tmp)


class _write:
    """One IMMEDIATE transaction (takes the write lock at once, so two
    writers queue on busy_timeout instead of failing on upgrade)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


_GEN = struct.Struct("=Q")

# This process's pid, kept current across fork: os.getpid() is a system
# call, and ``Store.db`` asks on every lookup.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _counter(path):
    """The shared write counter, mapped (created as 8 zero bytes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < _GEN.size:
            os.posix_fallocate(fd, 0, _GEN.size)
        return mmap.mmap(fd, _GEN.size)
    finally:
        os.close(fd)


def _dumps(record):
    """The record as JSON, without what the rules derived from it ("_" keys)."""
    return json.dumps({k: v for k, v in record.items() if not k.startswith("_")})


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
