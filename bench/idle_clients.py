#!/usr/bin/env python3
"""Hold N idle keep-alive client connections open against a proxy.

    python3 bench/idle_clients.py PORT N PATH

Opens N connections (at most 200 connecting at once, so no listen backlog
overflows), sends one GET on each and checks the 200 and its body length,
then prints one JSON line and waits, holding every connection idle, until a
line arrives on stdin (or --hold seconds pass). It then sends a second GET
on each connection (they must have survived being idle), prints a second
JSON line and closes everything. Loopback only; every step has a timeout.
"""

import argparse
import asyncio
import json
import resource
import sys
import time


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256 if hard == resource.RLIM_INFINITY else min(hard, n + 256)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def one_request(reader, writer, request, timeout):
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = head.split(b" ", 2)[1]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    if status != b"200" or len(body) != length:
        raise ValueError(f"got status {status!r}, want 200")


async def main(args):
    request = f"GET {args.path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    gate = asyncio.Semaphore(200)
    conns, errors = [], []

    async def open_one():
        async with gate:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", args.port), args.timeout)
                await one_request(r, w, request, args.timeout)
                conns.append((r, w))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(args.n)))
    print(json.dumps({"phase": "open", "open": len(conns), "errors": len(errors),
                      "first_errors": errors[:5], "seconds": round(time.monotonic() - t0, 3)}),
          flush=True)

    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    except asyncio.TimeoutError:
        pass

    still, errors2 = 0, []

    async def again(r, w):
        nonlocal still
        async with gate:
            try:
                await one_request(r, w, request, args.timeout)
                still += 1
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                errors2.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(again(r, w) for r, w in conns))
    for _, w in conns:
        w.close()
    print(json.dumps({"phase": "reuse", "ok": still, "errors": len(errors2),
                      "first_errors": errors2[:5]}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("n", type=int)
    p.add_argument("path")
    p.add_argument("--timeout", type=float, default=20.0, help="per connect/request, seconds")
    p.add_argument("--hold", type=float, default=120.0, help="longest hold, seconds")
    a = p.parse_args()
    limit = raise_nofile(a.n)
    if limit < a.n + 64:
        sys.exit(f"RLIMIT_NOFILE is {limit}, need about {a.n + 64}")
    asyncio.run(main(a))
