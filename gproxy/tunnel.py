"""Tunnels: take the client's connection over and splice it to another.

An adapter (sockets and greenlets). Used for CONNECT and for Upgrade
(WebSocket) after the backend's 101.

Rules:
1. The client connection comes from ``downstream.Request.take_over()``,
   with the bytes the client already sent behind the request head; they go
   to the other side first, or they would be lost.
2. When the tunnel ends both sockets are shut down; the server closes the
   client's when the handler returns ``downstream.HANDLED``.
3. The tunnel writes its own access-log record (``finish``), which is also
   where tunnel metrics belong.
4. Two named greenlets copy the two directions. An end of stream from one
   side is passed on as a half-close (``SHUT_WR``) and the other direction
   keeps going; an error, the idle timeout (no byte either way) or the
   maximum duration ends both.
5. Open tunnels count as busy connections of the worker: a graceful reload
   or stop waits for them up to ``graceful_timeout``, then the worker exits
   and they are cut.
"""

import errno
import logging
import socket
import time

import gevent

from . import downstream, errors, h1

log = logging.getLogger("gproxy.error")

CHUNK = 65536

open_tunnels = 0        # tunnels open in this worker, for the logs and gauges


def dial(addresses, port, timeout):
    """A connected socket to the first of ``addresses`` that answers.
    Only the given (already checked) addresses are used: no new lookup."""
    last = None
    for ip in addresses:
        try:
            s = socket.create_connection((str(ip), port), timeout=timeout)
        except (socket.timeout, TimeoutError) as e:
            last = errors.UpstreamConnectTimeout(f"connect {ip}:{port}: timed out")
            last.__cause__ = e
            continue
        except OSError as e:
            last = errors.UpstreamConnectError(f"connect {ip}:{port}: {e.strerror or e}")
            last.__cause__ = e
            continue
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    raise last or errors.UpstreamConnectError("no address to connect to")


class Splice:
    """Copy bytes both ways between ``client`` and ``upstream`` until both
    directions ended, or an error, the idle timeout or the maximum duration."""

    def __init__(self, client, upstream, idle_timeout, max_duration=None):
        self.client, self.upstream = client, upstream
        self.idle, self.max_duration = idle_timeout, max_duration
        self.bytes_up = self.bytes_down = 0     # client->upstream, upstream->client
        self.last = time.monotonic()
        self.end = None         # why it ended: eof | idle | max_duration | reset | killed
        self.started = None

    def run(self, to_upstream=b"", to_client=b""):
        self.started = time.monotonic()
        for s in (self.client, self.upstream):
            s.settimeout(self.idle)
        up = gevent.Greenlet(self._copy, self.client, self.upstream, to_upstream, "up")
        up.name = "copy_client_to_backend"
        down = gevent.Greenlet(self._copy, self.upstream, self.client, to_client, "down")
        down.name = "copy_backend_to_client"
        up.start()
        down.start()
        try:
            done = gevent.joinall([up, down], timeout=self.max_duration)
            if len(done) < 2:
                self.stop("max_duration")
                gevent.joinall([up, down], timeout=5)
        except gevent.GreenletExit:
            self.stop("killed")     # the worker is stopping (graceful_timeout passed)
            raise
        finally:
            gevent.killall([up, down], block=False)
            self.stop(self.end or "eof")
            self.upstream.close()
        return self

    @property
    def duration(self):
        return time.monotonic() - self.started if self.started else 0.0

    def stop(self, reason):
        """End both directions (idempotent); the client socket is only shut
        down: the server closes it."""
        if self.end is None:
            self.end = reason
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass    # already shut down or reset by the peer

    def _copy(self, src, dst, first, direction):
        try:
            if first:
                self._send(dst, first, direction)
            while True:
                try:
                    data = src.recv(CHUNK)
                except (socket.timeout, TimeoutError):
                    if time.monotonic() - self.last >= self.idle:
                        self.stop("idle")
                        return
                    continue    # the other direction was busy
                if not data:
                    break
                self._send(dst, data, direction)
        except (socket.timeout, TimeoutError):
            self.stop("idle")   # the receiver did not read for idle_timeout
            return
        except OSError as e:
            if self.end is None and e.errno not in (errno.EBADF, errno.ENOTCONN):
                log.info("tunnel %s: %s", direction, e.strerror or e)
            self.stop("reset")
            return
        try:
            dst.shutdown(socket.SHUT_WR)   # pass the half-close on
        except OSError:
            self.stop("reset")

    def _send(self, dst, data, direction):
        h1.send_all(dst, data)
        self.last = time.monotonic()
        if direction == "up":
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)


def carry(recorder, ex, request, upstream, greeting, cfg, to_client=b""):
    """Take the client connection over, send it ``greeting`` (the 200 of a
    CONNECT, the backend's 101 head), then splice both ways until the
    tunnel ends; account for it and return ``downstream.HANDLED``."""
    client, early = request.take_over()
    splice = Splice(client, upstream, cfg.idle_timeout, cfg.max_duration)
    opened(recorder)
    try:
        client.sendall(greeting)
    except OSError:
        splice.stop("client_gone")
        upstream.close()
        ex.status = 499
    else:
        splice.run(to_upstream=early, to_client=to_client)
    finally:
        finish(recorder, ex, splice)
    return downstream.HANDLED


def opened(recorder):
    global open_tunnels
    open_tunnels += 1
    recorder.stats.tunnel_opened()


def finish(recorder, ex, splice):
    """The tunnel's access-log record: bytes each way, duration, why it
    ended. The one place a tunnel's close is accounted for (metrics too)."""
    global open_tunnels
    open_tunnels -= 1
    ex.bytes_in, ex.bytes_out = splice.bytes_up, splice.bytes_down
    ex.error = None if splice.end == "eof" else f"tunnel_{splice.end}"
    recorder.stats.tunnel_closed(splice.bytes_up, splice.bytes_down, splice.duration)
    recorder.record(ex, {"tunnel": {"end": splice.end, "duration": round(splice.duration, 6),
                                    "open": open_tunnels}})
