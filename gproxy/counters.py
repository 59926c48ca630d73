"""Live traffic figures shared by every worker: one counters file per worker,
summed by the supervisor (``/status``, ``/metrics``) and by the balancers of
the other workers (global ``least_conn``).

Rule 1: one writer per file. Each worker creates ``stats-<pid>.live`` in the
        runtime directory of its arbiter and mmaps it; only it writes there.
        Nobody takes a lock and a count costs no syscall: an increment is one
        item assignment on a ``memoryview`` of the mapping (0.23 us, measured
        against 0.28 us for ``struct.pack_into`` and 1.5 us for
        prometheus_client's multiprocess counter, which locks; see
        bench/README.md). Writing straight into the mapping, rather than
        flushing a private copy every second, means a killed worker loses
        no count at all.
Rule 2: a file describes itself: a header, then the JSON list of its slots'
        names (``["requests", route, upstream, backend, "2xx"]``...), then
        the int64 slots. Readers sum by name, so workers of two configs (a
        HUP while old workers drain) add up correctly.
Rule 3: a file appears complete: it is written under a temporary name and
        renamed into place.
Rule 4: counters never go backwards. When a worker is gone the supervisor
        adds its counters (not its gauges) into the retired totals, saves
        them (``retired.json``, so a restarted supervisor keeps them) and
        removes the file. Gauges (active requests, tunnels) are absolute
        per worker and summed over live workers only, so a worker killed
        mid-request leaves no gauge off.
Rule 5: aligned 8-byte stores are atomic on x86-64 and arm64, so a reader
        sees a slot's old or new value, never a torn one; figures from
        different slots may be a request apart, which a monitor accepts.
"""

import json
import logging
import mmap
import os
import struct
import threading
import time
from bisect import bisect_left

log = logging.getLogger("gproxy.error")

PREFIX, SUFFIX = "stats-", ".live"
DUMP_PREFIX, DUMP_SUFFIX = "dump-", ".sock"    # a worker's dump socket (observe.py)
RETIRED = "retired.json"
MAGIC = b"GPLS"
LAYOUT = 1
_HEADER = struct.Struct("<4sIIIId")     # magic, layout, pid, names length, slots, started
HEADER = 64
SCAN_EVERY = 1.0            # seconds between looks for other workers' files

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
# Latency bucket bounds in seconds (Prometheus ``le``): the client libraries'
# default set, extended to 60 s (nginx proxy_read_timeout) and 1 ms.
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BUCKETS = len(BOUNDS) + 1   # the last is +Inf
# The error kinds of errors.py, plus "other" for any kind not listed.
KINDS = ("connect_error", "timeout", "reset", "invalid_response", "dns_error", "no_backend",
         "client_abort", "no_route", "bad_request", "body_too_large", "unsupported_coding",
         "forbidden", "proxy_auth", "other")
GAUGES = frozenset(("active", "requests_active", "tunnels_active"))
# One block per (route, upstream, backend): the response classes, bytes each
# way, the duration sum (microseconds) and the duration buckets.
BLOCK = (*(("requests", c) for c in CLASSES), ("bytes_in",), ("bytes_out",),
         ("duration_sum_us",), *(("duration_bucket", i) for i in range(BUCKETS)))
B_BYTES_IN, B_SUM = len(CLASSES), len(CLASSES) + 2
B_BUCKETS = B_SUM + 1


def stats_path(runtime_dir, pid):
    return os.path.join(runtime_dir, f"{PREFIX}{pid}{SUFFIX}")


def layout(cfg):
    """The slot names of a worker running ``cfg``, in file order: gauges
    first, then counters; each upstream's ``active`` slots are contiguous
    (they are the balancer's in-flight array)."""
    names = [("requests_active",), ("tunnels_active",), ("tunnels",), ("tunnel_bytes_up",),
             ("tunnel_bytes_down",)]
    for up in cfg.upstreams.values():
        names += [("active", up.name, b.name) for b in up.backends]
    for up in cfg.upstreams.values():
        names.append(("retries", up.name))
        for who in [b.name for b in up.backends] + [""]:
            names.append(("attempts", up.name, who))
            names += [("errors", up.name, who, k) for k in KINDS]
    names += [("errors", "", "", k) for k in KINDS]
    keys = [(r.name, r.upstream, b.name) for r in cfg.routes for b in cfg.upstreams[r.upstream].backends]
    keys += [(r.name, r.upstream, "") for r in cfg.routes] + [("", "", "")]
    for key in keys:
        names += [(s[0], *key, *s[1:]) for s in BLOCK]
    return names


