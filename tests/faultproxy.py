"""A fault-injecting HTTP proxy for S3 tests: boto3 -> this proxy -> moto, on loopback.

Point a process's `AWS_ENDPOINT_URL` at `proxy.endpoint`; every request is forwarded to
the real server unless a fault is armed. Faults apply to the requests a predicate picks
(by default every one; `reads_only=True`: GETs with a Range header, i.e. page fills, so
that stat and listings still work):

  proxy.passthrough()                 no fault (a bandwidth limit stays until `limit(None)`)
  proxy.fail(n, 503, "SlowDown")      the next n matching requests get an S3 XML error
  proxy.fail(None, 500, ...)          every matching request does, until cleared
  proxy.hang()                        matching requests get no answer until cleared
  proxy.limit(1_000_000)              every connection moves at most this many bytes/s,
                                      each way (request bodies and answers), until `limit(None)`
  proxy.drop(n, match)                the next n requests `match(seen)` picks reach the server,
                                      which acts on them, and their answer is lost (the
                                      connection is closed without a byte of it)
  proxy.cut(n, nbytes, match)         the next n such requests get their answer's head and
                                      `nbytes` of its body, then the connection is closed
  proxy.delay(seconds, n, match)      the next n such requests wait `seconds` before they
                                      are forwarded (a server that takes that long to answer)
  proxy.ignore_conditions = True      writes lose their If-Match / If-None-Match headers on the
                                      way (a server that ignores conditional writes)

`match` gets a `Seen(method, path, headers)`; `Seen.op` names the S3 operation
("put_object", "upload_part", "complete", "create_upload", "get_range", ...).

Counters: `proxy.injected` the faults served; `proxy.requests` every request seen;
`proxy.seen` a list of `Seen` with the payload bytes each request carried
(`x-amz-decoded-content-length` when boto3 frames its body, else its length), the
answer's status and the answer's body bytes passed on so far (`sent`);
`proxy.payload(op)` sums the payload of one operation, `proxy.sent(op)` its answers.
Threads: one per connection (ThreadingHTTPServer); the fault state is under a lock.
Bodies stream through in 64 KiB pieces, paced when a limit is set.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
PIECE = 64 * 1024


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    payload: int = 0
    status: int | None = None  # None: no answer reached the client
    extra: dict = field(default_factory=dict)
    sent: int = 0  # bytes of the answer's body the proxy passed on (streamed ones)

    @property
    def op(self) -> str:
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        if self.method == "PUT":
            if "partNumber" in query:
                return "upload_part"
            return "put_object"
        if self.method == "POST" and "uploads" in query:
            return "create_upload"
        if self.method == "POST" and "uploadId" in query:
            return "complete"
        if self.method == "GET" and "uploadId" in query:
            return "list_parts"
        if self.method == "GET" and any(k.lower() == "range" for k in self.headers):
            return "get_range"
        if self.method == "DELETE" and "uploadId" in query:
            return "abort"
        return f"{self.method.lower()}"


class _Pace:
    """At most `rate` bytes/s through one connection in one direction."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.start = time.monotonic()
        self.moved = 0

    def __call__(self, nbytes: int) -> None:
        if not self.rate:
            return
        self.moved += nbytes
        ahead = self.moved / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class _Rule:
    def __init__(self, kind: str, n: int | None, match: Callable[[Seen], bool], seconds: float = 0.0,
                 nbytes: int = 0):
        self.nbytes = nbytes
        self.kind, self.n, self.match, self.seconds = kind, n, match, seconds


