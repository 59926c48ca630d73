#!/usr/bin/env python3
"""Slowloris against gproxy and nginx, side by side.

    python3 bench/slowloris.py [--conns 2500] [--every 5] [--seconds 75] [--proxies gproxy,nginx]

For each proxy (2 workers, the bench backend behind it): open ``--conns``
connections that each send a request line and then one header byte every
``--every`` seconds, never finishing the head; meanwhile open a new normal
connection every second and time its request. Reports how many normal
requests were answered and the slowest, and when the slow connections were
closed (the header timeout: gproxy ``limits.header_timeout``, nginx
``client_header_timeout``, both 60 s by default). Traffic goes to 127.0.0.1
only; every loop is bounded by ``--seconds``; every process is stopped by pid.
"""

import argparse
import os
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402


def attack(port, conns, every, seconds):
    sel = selectors.DefaultSelector()
    slow = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        slow.append(s)
    t0 = time.monotonic()
    closed_at = {}
    normal = []
    next_byte = t0 + every
    next_normal = t0 + 0.5
    while time.monotonic() - t0 < seconds and len(closed_at) < len(slow):
        now = time.monotonic()
        if now >= next_byte:
            for s in slow:
                if s not in closed_at:
                    try:
                        s.send(b"X")
                    except OSError:
                        closed_at[s] = now - t0
            next_byte += every
        if now >= next_normal:
            t = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"GET /1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    data = b""
                    while True:
                        d = c.recv(65536)
                        if not d:
                            break
                        data += d
                ok = data.startswith(b"HTTP/1.1 200")
            except OSError:
                ok = False
            normal.append((ok, time.monotonic() - t))
            next_normal += 1.0
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            try:
                d = s.recv(65536)
            except OSError:
                d = b""
            if not d and s not in closed_at:
                closed_at[s] = time.monotonic() - t0
                sel.unregister(s)
    for s in slow:
        s.close()
    times = sorted(closed_at.values())
    answered = [t for ok, t in normal if ok]
    return {
        "normal": len(normal), "answered": len(answered),
        "within_1s": sum(1 for t in answered if t <= 1.0),
        "slowest_s": max(answered) if answered else None,
        "closed": len(times), "first_close_s": times[0] if times else None,
        "last_close_s": times[-1] if times else None,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", type=int, default=2500)
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=75.0)
    p.add_argument("--proxies", default="gproxy,nginx")
    args = p.parse_args()
    bench.ensure_tools()
    bench.raise_nofile()
    workdir = bench.make_workdir("gproxy-slowloris-")
    try:
        backend = bench.Backend(workdir).start()
        for name in args.proxies.split(","):
            server = bench.SERVERS[name](workdir, backend.port).start()
            r = attack(server.port, args.conns, args.every, args.seconds)
            server.stop()
            print(f"{name}: {args.conns} slow connections (a byte every {args.every:g} s): "
                  f"{r['answered']} of {r['normal']} normal requests answered, "
                  f"{r['within_1s']} within 1 s, slowest {r['slowest_s'] or 0:.3f} s; "
                  f"{r['closed']} slow connections closed, from {r['first_close_s'] or 0:.1f} s "
                  f"to {r['last_close_s'] or 0:.1f} s")
    finally:
        bench.stop_all()


if __name__ == "__main__":
    main()