def bucket(seconds):
    return bisect_left(BOUNDS, seconds)


# --- the worker's file -------------------------------------------------------------

class WorkerCounters:
    """One worker's slots, written in place. Without a runtime directory (no
    supervisor) the slots live in anonymous memory, so callers never branch."""

    def __init__(self, cfg, runtime_dir=None, pid=None):
        self.names = layout(cfg)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.pid = pid or os.getpid()
        self.runtime_dir = runtime_dir
        payload = json.dumps(self.names, separators=(",", ":")).encode()
        values_at = HEADER + (len(payload) + 7) // 8 * 8
        size = values_at + 8 * len(self.names)
        header = _HEADER.pack(MAGIC, LAYOUT, self.pid, len(payload), len(self.names), time.time())
        if runtime_dir:
            self.path = stats_path(runtime_dir, self.pid)
            self.mm = _create(self.path, header + bytes(HEADER - len(header)) + payload, size)
        else:
            self.path, self.mm = None, mmap.mmap(-1, size)
        self.slots = memoryview(self.mm)[values_at:].cast("q")
        ix = self.index
        self.requests_active, self.tunnels_active = ix[("requests_active",)], ix[("tunnels_active",)]
        self.blocks = {(n[1], n[3]): i for n, i in ix.items() if n[0] == "requests" and n[4] == "1xx"}
        self.up_base = {u: ix[("retries", u)] for u in cfg.upstreams}
        self.err = {(n[1], n[2], n[3]): i for n, i in ix.items() if n[0] == "errors"}
        self.attempt = {(n[1], n[2]): i for n, i in ix.items() if n[0] == "attempts"}

    def inflight(self, upstream):
        """The ``active`` slots of an upstream's backends, as a writable
        sequence: the proxy's ``inflight[i] += 1`` writes the shared gauge
        (the slots are contiguous, see ``layout``)."""
        idx = [i for nm, i in self.index.items() if nm[0] == "active" and nm[1] == upstream]
        return self.slots[idx[0]:idx[-1] + 1]

    # -- the events (each a few slot writes) -----------------------------------

    def request_started(self):
        self.slots[self.requests_active] += 1

    def record(self, ex):
        """One finished request (``ex`` is the proxy's Exchange, read only)."""
        s = self.slots
        s[self.requests_active] -= 1
        route = ex.route or ""
        base = self.blocks.get((route, ex.backend or ""))
        if base is None:
            base = self.blocks.get((route, "")) or self.blocks[("", "")]
        s[base + _CLASS.get(ex.status // 100, 5)] += 1
        nbytes = ex.body.nbytes if ex.body is not None else ex.bytes_in
        if nbytes:
            s[base + B_BYTES_IN] += nbytes
        if ex.bytes_out:
            s[base + B_BYTES_IN + 1] += ex.bytes_out
        elapsed = time.time() - ex.start
        s[base + B_SUM] += int(elapsed * 1e6)
        s[base + B_BUCKETS + bisect_left(BOUNDS, elapsed)] += 1
        up = ex.upstream
        if up is None or up not in self.up_base:
            if ex.error is not None and ex.error not in ATTEMPT_KINDS:
                s[self.err.get(("", "", ex.error)) or self.err[("", "", "other")]] += 1
            return
        if ex.retries:
            s[self.up_base[up]] += ex.retries
        if ex.upstream_start is not None:
            s[self.attempt.get((up, ex.backend)) or self.attempt[(up, "")]] += 1
        if ex.error is not None and ex.error not in ATTEMPT_KINDS:
            who = ex.backend if ex.error != "no_backend" else ""
            s[self.err.get((up, who, ex.error)) or self.err.get((up, who, "other"))
              or self.err[(up, "", "other")]] += 1

    def attempt_failed(self, upstream, backend, kind):
        s = self.slots
        if upstream is None or upstream not in self.up_base:
            s[self.err.get(("", "", kind)) or self.err[("", "", "other")]] += 1
            return
        key = backend if (upstream, backend) in self.attempt else ""
        s[self.attempt[(upstream, key)]] += 1
        s[self.err.get((upstream, key, kind)) or self.err[(upstream, key, "other")]] += 1

    def tunnel_opened(self):
        self.slots[self.tunnels_active] += 1
        self.slots[self.tunnels_active + 1] += 1

    def tunnel_closed(self, bytes_up, bytes_down):
        s = self.slots
        s[self.tunnels_active] -= 1
        s[self.tunnels_active + 2] += bytes_up
        s[self.tunnels_active + 3] += bytes_down


_CLASS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
# Failed attempts are counted per attempt (``attempt_failed``), with their
# backend; ``record`` must not count them again (as stats.BACKEND_KINDS).
ATTEMPT_KINDS = frozenset(("connect_error", "timeout", "reset", "invalid_response", "dns_error"))


def _create(path, head, size):
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, head)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return mm


# --- reading other workers' files -------------------------------------------------

class Peer:
    """Another worker's file, mapped read-only."""

    def __init__(self, path):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, lay, self.pid, n, count, self.started = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC or lay != LAYOUT:
            mm.close()
            raise ValueError(f"{path}: not a gproxy counters file")
        self.names = [tuple(x) for x in json.loads(mm[HEADER:HEADER + n])]
        at = HEADER + (n + 7) // 8 * 8
        self.mm = mm
        self.slots = memoryview(mm)[at:at + 8 * count].cast("q")
        self.index = {nm: i for i, nm in enumerate(self.names)}
        self.ident = f"{self.pid}:{self.started!r}"

    def alive(self):
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not _zombie(self.pid)

    def close(self):
        self.slots.release()
        self.mm.close()


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False


def _files(runtime_dir):
    try:
        names = os.listdir(runtime_dir)
    except OSError:
        return []
    return [os.path.join(runtime_dir, n) for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX)]


