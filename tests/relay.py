"""A TCP relay on loopback that can be taken down and brought back on the same port:
a store that goes away (connections refused, open ones cut) and returns, in front of a
real server whose state (moto's buckets) must survive the outage.

  relay = Relay(upstream_port)      listening on relay.port, forwarding to upstream
  Relay(upstream_port, tls=context) the same behind TLS (a server-side SSLContext)
  relay.down()                      refuses new connections, cuts the open ones
  relay.up()                        listens again on the same port

Threads: one accepting, two per connection (one per direction; one for a TLS connection).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading

from tests.support import free_port


class Relay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.host = host
        self.upstream = (host, upstream_port)
        self.port = free_port()
        self.tls = tls
        self.endpoint = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.connections = 0
        self.up()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            self._listener = socket.create_server((self.host, self.port))  # SO_REUSEADDR: same port again
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            listener.close()
        for sock in sockets:
            _close(sock)

    close = down

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (an S3Server.env) with the endpoint pointing at this relay."""
        return base | {"AWS_ENDPOINT_URL": self.endpoint}

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down
            threading.Thread(target=self._connect, args=(listener, client), daemon=True).start()

    def _connect(self, listener: socket.socket, client: socket.socket) -> None:
        if self.tls is not None:
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except OSError:
                _close(client)
                return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
            server.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            if self._listener is not listener:  # went down meanwhile
                _close(client)
                _close(server)
                return
            self._open |= {client, server}
            self.connections += 1
        if self.tls is not None:  # one thread: a TLS socket is not to be used by two at once
            threading.Thread(target=self._shuttle, args=(client, server), daemon=True).start()
            return
        pair = [client, server]
        for x, y in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(x, y, pair), daemon=True).start()

    def _shuttle(self, client: ssl.SSLSocket, server: socket.socket) -> None:
        """Copy both directions of a TLS connection until either ends."""
        try:
            while True:
                ready = [client] if client.pending() else select.select([client, server], [], [])[0]
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        raise EOFError
                    (server if source is client else client).sendall(data)
        except (OSError, EOFError, ValueError):
            pass
        with self._lock:
            self._open -= {client, server}
        _close(client)
        _close(server)

    def _pump(self, source: socket.socket, sink: socket.socket, pair: list) -> None:
        """Copy one direction; the second direction to end closes both sockets."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            pair.append(None)
            last = len(pair) == 4
            if last:
                self._open -= {source, sink}
        if last:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class KeepAliveFront:
    """An HTTP/1.1 front on loopback that keeps its clients' connections open between
    requests, each request sent on to `upstream` (moto's server answers every request
    with `Connection: close`): a store whose connections a client can keep.

      front = KeepAliveFront(s3_server.endpoint)
      front.endpoint                    where to send requests
      front.connections                 connections accepted so far
      front.close_idle()                closes every client connection it holds
    """

    def __init__(self, upstream: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        front = self
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with front._lock:
                    front.connections += 1
                    front._open.add(self.connection)

            def finish(self) -> None:
                with front._lock:
                    front._open.discard(self.connection)
                super().finish()

            def forward(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                try:
                    upstream.request(self.command, self.path, body or None, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "content-length", "transfer-encoding", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close_idle(self) -> None:
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.close_idle()
