"""A TCP relay on loopback that can be taken down and brought back on the same port:
a store that goes away (connections refused, open ones cut) and returns, in front of a
real server whose state (moto's buckets) must survive the outage.

  relay = Relay(upstream_port)      listening on relay.port, forwarding to upstream
  relay.down()                      refuses new connections, cuts the open ones
  relay.up()                        listens again on the same port

Threads: one accepting, two per connection (one per direction).
"""

from __future__ import annotations

import socket
import threading

from tests.support import free_port


class Relay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.host = host
        self.upstream = (host, upstream_port)
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
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
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _close(client)
                    _close(server)
                    return
                self._open |= {client, server}
                self.connections += 1
            pair = [client, server]
            for x, y in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(x, y, pair), daemon=True).start()

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
