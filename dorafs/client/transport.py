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

Security: every request carries the credentials' `Authorization` header (built once).
With a TLS context, connections are `trio.SSLStream`s over the socket and bodies arrive
through `receive_some` (TLS decrypts into its own buffers, so `recv_into` cannot be
used); the plain path is unchanged. A TLS failure is a `TransportError` like any other.
"""

from __future__ import annotations

import socket
import ssl
from collections import defaultdict
from urllib.parse import urlencode

import trio

from dorafs.log import request_id
from dorafs.security import Credentials

HEAD_LIMIT = 64 * 1024
RECV_CHUNK = 256 * 1024


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
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None  # None: TLS
        self.pending = bytearray()  # bytes received past the previous response

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
        request = (f"{method} {path}?{urlencode(params)} HTTP/1.1\r\nHost: {address}\r\n"
                   f"X-Request-Id: {request_id.get()}\r\nX-Dorafs-Progress: 1\r\n{self._auth}{length}\r\n").encode()
        for attempt in (0, 1):
            conn, reused = await self._checkout(address)
            try:
                with trio.CancelScope(deadline=trio.current_time() + self.timeout) as quiet:
                    await conn.stream.send_all(request)
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
        buf = conn.pending
        while True:
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > HEAD_LIMIT:
                    raise ValueError("response head too large")
                data = await conn.stream.receive_some(RECV_CHUNK)
                if not data:
                    raise _Closed("connection closed before a response")
                quiet.deadline = trio.current_time() + self.timeout
                buf += data
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
        if "chunked" in headers.get("transfer-encoding", ""):
            raise ValueError("chunked responses are not used by the worker API")
        length = int(headers.get("content-length", "0"))
        body = bytearray(length)
        have = min(length, len(buf) - end - 4)
        body[:have] = buf[end + 4:end + 4 + have]
        conn.pending = buf[end + 4 + have:]
        view = memoryview(body)
        while have < length:
            if conn.sock is not None:
                n = await conn.sock.recv_into(view[have:], length - have)
            else:
                data = await conn.stream.receive_some(length - have)
                n = len(data)
                view[have:have + n] = data
            if n == 0:
                raise _Closed("connection closed mid-body")
            quiet.deadline = trio.current_time() + self.timeout
            have += n
        return Response(status, headers, body)


class _Closed(Exception):
    pass
