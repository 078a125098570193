"""A lean HTTP/1.1 client for the worker API on raw trio sockets.

Why not httpx here: profiling a warm read showed the mount spending most of its time in
httpx's response machinery while the worker idled. Page bodies are large and their
length is known from Content-Length, so this client parses the response head itself and
then receives the body straight into one preallocated buffer with `recv_into`: no chunk
list, no joins, one copy from the kernel.

Timeouts measure silence, not duration: a request fails when no byte has come from the
worker for `timeout` seconds (each byte received starts the count again). The worker
sends an interim `102 Processing` every second while it works on a request that asks
for it (`X-Dorafs-Progress: 1`, sent with every request), so a worker filling a page
from a slow store is waited for, and a stopped one (SIGSTOP, a hung disk) is given up
after `timeout`. Interim answers are read and dropped.

Connections are kept alive in a small pool per address. A request that fails on a reused
connection (the worker closed it while idle) is retried once on a fresh one; any other
failure surfaces as `TransportError` for the caller to fail over.

On a plain socket the request is written and the answer read straight on its
descriptor (`os.write`, `os.read`, `os.readv`), waiting only when the socket is full or
has nothing yet: no scheduler pass per call. A response head is read in small pieces
(LINE_CHUNK), so a body mostly lands by `readv` in its own buffer rather than through
`pending`. Query values are quoted once and remembered (`/` and `:` left as they are;
the server decodes either form).

Security: every request carries the credentials' `Authorization` header (built once).
With a TLS context, connections are `trio.SSLStream`s over the socket and bodies arrive
through `receive_some` (TLS decrypts into its own buffers, so `recv_into` cannot be
used); the plain path is unchanged. A TLS failure is a `TransportError` like any other.

A worker's run of pages comes as one chunked answer (`stream`, dorafs/runs.py): its
chunks are handed to the caller as they arrive, page bytes received straight into the
caller's memory.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import trio

from dorafs.http.sockets import send_all
from dorafs.log import request_id
from dorafs.security import Credentials

HEAD_LIMIT = 64 * 1024
LINE_CHUNK = 4096  # reads for a response head or a chunk's size line: a little past it, so page bytes go by recv_into


class TransportError(Exception):
    """The worker could not be reached or broke the exchange (never an HTTP status)."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytearray):
        self.status = status
        self.headers = headers
        self.body = body