def _map_new(peers, paths):
    """Map the files of ``paths`` not in ``peers`` yet; True when one was added."""
    added = False
    for path in paths:
        if path not in peers:
            try:
                peers[path] = Peer(path)
            except (OSError, ValueError) as e:     # half-created, or not ours
                log.debug("live stats: skipping %s: %s", path, e)
                continue
            added = True
    return added


class Peers:
    """The other live workers' files, as one worker sees them; rescanned at
    most every ``SCAN_EVERY`` seconds (one listdir), never per request."""

    def __init__(self, runtime_dir, own_pid):
        self.runtime_dir, self.own = runtime_dir, own_pid
        self.peers = {}
        self.next_scan = 0.0
        self.generation = 0

    def scan(self, now):
        self.next_scan = now + SCAN_EVERY
        own = stats_path(self.runtime_dir, self.own)
        seen = {p for p in _files(self.runtime_dir) if p != own}
        if _map_new(self.peers, seen):
            self.generation += 1
        for path, p in list(self.peers.items()):
            if path not in seen or not p.alive():
                del self.peers[path]
                self.generation += 1


class GlobalLoad:
    """In-flight requests per backend of one upstream, summed over every
    worker: what ``least_conn`` and ``random`` compare (nginx ``zone``).
    A read-only sequence, so the balancer stays a pure function of it."""

    __slots__ = ("own", "peers", "upstream", "names", "generation", "views")

    def __init__(self, own, peers, upstream, names):
        self.own, self.peers, self.upstream, self.names = own, peers, upstream, names
        self.generation, self.views = -1, []

    def __len__(self):
        return len(self.own)

    def __getitem__(self, i):
        peers = self.peers
        now = time.monotonic()
        if now >= peers.next_scan:
            peers.scan(now)
        if self.generation != peers.generation:
            self._rebuild()
        total = self.own[i]
        for slots, where in self.views:
            j = where[i]
            if j is not None:
                total += slots[j]
        return total

    def _rebuild(self):
        self.views = []
        for p in self.peers.peers.values():
            where = [p.index.get(("active", self.upstream, b)) for b in self.names]
            if any(j is not None for j in where):
                self.views.append((p.slots, where))
        self.generation = self.peers.generation


# --- the supervisor: sums, retirement, the latency window ----------------------------

