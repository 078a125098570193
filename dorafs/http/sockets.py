"""Sending on a connection's socket straight, shared by the HTTP server and the workers'
client (dorafs/client/transport.py)."""

from __future__ import annotations

import errno
import os

import trio


async def send_all(stream: trio.abc.Stream, data: bytes | memoryview) -> None:
    """`stream.send_all`, straight to a plain socket's descriptor: no scheduler pass when
    the socket takes it all at once; a wait only when it is full. A peer gone (EPIPE,
    ECONNRESET) is trio.BrokenResourceError, as from `send_all`. Callers never send on
    one connection from two tasks at once."""
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        return
    fd = stream.socket.fileno()
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise trio.BrokenResourceError from exc
            raise
        view = view[sent:]
