#!/usr/bin/env python3
"""The cache store candidates side by side: what a hit and a miss cost in
the store alone, one process, for 1 KiB and 1 MiB bodies.

    python3 bench/cache_store.py [N]

    gproxy      cachestore: a body file per response + a SQLite (WAL) index
    diskcache   diskcache.Cache (SQLite + files), bodies by file handle
                (``read=True``), LRU eviction policy
    lmdb        one LMDB environment, the body in the value (a hit copies it)

hit  = find the entry and read its body; miss = write a body and index it.
Microseconds per operation, best of 3 runs of N. diskcache and lmdb are
measured only when importable (``pip install diskcache lmdb`` into any
path on PYTHONPATH); gproxy does not depend on them.
"""

import io
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxy.cachestore import READ_SIZE, Store  # noqa: E402


def ours(path, body, keys):
    s = Store(path, 1 << 34)

    def write(k):
        w = s.writer(k, "", k)
        w.write(body)
        w.finish({"status": 200, "vary": []}, time.time())

    def hit(k):
        e = s.variants(k)[0]
        with s.open_body(e) as f:
            while f.read(READ_SIZE):
                pass
    return write, hit


def diskcache_(path, body, keys):
    import diskcache
    c = diskcache.Cache(path, size_limit=1 << 34, eviction_policy="least-recently-used")

    def write(k):
        c.set(k, io.BytesIO(body), read=True)

    def hit(k):
        f = c.get(k, read=True)
        while f.read(READ_SIZE):
            pass
        f.close()
    return write, hit


def lmdb_(path, body, keys):
    import lmdb
    env = lmdb.open(path, map_size=1 << 34)

    def write(k):
        with env.begin(write=True) as t:
            t.put(k.encode(), body)

    def hit(k):
        with env.begin() as t:
            bytes(t.get(k.encode()))
    return write, hit


def best(fn, keys):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for k in keys:
            fn(k)
        times.append(time.perf_counter() - t0)
    return min(times) / len(keys) * 1e6


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print("| store | body | miss (write) us | hit (read) us |\n|---|---|---|---|")
    for name, make in (("gproxy", ours), ("diskcache", diskcache_), ("lmdb", lmdb_)):
        for label, size in (("1 KiB", 1024), ("1 MiB", 1 << 20)):
            count = n if size < 65536 else max(50, n // 20)
            d = tempfile.mkdtemp(prefix="gproxy-store-bench-")
            try:
                write, hit = make(d, os.urandom(size), None)
            except ImportError:
                shutil.rmtree(d)
                break
            keys = [f"example.com/obj/{i}" for i in range(count)]
            w = best(write, keys)
            h = best(hit, keys)
            print(f"| {name} | {label} | {w:.0f} | {h:.0f} |")
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