class Totals:
    """Every worker's figures summed, with the retired ones (Rule 4)."""

    def __init__(self, runtime_dir, window=60.0):
        self.runtime_dir = runtime_dir
        self.window = window
        self.peers = {}
        self.retired, self.retired_ids = {}, []
        self.samples = []           # (monotonic, {histogram key: [counts]})
        self.lock = threading.Lock()    # the admin threads read while the main loop retires
        self._load_retired()

    def _load_retired(self):
        try:
            with open(os.path.join(self.runtime_dir, RETIRED), encoding="utf-8") as f:
                saved = json.load(f)
            self.retired = {tuple(k): v for k, v in saved["counters"]}
            self.retired_ids = saved["ids"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as e:
            log.warning("live stats: %s unreadable (%s); retired counts start from zero", RETIRED, e)

    def _save_retired(self):
        path = os.path.join(self.runtime_dir, RETIRED)
        data = {"counters": [[list(k), v] for k, v in self.retired.items()], "ids": self.retired_ids[-1000:]}
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(path + ".tmp", path)
        except OSError as e:
            log.error("live stats: cannot save %s: %s", path, e.strerror)

    def refresh(self):
        """Map new workers' files, retire the dead ones."""
        seen = set(_files(self.runtime_dir))
        _map_new(self.peers, seen)
        for path, p in list(self.peers.items()):
            if path not in seen:
                del self.peers[path]
            elif not p.alive():
                self.retire(path, p)

    def retire(self, path, p):
        if p.ident not in self.retired_ids:
            for name, v in zip(p.names, p.slots.tolist()):
                if v and name[0] not in GAUGES:
                    self.retired[name] = self.retired.get(name, 0) + v
            self.retired_ids.append(p.ident)
            self._save_retired()
        del self.peers[path]
        p.close()
        for gone in (path, os.path.join(self.runtime_dir, f"{DUMP_PREFIX}{p.pid}{DUMP_SUFFIX}")):
            try:
                os.unlink(gone)
            except FileNotFoundError:
                pass

    def tick(self, now):
        """Once a second (the supervisor's loop): look for new and dead
        workers, keep a histogram sample; the sums, for the gauges."""
        with self.lock:
            self.refresh()
            sums = self.sums()
            self.sample(now, sums)
            return sums

    def snapshot(self):
        """(sums, histograms over the window, workers), consistent together."""
        with self.lock:
            self.refresh()      # a worker started since the last tick counts at once
            sums = self.sums()
            return sums, self.windowed(sums), self.workers()

    def sums(self):
        """{name: value}: live workers' slots plus the retired counters."""
        out = dict(self.retired)
        for p in list(self.peers.values()):
            for name, v in zip(p.names, p.slots.tolist()):
                if v:
                    out[name] = out.get(name, 0) + v
        return out

    def workers(self):
        """Per live worker: pid, requests in progress, tunnels open."""
        rows = []
        for p in self.peers.values():
            rows.append({"pid": p.pid, "started": round(p.started, 3),
                         "requests_active": p.slots[p.index[("requests_active",)]],
                         "tunnels_active": p.slots[p.index[("tunnels_active",)]],
                         "requests": sum(v for nm, v in zip(p.names, p.slots.tolist())
                                         if nm[0] == "requests")})
        return sorted(rows, key=lambda r: r["pid"])

    def sample(self, now, sums):
        """Keep the duration histograms every second for the sliding window."""
        hist = histograms(sums)
        self.samples.append((now, hist))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.pop(0)

    def windowed(self, sums):
        """The histograms of the last ``window`` seconds: now minus the oldest sample."""
        now_h = histograms(sums)
        if not self.samples:
            return now_h
        old = self.samples[0][1]
        return {k: [a - b for a, b in zip(v, old.get(k, [0] * BUCKETS))] for k, v in now_h.items()}


def histograms(sums):
    """{(route, upstream, backend): [counts per bucket]} from summed slots."""
    out = {}
    for name, v in sums.items():
        if name[0] == "duration_bucket":
            out.setdefault(name[1:4], [0] * BUCKETS)[name[4]] += v
    return out


def percentile(counts, q):
    """The q-quantile (0..1) of a bucketed distribution, interpolated inside
    its bucket as Prometheus' histogram_quantile does; None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if seen + c >= rank and c:
            lo = BOUNDS[i - 1] if i else 0.0
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            return lo + (BOUNDS[i] - lo) * (rank - seen) / c
        seen += c
    return BOUNDS[-1]
