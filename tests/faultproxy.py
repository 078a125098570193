"""A fault-injecting HTTP proxy for S3 tests: boto3 -> this proxy -> moto, on loopback.

Point a process's `AWS_ENDPOINT_URL` at `proxy.endpoint`; every request is forwarded to
the real server unless a fault is armed. Faults apply to the requests a predicate picks
(by default every one; `reads_only=True`: GETs with a Range header, i.e. page fills, so
that stat and listings still work):

  proxy.passthrough()                 no fault
  proxy.fail(n, 503, "SlowDown")      the next n matching requests get an S3 XML error
  proxy.fail(None, 500, ...)          every matching request does, until cleared
  proxy.hang()                        matching requests get no answer until cleared

`proxy.injected` counts the faults served; `proxy.requests` every request seen.
Threads: one per connection (ThreadingHTTPServer); the fault state is under a lock.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


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
        self.injected = 0
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.command, dict(self.headers))
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
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(name, value)
                # A HEAD answer has no body but the object's length.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

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