class _Connection:
    def __init__(self, stream: trio.SocketStream | trio.SSLStream):
        self.stream = stream
        # The socket's descriptor, read and written straight (None: TLS, through the stream).
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self.pending = bytearray()  # bytes received past the previous response

    async def send(self, data: bytes) -> None:
        """All of `data`; on a plain socket without a scheduler pass when it takes it at once."""
        await send_all(self.stream, data)

    async def receive(self, size: int) -> bytes:
        """Up to `size` bytes (b"" at the end); waits only when none have arrived."""
        if self.fd is None:
            return await self.stream.receive_some(size)
        while True:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)

    async def receive_into(self, view: memoryview) -> int:
        if self.fd is None:
            data = await self.stream.receive_some(len(view))
            view[:len(data)] = data
            return len(data)
        while True:
            try:
                return os.readv(self.fd, [view])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class Transport:
    def __init__(self, *, timeout: float, connect_timeout: float, max_idle_per_host: int = 16,
                 credentials: Credentials | None = None):
        credentials = credentials or Credentials()
        self.ssl = credentials.ssl
        self._auth = "".join(f"{name}: {value}\r\n" for name, value in credentials.headers.items())
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_host
        self._idle: dict[str, list[_Connection]] = defaultdict(list)

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await conn.close()
        self._idle.clear()

    async def get(self, address: str, path: str, params: dict) -> Response:
        return await self.request("GET", address, path, params)

    async def request(self, method: str, address: str, path: str, params: dict) -> Response:
        """One request without a body (the worker API takes its arguments in the query)."""
        length = "" if method in ("GET", "HEAD") else "Content-Length: 0\r\n"
        request = (f"{method} {path}?{_query(params)} HTTP/1.1\r\nHost: {address}\r\n"
                   f"X-Request-Id: {request_id.get()}\r\nX-Dorafs-Progress: 1\r\n{self._auth}{length}\r\n").encode()
        for attempt in (0, 1):
            conn, reused = await self._checkout(address)
            try:
                with trio.CancelScope(deadline=trio.current_time() + self.timeout) as quiet:
                    await conn.send(request)
                    response = await self._receive(conn, quiet)
                if quiet.cancelled_caught:
                    raise trio.TooSlowError
            except trio.TooSlowError:
                await conn.close()
                raise TransportError(f"worker {address} sent nothing for {self.timeout}s") from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _Closed, ValueError) as exc:
                await conn.close()
                if reused and attempt == 0 and isinstance(exc, (_Closed, trio.BrokenResourceError, OSError)):
                    continue  # an idle keep-alive connection the worker had closed
                raise TransportError(f"worker {address}: {exc or type(exc).__name__}") from None
            except BaseException:
                await conn.close()
                raise
            if response.headers.get("connection", "").lower() == "close" or len(self._idle[address]) >= self.max_idle:
                await conn.close()
            else:
                self._idle[address].append(conn)
            return response
        raise AssertionError("unreachable")

    async def _checkout(self, address: str) -> tuple[_Connection, bool]:
        idle = self._idle[address]
        if idle:
            return idle.pop(), True
        host, _, port = address.rpartition(":")
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.ssl is not None:
                    stream = trio.SSLStream(stream, self.ssl, server_hostname=host.strip("[]"),
                                            https_compatible=True)
                    await stream.do_handshake()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
            raise TransportError(f"worker {address} unreachable: {cause or 'connect timed out'}") from None
        return _Connection(stream), False

    async def _receive(self, conn: _Connection, quiet: trio.CancelScope) -> Response:
        """The next final response; each byte received pushes `quiet`'s deadline on."""
        status, headers = await self._head(conn, quiet)
        if "chunked" in headers.get("transfer-encoding", ""):
            raise ValueError("a chunked answer where a whole one was expected")
        return await self._body(conn, quiet, status, headers)

    async def _head(self, conn: _Connection, quiet: trio.CancelScope) -> tuple[int, dict[str, str]]:
        """Status and headers of the next final response (interim ones dropped); the
        bytes after the head stay in `conn.pending`."""
        buf = conn.pending
        while True:
            end = await self._until(conn, quiet, b"\r\n\r\n", LINE_CHUNK, "response head too large",
                                    "connection closed before a response")
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            parts = head[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ValueError(f"not an HTTP response: {head[0][:80]!r}")
            status = int(parts[1])
            if not 100 <= status < 200:
                break
            del buf[:end + 4]  # an interim answer (102 Processing): the worker is at work
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        del buf[:end + 4]
        return status, headers

    async def _body(self, conn: _Connection, quiet: trio.CancelScope, status: int,
                    headers: dict[str, str]) -> Response:
        length = int(headers.get("content-length", "0"))
        body = bytearray(length)
        await self._fill(conn, quiet, memoryview(body))
        return Response(status, headers, body)

    async def _fill(self, conn: _Connection, quiet: trio.CancelScope, view: memoryview) -> None:
        """Exactly len(view) bytes of the answer into `view`: first those already
        received, then straight from the socket (`recv_into`)."""
        buf = conn.pending
        length = len(view)
        have = min(length, len(buf))
        view[:have] = buf[:have]
        del buf[:have]
        while have < length:
            n = await conn.receive_into(view[have:])
            if n == 0:
                raise _Closed("connection closed mid-body")
            quiet.deadline = trio.current_time() + self.timeout
            have += n

    async def _until(self, conn: _Connection, quiet: trio.CancelScope, delimiter: bytes, chunk: int,
                     too_long: str, closed: str) -> int:
        """Receive into `conn.pending` until it holds `delimiter` (at most HEAD_LIMIT bytes
        before it), reading `chunk` bytes at a time; returns where the delimiter starts."""
        buf = conn.pending
        while (end := buf.find(delimiter)) < 0:
            if len(buf) > HEAD_LIMIT:
                raise ValueError(too_long)
            data = await conn.receive(chunk)
            if not data:
                raise _Closed(closed)
            quiet.deadline = trio.current_time() + self.timeout
            buf += data
        return end

    async def _line(self, conn: _Connection, quiet: trio.CancelScope) -> bytes:
        """The next CRLF-ended line of the answer, without its CRLF."""
        buf = conn.pending
        end = await self._until(conn, quiet, b"\r\n", LINE_CHUNK, "chunk line too long",
                                "connection closed mid-answer")
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line

    async def stream(self, address: str, path: str, params: dict,
                     consume: Callable[["Chunks"], Awaitable[None]]) -> Response | None:
        """A GET whose 200 answer is chunked (a worker's run of pages): `consume(chunks)`
        reads it chunk by chunk (see `Chunks`) as it arrives. Another answer (an error)
        is returned whole instead. A connection that breaks mid-answer raises
        `TransportError` (what `consume` took stays taken); a fresh connection is tried
        once when a reused one fails before any answer."""
        request = (f"GET {path}?{_query(params)} HTTP/1.1\r\nHost: {address}\r\n"
                   f"X-Request-Id: {request_id.get()}\r\nX-Dorafs-Progress: 1\r\n{self._auth}\r\n").encode()
        for attempt in (0, 1):
            conn, reused = await self._checkout(address)
            answered = False
            try:
                with trio.CancelScope(deadline=trio.current_time() + self.timeout) as quiet:
                    await conn.send(request)
                    status, headers = await self._head(conn, quiet)
                    answered = True
                    if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
                        response = await self._body(conn, quiet, status, headers)
                    else:
                        response = None
                        chunks = Chunks(self, conn, quiet)
                        await consume(chunks)
                        await chunks.finish()
                if quiet.cancelled_caught:
                    raise trio.TooSlowError
            except trio.TooSlowError:
                await conn.close()
                raise TransportError(f"worker {address} sent nothing for {self.timeout}s") from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _Closed, ValueError) as exc:
                await conn.close()
                if reused and attempt == 0 and not answered and \
                        isinstance(exc, (_Closed, trio.BrokenResourceError, OSError)):
                    continue  # an idle keep-alive connection the worker had closed
                raise TransportError(f"worker {address}: {exc or type(exc).__name__}") from None
            except BaseException:
                await conn.close()
                raise
            if (response is not None and response.headers.get("connection", "").lower() == "close") or \
                    len(self._idle[address]) >= self.max_idle:
                await conn.close()
            else:
                self._idle[address].append(conn)
            return response
        raise AssertionError("unreachable")


