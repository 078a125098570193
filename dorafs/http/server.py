"""HTTP/1.1 server on trio sockets with h11.

Subtleties:
- The common request (a GET or HEAD whose head arrives whole, without a body: nearly
  every request a worker gets) is read and answered by dorafs/http/lean.py, without
  h11; the first request of any other shape, and every later one on that connection,
  goes through h11, so unusual requests keep h11's checks and answers.
- On a plain socket, bytes are read and written straight with `os.read`/`os.write`,
  waiting (`wait_readable`/`wait_writable`) only when the socket has nothing or is full:
  a request answered at once costs no scheduler pass of its own. A connection still
  yields every FAIR_REQUESTS requests, so a client that always has one waiting cannot
  keep the loop.
- A `StreamBody` (a worker's run of pages) goes out chunked, each part as it is produced.
- File bodies go out with `os.sendfile` (zero copy). h11's `send_with_data_passthrough`
  lets a `FileBody` travel through h11's framing as an object with a length; we then
  stream it with sendfile between the header bytes and the end of the message.
- Every handler runs inside one error boundary: a `DoraError` becomes its HTTP status
  with a JSON `{errno, message}`; anything else is logged once and answers 500. The
  connection and the server keep going either way.
- Slow or idle clients are bounded by timeouts; oversized headers or bodies get 4xx. A
  connection may idle between requests, but once a request's first byte arrives its
  whole head must follow within HEADER_TIMEOUT (a byte-a-minute client is dropped).
- Authentication is one check before dispatch: with a secret, every path but the open
  ones (`/healthz`, and `/metrics` when configured so) needs `Authorization: Bearer
  <secret>`, compared in constant time; otherwise 401 and a log line naming the peer and
  the path, never the token. Unknown paths are refused the same way, so nothing about
  the API leaks to a client without the secret.
- A client that sends `X-Dorafs-Progress: 1` (the mount's worker client) is told every
  PROGRESS_INTERVAL that its request is still being worked on, with an interim `102
  Processing` answer: it bounds the worker's silence, not the request's duration, so a
  fill from a slow store is not mistaken for a dead worker. One task per connection
  sends them (`_Reporter`), woken only when a request has taken PROGRESS_INTERVAL; an
  interim answer that finds the client gone cancels the request's work.
- TLS: with an SSL context every accepted connection is wrapped in a `trio.SSLStream`.
  sendfile cannot write through TLS, so a `FileBody` is then read and sent in chunks;
  the plain path keeps sendfile. A client speaking plain HTTP to a TLS port fails its
  handshake and is dropped (one INFO line); the server goes on.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11
import trio
from prometheus_client import CollectorRegistry, Histogram

from dorafs.errors import DoraError
from dorafs.http import lean
from dorafs.http.sockets import send_all
from dorafs.log import new_request_id, request_id

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 8 << 20
HEADER_TIMEOUT = 10.0  # a client has this long to send a whole request head
LINGER_TIMEOUT = 1.0  # after an error answer, how long the rest of a request is read and dropped
LINGER_BYTES = 1 << 20  # ... and how much of it
IDLE_TIMEOUT = 120.0  # keep-alive connections idle longer than this are closed
RECV_SIZE = 64 * 1024
FILE_CHUNK = 256 * 1024  # a FileBody's read size when it cannot go out with sendfile (TLS)
SMALL_BODY = 256 * 1024  # a body up to this size goes out in one send with its head
PROGRESS_INTERVAL = 1.0  # seconds between `102 Processing` answers to a client that asked for them
FAIR_REQUESTS = 8  # a connection yields to the others at least every this many requests


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    peer: str = ""  # "host:port" of the client, for log lines

    def json(self) -> dict:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HttpError(400, "body must be a JSON object")
        return value

    def arg(self, name: str, default: str | None = None) -> str:
        value = self.query.get(name, default)
        if value is None:
            raise HttpError(400, f"missing query parameter {name!r}")
        return value

    def int_arg(self, name: str, default: int | None = None, minimum: int = 0) -> int:
        raw = self.query.get(name)
        if raw is None:
            if default is None:
                raise HttpError(400, f"missing query parameter {name!r}")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(400, f"query parameter {name!r} is not an integer") from None
        if value < minimum or value > 1 << 62:
            raise HttpError(400, f"query parameter {name!r} out of range")
        return value


@dataclass
class FileBody:
    """Bytes [offset, offset+length) of an open file, sent with sendfile.

    The response owns `fd` and closes it after sending.
    """

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class StreamBody:
    """A body of unknown length, sent chunked (HTTP/1.1 `Transfer-Encoding: chunked`) as
    `produce(send)` calls `await send(part)`; each part (bytes, a memoryview or a
    `FileBody`, which `send` closes) is one chunk, and a tuple of bytes is as many
    chunks, sent together (a frame and its data: one write, one wakeup of the reader).
    When `produce` raises, the connection is closed after what was sent: the client
    sees a body without its end."""

    produce: Callable[[Callable[[bytes | memoryview | FileBody], Awaitable[None]]], Awaitable[None]]


@dataclass
class Response:
    status: int = 200
    body: bytes | FileBody | StreamBody = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"


class HttpError(Exception):
    """Raised by handlers for a plain HTTP error (bad request, no route...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_response(value, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(value).encode(), headers or {}, "application/json")


def _error_response(status: int, errname: str, message: str) -> Response:
    return json_response({"errno": errname, "message": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Routes (method, path) to async handlers and serves them on a TCP listener."""

    def __init__(self, name: str, metrics: CollectorRegistry | None = None, prefix: str = ""):
        """With `metrics`, request latency is recorded as `{prefix}_request_latency_seconds`."""
        self.name = name
        self.routes: dict[tuple[str, str], Handler] = {}
        self._paths: frozenset[str] = frozenset()  # every routed path (any method)
        self._timers: dict[tuple[str, str], object] = {}  # latency histogram children by label
        self.address: tuple[str, int] | None = None
        self.open_paths: frozenset[str] = frozenset(("/healthz",))
        self._token: bytes | None = None  # the whole expected Authorization value
        self.ssl_context: ssl.SSLContext | None = None
        self.latency = None if metrics is None else Histogram(
            f"{prefix}_request_latency_seconds", "HTTP request latency by endpoint and status class",
            ["path", "status"], registry=metrics,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

    def secure(self, secret: bytes | None, ssl_context: ssl.SSLContext | None = None,
               open_paths: frozenset[str] | set[str] = frozenset(("/healthz",))) -> None:
        """Require `secret` on every path but `open_paths`; serve TLS with `ssl_context`."""
        self._token = None if secret is None else b"Bearer " + secret
        self.ssl_context = ssl_context
        self.open_paths = frozenset(open_paths)

    def view(self, name: str, paths: set[str]) -> HttpServer:
        """A plain, open server with only `paths` of this one (e.g. /metrics on its own port)."""
        other = HttpServer(name)
        other.routes = {key: handler for key, handler in self.routes.items() if key[1] in paths}
        other._paths = frozenset(path for _, path in other.routes)
        return other

    def route(self, method: str, path: str):
        def register(handler: Handler) -> Handler:
            self.routes[(method, path)] = handler
            self._paths = self._paths | {path}
            return handler

        return register

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; `task_status.started` gets the bound address."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = listeners[0].socket.getsockname()[:2]
        task_status.started(self.address)
        await trio.serve_listeners(self._connection, listeners)

    async def _dispatch(self, request: Request) -> Response:
        incoming = request.headers.get("x-request-id", "")
        if incoming and len(incoming) <= 64 and incoming.isprintable():
            request_id.set(incoming)
        else:
            new_request_id("h")
        start = time.perf_counter()
        if self._authorized(request):
            response = await self._handle(request)
        else:
            response = _error_response(401, "EACCES", "missing or wrong cluster secret")
            response.headers["WWW-Authenticate"] = 'Bearer realm="dorafs"'
        if self.latency is not None:
            known = request.method in ("GET", "HEAD", "POST") and request.path in self._paths
            labels = (request.path if known else "other", f"{response.status // 100}xx")
            timer = self._timers.get(labels)
            if timer is None:
                timer = self._timers[labels] = self.latency.labels(*labels)
            timer.observe(time.perf_counter() - start)
        return response

    def _authorized(self, request: Request) -> bool:
        if self._token is None or request.path in self.open_paths:
            return True
        given = request.headers.get("authorization")
        if given is not None and hmac.compare_digest(given.encode("latin-1"), self._token):
            return True
        log.warning("refused %s %s from %s: %s cluster secret (401)", request.method[:16],
                    request.path[:200].encode("unicode_escape").decode(), request.peer,
                    "no" if given is None else "a wrong")
        return False

    async def _handle(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is None:
            if request.path in self._paths:
                return _error_response(405, "EINVAL", f"method {request.method} not allowed")
            return _error_response(404, "ENOENT", f"no such endpoint: {request.path}")
        try:
            return await handler(request)
        except HttpError as exc:
            return _error_response(exc.status, "EINVAL", str(exc))
        except DoraError as exc:
            if exc.http_status >= 500:
                log.warning("%s %s: %s", request.method, request.path, exc)
            return json_response(exc.to_wire(), exc.http_status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error_response(500, "EIO", "internal error (see the daemon's log)")

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True, https_compatible=True)
                try:
                    with trio.fail_after(HEADER_TIMEOUT):
                        await stream.do_handshake()
                except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                    cause = exc.__cause__ or exc
                    log.info("TLS handshake with %s failed: %s", peer, str(cause)[:200] or type(cause).__name__)
                    return
            async with trio.open_nursery() as nursery:  # the connection's progress reporter, if any
                await self._serve(conn, stream, peer, nursery)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        except Exception:
            # One connection's failure never ends the server: log it and drop the connection.
            log.exception("connection failed; closing it")
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await stream.aclose()

    async def _serve(self, conn: h11.Connection, stream: trio.abc.Stream, peer: str,
                     nursery: trio.Nursery) -> None:
        """The requests of one connection, in turn, until it ends (errors handled here,
        inside the nursery, so that none reaches the caller wrapped in a group).

        Requests are read and answered by dorafs/http/lean.py until one is not of its
        common shape; that one and every later one go through h11."""
        reporter: _Reporter | None = None
        pending: bytearray | None = bytearray()  # received, not yet read (None: h11 reads)
        served = 0

        def interim() -> bytes:
            return lean.INTERIM if pending is not None else \
                conn.send(h11.InformationalResponse(status_code=102, headers=[]))

        try:
            while True:
                request = None
                if pending is not None:
                    request = await self._read_lean(pending, stream, peer)
                    if request is _H11:
                        started = bool(pending)
                        if started:
                            conn.receive_data(bytes(pending))
                        pending = None
                        request = await self._read_request(conn, stream, peer, started=started)
                else:
                    request = await self._read_request(conn, stream, peer)
                if request is None:
                    return
                if request.headers.get("x-dorafs-progress") == "1":
                    if reporter is None:
                        reporter = _Reporter(interim, stream)
                        nursery.start_soon(reporter.run)
                    response = await self._dispatch_reporting(reporter, request)
                else:
                    response = await self._dispatch(request)
                if pending is not None:
                    close = lean.wants_close(request.headers)
                    await self._send_lean(stream, response, head=request.method == "HEAD", close=close)
                    if close:
                        return
                else:
                    await self._send(conn, stream, response, head=request.method == "HEAD")
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                served += 1
                if not served % FAIR_REQUESTS:
                    # A client whose requests are always waiting would otherwise keep the
                    # loop: reads and sends go straight to the socket without yielding.
                    await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        except h11.RemoteProtocolError as exc:
            await self._reject(conn, stream, exc.error_status_hint, str(exc))
        except Exception:
            log.exception("connection failed; closing it")

    async def _read_lean(self, pending: bytearray, stream: trio.abc.Stream, peer: str) -> Request | object | None:
        """The next request if it is of the common shape (dorafs/http/lean.py); `_H11`
        if h11 is to read it (from `pending` on); None when the client is gone or idle
        too long."""
        if not pending:
            try:
                data = await _receive(stream, IDLE_TIMEOUT)
            except trio.TooSlowError:
                return None
            if not data:
                return None
            pending += data
        end = pending.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEADER_BYTES:
            return _H11
        parsed = lean.parse_head(bytes(pending[:end]))
        if parsed is None:
            return _H11
        del pending[:end + 4]
        method, target, headers = parsed
        path, query = _split_target(target)
        return Request(method=method, path=path, query=_parse_query(query) if query else {}, headers=headers,
                       peer=peer)

    async def _dispatch_reporting(self, reporter: _Reporter, request: Request) -> Response:
        """`_dispatch`, with a `102 Processing` to the client every PROGRESS_INTERVAL
        until the answer is ready (sent by the connection's reporter)."""
        response: Response | None = None
        with trio.CancelScope() as work:
            reporter.begin(work)
            try:
                response = await self._dispatch(request)
            finally:
                await reporter.end()
        if response is not None:
            return response
        gone = reporter.gone
        # Raised here, where the connection's handler ends the connection quietly.
        raise trio.BrokenResourceError(f"client gone while its request was served: {gone}") from gone

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream, timeout: float):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await _receive(stream, timeout))

    async def _read_request(self, conn: h11.Connection, stream: trio.abc.Stream, peer: str = "",
                            started: bool = False) -> Request | None:
        """The next request, by h11; `started`: its first bytes are already in."""
        try:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if not started:  # idle between requests: the first byte
                    conn.receive_data(await _receive(stream, IDLE_TIMEOUT))
                    event = conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(HEADER_TIMEOUT):  # then the whole head, promptly
                        event = await self._next_event(conn, stream, HEADER_TIMEOUT)
        except trio.TooSlowError:
            return None
        if isinstance(event, (h11.ConnectionClosed, h11.PAUSED)) or not isinstance(event, h11.Request):
            return None
        if sum(len(k) + len(v) + 4 for k, v in event.headers) + len(event.target) > MAX_HEADER_BYTES:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        path, query = _split_target(event.target.decode("latin-1"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}  # h11 lowercases names
        body = bytearray()
        while True:
            try:
                part = await self._next_event(conn, stream, HEADER_TIMEOUT)
            except trio.TooSlowError:
                return None
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return None
        return Request(
            method=event.method.decode("ascii", "replace"),
            path=path,
            query=_parse_query(query) if query else {},
            headers=headers,
            body=bytes(body),
            peer=peer,
        )

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, response: Response,
                    head: bool = False) -> None:
        body = response.body
        if isinstance(body, StreamBody):
            await self._send_stream(conn, stream, response, body)
            return
        try:
            headers = [
                ("Content-Type", response.content_type),
                ("Content-Length", str(len(body))),
                ("Server", self.name),
                *response.headers.items(),
            ]
            start = conn.send(h11.Response(status_code=response.status, headers=headers))
            if not isinstance(body, FileBody) and len(body) <= SMALL_BODY:
                # Head, body and end in one send: one segment, one wakeup of the client.
                parts = [start]
                if len(body) and not head:
                    parts += conn.send_with_data_passthrough(h11.Data(data=body))
                parts.append(conn.send(h11.EndOfMessage()))
                await send_all(stream, b"".join(parts))
                return
            await send_all(stream, start)
            if len(body) and not head:
                await _send_data(conn, stream, body)
            await send_all(stream, conn.send(h11.EndOfMessage()))
        finally:
            if isinstance(body, FileBody):
                os.close(body.fd)

    async def _send_lean(self, stream: trio.abc.Stream, response: Response, head: bool, close: bool) -> None:
        """An answer framed without h11 (to a request read by dorafs/http/lean.py)."""
        body = response.body
        fields = [("Content-Type", response.content_type),
                  ("Transfer-Encoding", "chunked") if isinstance(body, StreamBody) else ("Content-Length", str(len(body))),
                  ("Server", self.name), *response.headers.items()]
        if close:
            fields.append(("Connection", "close"))
        try:
            start = lean.response_head(response.status, fields)
            if isinstance(body, StreamBody):
                await send_all(stream, start)
                if not head:
                    await _produce(body, lambda part: _send_chunk(stream, part))
                    await send_all(stream, lean.LAST_CHUNK)
            elif head or not len(body):
                await send_all(stream, start)
            elif not isinstance(body, FileBody) and len(body) <= SMALL_BODY:
                await send_all(stream, b"".join((start, body)))  # one send: one segment, one wakeup
            else:
                await send_all(stream, start)
                await _send_piece(stream, body)
        finally:
            if isinstance(body, FileBody):
                os.close(body.fd)

    async def _send_stream(self, conn: h11.Connection, stream: trio.abc.Stream, response: Response,
                           body: StreamBody) -> None:
        headers = [("Content-Type", response.content_type), ("Server", self.name), *response.headers.items()]
        await send_all(stream, conn.send(h11.Response(status_code=response.status, headers=headers)))

        async def send(part: bytes | memoryview | FileBody | tuple[bytes, ...]) -> None:
            for piece in part if isinstance(part, tuple) else (part,):
                if len(piece):
                    await _send_data(conn, stream, piece)

        await _produce(body, send)
        await send_all(stream, conn.send(h11.EndOfMessage()))

    async def _reject(self, conn, stream, status: int, message: str) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            with trio.move_on_after(2):
                response = _error_response(status, "EINVAL", message)
                response.headers["Connection"] = "close"  # the connection ends here; say so
                await self._send(conn, stream, response)
                await _linger(stream)
        except Exception:
            pass  # the client is already gone or broken; nothing more to tell it


class _Reporter:
    """Tells the client of one connection, every PROGRESS_INTERVAL, that its request is
    still being worked on (`102 Processing`), for requests that asked for it.

    One task per connection, started at its first such request, sleeping in a cancel
    scope whose deadline is when the next interim answer is due (infinite while no
    request waits): a request that is answered within the interval costs two deadline
    changes, no task and no wakeup. When an interim answer finds the client gone, the
    request's work is cancelled (`gone` says why)."""

    def __init__(self, interim: Callable[[], bytes], stream: trio.abc.Stream):
        self._interim, self._stream = interim, stream
        self._sleep = trio.CancelScope()
        self._work: trio.CancelScope | None = None  # the request being served, while it is
        self._sending: trio.Event | None = None  # set when an interim answer being sent is out
        self.gone: BaseException | None = None

    def begin(self, work: trio.CancelScope) -> None:
        self._work = work
        self._sleep.deadline = trio.current_time() + PROGRESS_INTERVAL

    async def end(self) -> None:
        """The request's work is done: no more interim answers (one on its way is let finish)."""
        self._work = None
        self._sleep.deadline = math.inf
        if self._sending is not None:
            await self._sending.wait()

    async def run(self) -> None:
        while True:
            with self._sleep:
                await trio.sleep_forever()
            self._sleep = trio.CancelScope(deadline=math.inf)
            if self._work is None:
                continue
            self._sleep.deadline = trio.current_time() + PROGRESS_INTERVAL
            interim = self._interim()
            self._sending = trio.Event()
            try:
                with trio.CancelScope(shield=True):  # never half an interim answer on the wire
                    with trio.move_on_after(HEADER_TIMEOUT) as stuck:
                        await send_all(self._stream, interim)
                if stuck.cancelled_caught:  # the client reads nothing: drop it
                    self.gone = trio.TooSlowError("client stopped reading")
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
                self.gone = exc  # the client went away: its request's work stops with it
            finally:
                self._sending.set()
                self._sending = None
            if self.gone is not None:
                if self._work is not None:
                    self._work.cancel()
                return


async def _linger(stream: trio.abc.Stream) -> None:
    """After an error answer, read and drop what the client is still sending (bounded), so
    closing with unread bytes does not reset the connection before it has read the answer."""
    if not isinstance(stream, trio.SocketStream):
        return
    await stream.send_eof()
    dropped = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        while dropped < LINGER_BYTES and (data := await stream.receive_some(RECV_SIZE)):
            dropped += len(data)


async def _send_data(conn: h11.Connection, stream: trio.abc.Stream, data: bytes | memoryview | FileBody) -> None:
    """One piece of a body, framed by h11: a file range with sendfile where the stream
    is a plain socket, else copied through the stream."""
    for chunk in conn.send_with_data_passthrough(h11.Data(data=data)):
        if isinstance(chunk, FileBody) and isinstance(stream, trio.SocketStream):
            await _sendfile(stream, chunk)
        elif isinstance(chunk, FileBody):
            await _send_file_chunks(stream, chunk)
        else:
            await send_all(stream, chunk)


async def _produce(body: StreamBody, send: Callable[[bytes | memoryview | FileBody], Awaitable[None]]) -> None:
    """Run a streamed answer's producer, each part through `send` (a FileBody's fd closed
    after it); a producer's failure once the head is out can only end the connection."""
    async def each(part: bytes | memoryview | FileBody) -> None:
        try:
            await send(part)
        finally:
            if isinstance(part, FileBody):
                os.close(part.fd)

    try:
        await body.produce(each)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise
    except Exception as exc:  # the head is out: all that is left is to end the connection
        log.warning("streamed answer broken off: %s", exc)
        raise trio.BrokenResourceError(str(exc)) from exc


async def _send_chunk(stream: trio.abc.Stream, part: bytes | memoryview | FileBody | tuple[bytes, ...]) -> None:
    """One chunk of a chunked answer framed without h11 (a tuple: one chunk each, in one write)."""
    if isinstance(part, tuple):
        await send_all(stream, b"".join(b"".join((lean.chunk_head(len(p)), p, lean.CHUNK_END)) for p in part if len(p)))
        return
    if not len(part):
        return
    if isinstance(part, FileBody):
        await send_all(stream, lean.chunk_head(len(part)))
        await _send_piece(stream, part)
        await send_all(stream, lean.CHUNK_END)
    else:
        await send_all(stream, b"".join((lean.chunk_head(len(part)), part, lean.CHUNK_END)))


async def _send_piece(stream: trio.abc.Stream, data: bytes | memoryview | FileBody) -> None:
    """Body bytes as they are: a file range with sendfile where the stream is a plain socket."""
    if isinstance(data, FileBody):
        if isinstance(stream, trio.SocketStream):
            await _sendfile(stream, data)
        else:
            await _send_file_chunks(stream, data)
    else:
        await send_all(stream, data)


async def _send_file_chunks(stream: trio.abc.Stream, body: FileBody) -> None:
    """Copy a file range through a stream that sendfile cannot write to (TLS)."""
    offset, remaining = body.offset, body.length
    while remaining:
        data = await trio.to_thread.run_sync(os.pread, body.fd, min(remaining, FILE_CHUNK), offset)
        if not data:
            raise trio.BrokenResourceError("file truncated while sending")
        await stream.send_all(data)
        offset += len(data)
        remaining -= len(data)


async def _sendfile(stream: trio.SocketStream, body: FileBody) -> None:
    """Copy a file range to the socket with os.sendfile, waiting when the socket is full."""
    sock = stream.socket
    offset, remaining = body.offset, body.length
    while remaining:
        try:
            sent = os.sendfile(sock.fileno(), body.fd, offset, remaining)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise trio.BrokenResourceError from exc
            raise
        if sent == 0:  # the file is shorter than promised: it changed under us
            raise trio.BrokenResourceError("file truncated while sending")
        offset += sent
        remaining -= sent
    await trio.lowlevel.checkpoint()


async def _receive(stream: trio.abc.Stream, timeout: float) -> bytes:
    """Some bytes from the client (b"" at its end); TooSlowError after `timeout` s of
    silence. From a plain socket straight: no scheduler pass when bytes are waiting."""
    if not isinstance(stream, trio.SocketStream):
        with trio.fail_after(timeout):
            return await stream.receive_some(RECV_SIZE)
    fd = stream.socket.fileno()
    while True:
        try:
            return os.read(fd, RECV_SIZE)
        except BlockingIOError:
            pass
        with trio.move_on_after(timeout) as waited:
            await trio.lowlevel.wait_readable(fd)
        if waited.cancelled_caught:
            raise trio.TooSlowError


_H11 = object()  # `_read_lean`: this request is h11's to read


def _split_target(raw: str) -> tuple[str, str]:
    """Path and query of a request target."""
    if raw.startswith("/") and not raw.startswith("//") and "#" not in raw:  # origin form: no parser needed
        path, _, query = raw.partition("?")
        return path, query
    try:
        target = urlsplit(raw)
    except ValueError as exc:
        raise h11.RemoteProtocolError(f"bad request target: {exc}", error_status_hint=400) from None
    return target.path, target.query


def _parse_query(query: str) -> dict[str, str]:
    """`dict(parse_qsl(query, keep_blank_values=True))`, without its per-field steps
    for the fields that need none (no `+`, no `%`)."""
    out = {}
    for pair in query.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "+" in pair:
            name, value = name.replace("+", " "), value.replace("+", " ")
        if "%" in name:
            name = unquote(name)
        if "%" in value:
            value = unquote(value)
        out[name] = value
    return out