class FaultProxy:
    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self._lock = threading.Lock()
        self._mode = "pass"
        self._remaining: int | None = None
        self._status = 503
        self._code = "SlowDown"
        self._reads_only = False
        self._released = threading.Event()
        self._rate: float | None = None
        self._rules: list[_Rule] = []
        self.injected = 0
        self.requests = 0
        self.ignore_conditions = False
        self.seen: list[Seen] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _read_body(self, pace: _Pace) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                chunks = []
                while length > 0:
                    piece = self.rfile.read(min(PIECE, length))
                    if not piece:
                        break
                    chunks.append(piece)
                    length -= len(piece)
                    pace(len(piece))
                return b"".join(chunks)

            def _handle(self):
                rate = proxy._rate
                body = self._read_body(_Pace(rate))
                headers = dict(self.headers)
                seen = Seen(self.command, self.path, headers,
                            int(self.headers.get("x-amz-decoded-content-length") or len(body)))
                with proxy._lock:
                    proxy.seen.append(seen)
                fault = proxy._take(self.command, headers)
                rule = proxy._rule(seen)
                if fault == "hang":
                    proxy._released.wait(120)
                    self.close_connection = True
                    return
                if fault is not None:
                    status, code = fault
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    seen.status = status
                    return
                if rule is not None and rule.kind == "delay":
                    time.sleep(rule.seconds)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    forward = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    if proxy.ignore_conditions and self.command in ("PUT", "POST"):
                        forward = {k: v for k, v in forward.items() if k.lower() not in ("if-match", "if-none-match")}
                    conn.request(self.command, self.path, body=body or None, headers=forward)
                    response = conn.getresponse()
                    if rule is not None and rule.kind == "drop":  # the server acted; the answer is lost
                        response.read()
                        self.close_connection = True
                        return
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in HOP_BY_HOP | {"content-length"}:
                            self.send_header(name, value)
                    length = response.getheader("Content-Length")
                    if length is None and self.command != "HEAD":  # chunked upstream: buffer it
                        data = response.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    else:
                        self.send_header("Content-Length", length or "0")
                        self.end_headers()
                        if self.command != "HEAD":
                            pace = _Pace(rate)
                            left = rule.nbytes if rule is not None and rule.kind == "cut" else None
                            while piece := response.read(PIECE if left is None else min(PIECE, left)):
                                try:
                                    self.wfile.write(piece)
                                except (BrokenPipeError, ConnectionResetError):  # the client left
                                    self.close_connection = True
                                    return
                                seen.sent += len(piece)
                                pace(len(piece))
                                if left is not None:
                                    left -= len(piece)
                                    if left <= 0:
                                        break
                            if left is not None:
                                self.wfile.flush()
                                self.close_connection = True
                                seen.status = response.status
                                return
                    seen.status = response.status
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()

    # -- faults ---------------------------------------------------------------------------

    def passthrough(self) -> None:
        with self._lock:
            self._mode = "pass"
            self._rules = []
            self._released.set()

    def fail(self, n: int | None, status: int = 503, code: str = "SlowDown", *, reads_only: bool = True) -> None:
        """The next `n` matching requests (None: all, until cleared) answer `status`."""
        with self._lock:
            self._mode, self._remaining, self._status, self._code = "fail", n, status, code
            self._reads_only = reads_only

    def hang(self, *, reads_only: bool = True) -> None:
        with self._lock:
            self._mode, self._reads_only = "hang", reads_only
            self._released = threading.Event()

    def limit(self, rate: float | None) -> None:
        """Each new request's body and answer move at most `rate` bytes/s (None: no limit)."""
        with self._lock:
            self._rate = rate

    def drop(self, n: int | None, match: Callable[[Seen], bool]) -> None:
        """The next `n` requests `match` picks are acted on by the server; their answer is lost."""
        with self._lock:
            self._rules.append(_Rule("drop", n, match))

    def cut(self, n: int | None, nbytes: int, match: Callable[[Seen], bool]) -> None:
        """The next `n` requests `match` picks get `nbytes` of their answer's body, then EOF."""
        with self._lock:
            self._rules.append(_Rule("cut", n, match, nbytes=nbytes))

    def delay(self, seconds: float, n: int | None, match: Callable[[Seen], bool]) -> None:
        """The next `n` requests `match` picks reach the server `seconds` late."""
        with self._lock:
            self._rules.append(_Rule("delay", n, match, seconds))

    def payload(self, op: str) -> int:
        """Bytes of payload the requests of one operation carried (see `Seen.op`)."""
        with self._lock:
            return sum(s.payload for s in self.seen if s.op == op)

    def sent(self, op: str) -> int:
        """Bytes of answer bodies passed on to the clients of one operation, so far."""
        with self._lock:
            return sum(s.sent for s in self.seen if s.op == op)

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.op == op)

    def _rule(self, seen: Seen) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.n is None or rule.n > 0) and rule.match(seen):
                    if rule.n is not None:
                        rule.n -= 1
                    self.injected += 1
                    seen.extra["fault"] = rule.kind
                    return rule
        return None

    def _take(self, method: str, headers: dict):
        with self._lock:
            self.requests += 1
            if self._mode == "pass":
                return None
            if self._reads_only and not (method == "GET" and any(k.lower() == "range" for k in headers)):
                return None
            if self._mode == "hang":
                self.injected += 1
                return "hang"
            if self._remaining is not None:
                if self._remaining <= 0:
                    return None
                self._remaining -= 1
            self.injected += 1
            return self._status, self._code

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (an S3Server.env) with the endpoint pointing at this proxy."""
        return base | {"AWS_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.passthrough()
        self._server.shutdown()
        self._server.server_close()