class Chunks:
    """The chunks of one chunked answer, read in order: `size()` of the next one (0: the
    answer ended), then all of its bytes with `read(n)` or `read_into(view)`."""

    def __init__(self, transport: Transport, conn: _Connection, quiet: trio.CancelScope):
        self._t, self._conn, self._quiet = transport, conn, quiet
        self._left = 0  # bytes of the current chunk not read yet
        self._ended = False

    async def size(self) -> int:
        if self._ended:
            return 0
        if self._left:
            raise ValueError("the previous chunk was not read to its end")
        line = await self._t._line(self._conn, self._quiet)
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise ValueError(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            while await self._t._line(self._conn, self._quiet):  # trailers, up to the empty line
                pass
            self._ended = True
        self._left = size
        return size

    async def read_into(self, view: memoryview) -> None:
        if len(view) > self._left:
            raise ValueError("read past the end of a chunk")
        await self._t._fill(self._conn, self._quiet, view)
        self._left -= len(view)
        if not self._left and await self._t._line(self._conn, self._quiet):
            raise ValueError("chunk data longer than its size")

    async def read(self, n: int) -> bytearray:
        data = bytearray(n)
        await self.read_into(memoryview(data))
        return data

    def take_received(self, parse: Callable[[bytearray], tuple[list, int]]) -> list:
        """What `parse` finds whole in the bytes already received and not yet read,
        taken off the answer: `parse(received)` answers the items and how many bytes,
        from a chunk's size line on, they took. None taken (an empty list) while a chunk
        is partly read or once the answer ended: no waiting here."""
        if self._ended or self._left:
            return []
        received = self._conn.pending
        items, used = parse(received)
        if used:
            del received[:used]
        return items

    async def finish(self) -> None:
        """Read (and drop) whatever the consumer left, up to the answer's end."""
        while await self.size():
            await self.read(self._left)


class _Closed(Exception):
    pass


def _query(params: dict) -> str:
    """The query string of `params` (as `urlencode`; `/` and `:` left as they are), each
    text value quoted once and remembered: a reader asks with the same URI and version
    again and again."""
    return "&".join(f"{name}={value if type(value) is int else _quoted(str(value))}"
                    for name, value in params.items())


@functools.lru_cache(maxsize=4096)
def _quoted(value: str) -> str:
    return quote(value, safe="/:")
