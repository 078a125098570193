"""The client's lean HTTP transport against the real dorafs HTTP server (in-process)."""

from __future__ import annotations

import functools
import os

import pytest
import trio

from dorafs.client.transport import Transport, TransportError
from dorafs.http import HttpServer, Response, json_response

BODY = os.urandom(3 * (1 << 20) + 17)


def serve_and(client_fn, *, handler_delay: float = 0.0):
    server = HttpServer("test")
    connections = []

    @server.route("GET", "/blob")
    async def blob(req):
        await trio.sleep(handler_delay)
        return Response(200, BODY, {"X-Test": "yes"})

    @server.route("GET", "/echo")
    async def echo(req):
        return json_response(req.query)

    original = server._connection

    async def counting(stream):
        connections.append(stream)
        await original(stream)

    server._connection = counting

    async def main():
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, "127.0.0.1", 0)
            transport = Transport(timeout=2, connect_timeout=1)
            try:
                await client_fn(transport, f"{host}:{port}", connections, nursery)
            finally:
                await transport.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_bodies_exact_and_connections_reused():
    async def client(transport, address, connections, _):
        for _ in range(5):
            response = await transport.get(address, "/blob", {})
            assert response.status == 200 and bytes(response.body) == BODY
            assert response.headers["x-test"] == "yes"
        echoed = await transport.get(address, "/echo", {"uri": "s3://b/ü and space", "n": 3})
        assert echoed.status == 200 and b"\\u00fc and space" in echoed.body
        assert len(connections) == 1  # keep-alive: one connection for six requests

    serve_and(client)


def test_status_and_error_bodies_pass_through():
    async def client(transport, address, *_):
        response = await transport.get(address, "/missing", {})
        assert response.status == 404 and b"ENOENT" in response.body

    serve_and(client)


def test_stale_idle_connection_is_retried_once():
    async def client(transport, address, connections, _):
        await transport.get(address, "/echo", {})
        for stream in connections:  # the server side closes the idle connection
            await stream.aclose()
        await trio.sleep(0.05)
        response = await transport.get(address, "/blob", {})
        assert bytes(response.body) == BODY

    serve_and(client)


def test_a_busy_worker_is_waited_for():
    """A handler working for longer than the timeout sends `102 Processing` meanwhile:
    the request waits for its answer instead of failing (the timeout bounds silence)."""
    async def client(transport, address, *_):
        started = trio.current_time()
        response = await transport.get(address, "/blob", {})
        assert bytes(response.body) == BODY
        assert trio.current_time() - started >= 3  # > the 2 s timeout: interim answers kept it going
        echoed = await transport.get(address, "/echo", {"n": 1})  # the connection is still usable
        assert echoed.status == 200

    serve_and(client, handler_delay=3)


def test_a_silent_worker_times_out():
    """A peer that accepts the request and sends nothing (a stopped worker) is given up
    after `timeout` seconds of silence."""
    async def main():
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            async def accept_and_say_nothing():
                stream = await listener.accept()
                await trio.sleep_forever()
                await stream.aclose()

            nursery.start_soon(accept_and_say_nothing)
            transport = Transport(timeout=1, connect_timeout=1)
            started = trio.current_time()
            with pytest.raises(TransportError, match="sent nothing for 1s"):
                await transport.get(f"127.0.0.1:{port}", "/blob", {})
            assert 0.9 <= trio.current_time() - started < 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_unreachable_worker():
    async def main():
        with trio.socket.socket() as s:
            await s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound but not listening: refused
            transport = Transport(timeout=1, connect_timeout=1)
            with pytest.raises(TransportError, match="unreachable"):
                await transport.get(f"127.0.0.1:{port}", "/x", {})

    trio.run(main)


def test_garbage_response_is_a_transport_error():
    async def main():
        async def garbage(stream):
            await stream.receive_some(1000)
            await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            transport = Transport(timeout=1, connect_timeout=1)
            with pytest.raises(TransportError, match="not an HTTP response"):
                await transport.get(f"127.0.0.1:{port}", "/x", {})
            nursery.cancel_scope.cancel()

    trio.run(main)
