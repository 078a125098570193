"""In-process tests of the h11 HTTP server (dorafs/http/server.py), over loopback sockets."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct

import h11
import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dorafs.errors import NotFound
from dorafs.http import lean
from dorafs.http.server import PROGRESS_INTERVAL, FileBody, HttpServer, Response, StreamBody, json_response

FILE_DATA = os.urandom(3 * 1024 * 1024 + 123)  # bigger than socket buffers: sendfile must wait


def make_server(data_path) -> HttpServer:
    server = HttpServer("test-server")

    @server.route("GET", "/json")
    async def get_json(req):
        return json_response({"path": req.path, "query": req.query, "ok": True}, headers={"X-Test": "1"})

    @server.route("POST", "/echo")
    async def echo(req):
        return json_response({"got": req.json(), "type": req.headers.get("content-type")})

    @server.route("GET", "/missing")
    async def missing(req):
        raise NotFound("no such object: s3://b/k")

    @server.route("GET", "/boom")
    async def boom(req):
        raise RuntimeError("handler bug")

    @server.route("GET", "/slow")
    async def slow(req):
        await trio.sleep(3 * PROGRESS_INTERVAL)
        return json_response({"slow": True})

    @server.route("GET", "/stream")
    async def stream(req):
        async def produce(send):
            await send(b"first;")
            await send(b"")
            await send(FileBody(os.open(data_path, os.O_RDONLY), 10, 100_000))
            await send((b";(", b"", b"pair)"))  # chunks sent together (a frame and its data)
            await send(memoryview(b";last"))

        return Response(200, StreamBody(produce))

    @server.route("GET", "/file")
    async def file(req):
        offset = req.int_arg("offset", 0)
        length = req.int_arg("length", len(FILE_DATA) - offset)
        return Response(200, FileBody(os.open(data_path, os.O_RDONLY), offset, length))

    return server


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(FILE_DATA)
    return path


def run_with_server(data_path, client) -> None:
    """Serve on 127.0.0.1:0 while `client(address)` runs; a server crash fails the test."""

    async def main():
        server = make_server(data_path)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(server.serve, "127.0.0.1", 0)
                assert address == server.address and address[1] != 0
                await client(address)
                nursery.cancel_scope.cancel()

    trio.run(main)


async def still_serving(address) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://{address[0]}:{address[1]}/json")
        assert r.status_code == 200 and r.json()["ok"] is True


class RawClient:
    """HTTP/1.1 over a bare trio socket, with h11 parsing the answers."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, address) -> RawClient:
        return cls(await trio.open_tcp_stream(*address))

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("Host", "test"), ("Content-Length", str(len(body)))]
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[h11.Response, bytes]:
        head, body = None, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return head, bytes(body)
            else:
                raise AssertionError(f"unexpected {event!r}")


async def raw_exchange(address, payload: bytes) -> bytes:
    """Send raw bytes and read until the server closes (or resets) the connection."""
    stream = await trio.open_tcp_stream(*address)
    received = bytearray()
    try:
        with trio.fail_after(5):
            await stream.send_all(payload)
            while chunk := await stream.receive_some(65536):
                received += chunk
    except trio.BrokenResourceError:
        pass  # a reset after the server gave up on us
    finally:
        await stream.aclose()
    return bytes(received)


def status_of(raw: bytes) -> int | None:
    if not raw:
        return None
    return int(raw.split(b" ", 2)[1])


def test_json_route_with_httpx(data_path):
    async def client(address):
        base = f"http://{address[0]}:{address[1]}"
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{base}/json?a=1&b=&c=x%20y")
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/json"
            assert r.headers["server"] == "test-server" and r.headers["x-test"] == "1"
            assert r.json() == {"path": "/json", "query": {"a": "1", "b": "", "c": "x y"}, "ok": True}

            r = await http.post(f"{base}/echo", json={"k": [1, 2]})
            assert r.status_code == 200
            assert r.json() == {"got": {"k": [1, 2]}, "type": "application/json"}

            r = await http.post(f"{base}/echo", content=b"not json")
            assert r.status_code == 400 and r.json()["errno"] == "EINVAL"

    run_with_server(data_path, client)


def test_unknown_path_and_wrong_method(data_path):
    async def client(address):
        base = f"http://{address[0]}:{address[1]}"
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{base}/nope")
            assert r.status_code == 404 and r.json()["errno"] == "ENOENT"
            r = await http.post(f"{base}/json")
            assert r.status_code == 405 and r.json()["errno"] == "EINVAL"
            r = await http.delete(f"{base}/echo")
            assert r.status_code == 405

    run_with_server(data_path, client)


def test_dora_error_and_handler_crash(data_path):
    async def client(address):
        base = f"http://{address[0]}:{address[1]}"
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{base}/missing")
            assert r.status_code == 404
            assert r.json() == {"errno": "ENOENT", "message": "no such object: s3://b/k"}
            for _ in range(3):
                r = await http.get(f"{base}/boom")
                assert r.status_code == 500 and r.json()["errno"] == "EIO"
                assert "handler bug" not in r.text  # internals stay in the log
        await still_serving(address)

    run_with_server(data_path, client)


@pytest.mark.parametrize("offset,length", [(0, len(FILE_DATA)), (1, 10), (4097, 1 << 20), (len(FILE_DATA) - 7, 7)])
def test_file_body_is_byte_exact(data_path, offset, length):
    async def client(address):
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{address[0]}:{address[1]}/file",
                               params={"offset": offset, "length": length})
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == length
            assert r.content == FILE_DATA[offset:offset + length]

    run_with_server(data_path, client)


def test_keep_alive_serves_several_requests_on_one_connection(data_path):
    async def client(address):
        raw = await RawClient.open(address)
        head, body = await raw.request("GET", "/json?n=1")
        assert head.status_code == 200 and json.loads(body)["query"] == {"n": "1"}
        head, body = await raw.request("GET", "/file?offset=5&length=1000")
        assert head.status_code == 200 and body == FILE_DATA[5:1005]
        head, body = await raw.request("POST", "/echo", b'{"x": 1}')
        assert head.status_code == 200 and json.loads(body)["got"] == {"x": 1}
        head, body = await raw.request("GET", "/boom")  # an error answer keeps the connection too
        assert head.status_code == 500
        head, body = await raw.request("GET", "/json?n=2")
        assert head.status_code == 200 and json.loads(body)["query"] == {"n": "2"}
        await raw.stream.aclose()

        # Pipelined: two requests in one write, two answers in order.
        stream = await trio.open_tcp_stream(*address)
        raw = RawClient(stream)
        await stream.send_all(b"GET /json?n=3 HTTP/1.1\r\nHost: t\r\n\r\nGET /json?n=4 HTTP/1.1\r\nHost: t\r\n\r\n")
        for n in ("3", "4"):
            raw.conn.send(h11.Request(method="GET", target=f"/json?n={n}", headers=[("Host", "t")]))
            raw.conn.send(h11.EndOfMessage())  # bookkeeping only: the bytes went out above
            head, body = await raw.response()
            assert head.status_code == 200 and json.loads(body)["query"] == {"n": n}
            raw.conn.start_next_cycle()
        await stream.aclose()

    run_with_server(data_path, client)


@pytest.mark.parametrize("payload", [
    b"GARBAGE\r\n\r\n",
    b"GET /json HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n",
    b"GET /json HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /json HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /json HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
])
def test_malformed_request_gets_400_and_server_keeps_serving(data_path, payload):
    async def client(address):
        raw = await raw_exchange(address, payload)
        assert status_of(raw) == 400, raw
        await still_serving(address)

    run_with_server(data_path, client)


def test_unparseable_target_gets_400_and_server_keeps_serving(data_path):
    async def client(address):
        raw = await raw_exchange(address, b"GET //[ HTTP/1.1\r\nHost: t\r\n\r\n")
        await still_serving(address)
        assert status_of(raw) == 400, raw

    run_with_server(data_path, client)


def test_head_answers_the_get_head_without_a_body(data_path):
    async def client(address):
        base = f"http://{address[0]}:{address[1]}"
        async with httpx.AsyncClient() as http:
            got = await http.get(f"{base}/json")
            head = await http.head(f"{base}/json")
            assert head.status_code == 200 and head.content == b""
            for name in ("content-type", "content-length", "x-test", "server"):
                assert head.headers[name] == got.headers[name], name
            head = await http.head(f"{base}/file?offset=5&length=1000")
            assert head.status_code == 200 and head.headers["content-length"] == "1000"
            missing = await http.head(f"{base}/missing")
            assert missing.status_code == 404 and missing.content == b""
        # On the wire: the head and nothing after it, then the next request on the same connection.
        stream = await trio.open_tcp_stream(*address)
        try:
            await stream.send_all(b"HEAD /file HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = bytearray()
            with trio.move_on_after(0.5):  # a body would follow at once; none must come
                while b"\r\n\r\n" not in answer or len(answer) < 64 * 1024:
                    answer += await stream.receive_some(65536)
            head, rest = bytes(answer).split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert f"content-length: {len(FILE_DATA)}".encode() in head.lower()
            assert rest == b"", rest[:100]
            await stream.send_all(b"GET /json?n=3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = bytearray()
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            assert status_of(bytes(answer)) == 200 and b'"n": "3"' in bytes(answer)
        finally:
            await stream.aclose()

    run_with_server(data_path, client)


BIG_HEAD = b"GET /json HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n\r\n"


@pytest.mark.parametrize("pieces", [
    [BIG_HEAD[:17 * 1024], BIG_HEAD[17 * 1024:]],  # over 16 KiB buffered while incomplete
    [BIG_HEAD[:-4] + b"\r\nX-More: " + b"b" * (200 * 1024) + b"\r\n\r\n"],  # 220 KiB
])
def test_oversized_header_is_rejected_and_server_keeps_serving(data_path, pieces):
    async def client(address):
        stream = await trio.open_tcp_stream(*address)
        received = bytearray()
        try:
            with trio.fail_after(5):
                for piece in pieces:
                    await stream.send_all(piece)
                    await trio.sleep(0.05)
                while chunk := await stream.receive_some(65536):
                    received += chunk
        except trio.BrokenResourceError:
            pass  # reset: the server closed with our bytes unread
        finally:
            await stream.aclose()
        assert status_of(bytes(received)) == 431, bytes(received[:200])
        assert json.loads(bytes(received).split(b"\r\n\r\n", 1)[1])["errno"] == "EINVAL"
        await still_serving(address)

    run_with_server(data_path, client)


@pytest.mark.parametrize("pieces", [[BIG_HEAD], [BIG_HEAD[:8192], BIG_HEAD[8192:]]], ids=["one-write", "8k+12k"])
def test_oversized_header_below_the_incomplete_limit_is_rejected(data_path, pieces):
    test_oversized_header_is_rejected_and_server_keeps_serving(data_path, pieces)


def test_client_disconnecting_mid_body_does_not_hurt_the_server(data_path):
    async def client(address):
        for _ in range(3):
            stream = await trio.open_tcp_stream(*address)
            await stream.send_all(b"GET /file HTTP/1.1\r\nHost: t\r\n\r\n")
            await stream.receive_some(1000)
            await stream.aclose()  # leaves megabytes unread
        await still_serving(address)

    run_with_server(data_path, client)


def test_a_client_gone_while_its_slow_request_reports_progress_is_no_server_error(data_path, caplog):
    """A client that asked for `102 Processing` answers and left: the interim answer
    that finds it gone ends the connection quietly, and the server keeps serving."""
    async def client(address):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Dorafs-Progress: 1\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 102 ")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # a reset: the next interim answer cannot be sent
        await trio.sleep(2.5 * PROGRESS_INTERVAL)
        # And one that stays gets its progress and then its answer.
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{address[0]}:{address[1]}/slow", headers={"X-Dorafs-Progress": "1"})
        assert r.status_code == 200 and r.json() == {"slow": True}
        await still_serving(address)

    with caplog.at_level(logging.WARNING, logger="dorafs"):
        run_with_server(data_path, client)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- the common request, without h11 (dorafs/http/lean.py) ----------------------------------

_NAMES = st.sampled_from(["X-Request-Id", "Accept", "x-dorafs-progress", "Connection"] * 4 +
                         ["X_y", "Host", "Content-Length", "Transfer-Encoding", "Expect", "Upgrade", "Bad Name", "",
                          "Na\xe9"])
_VALUES = st.sampled_from(["close", "keep-alive", "t", " 1 ", "a b", "x\ty", ""] * 3) | \
    st.text(alphabet=st.sampled_from(list("ab1 \t:/=%\x7f\x00\xe9")), max_size=12)


@settings(max_examples=400, deadline=None)
@given(method=st.sampled_from(["GET"] * 12 + ["HEAD", "POST", "get", "GET "]),
       target=st.sampled_from(["/v1/page?uri=s3%3A%2F%2Fb%2Fk&index=3"] * 14 + ["/", "//x", "/a#b", "*", "/a b",
                                                                               "/\xe9", "http://h/x"]),
       version=st.sampled_from(["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2"]),
       host=st.sampled_from(["Host: t"] * 4 + ["host:t ", "Host:", ""]),
       fields=st.lists(st.tuples(_NAMES, _VALUES), max_size=3), fold=st.integers(0, 9))
def test_lean_reads_only_requests_h11_accepts_and_reads_them_alike(method, target, version, host, fields, fold):
    lines = [f"{method} {target} {version}"] + ([host] if host else []) + \
        [f"{name}: {value}" for name, value in fields]
    if fold == 9 and len(lines) > 1:
        lines.append(" folded")
    head = "\r\n".join(lines).encode("latin-1")
    parsed = lean.parse_head(head)
    if parsed is None:
        return  # h11's to read, whatever it makes of it
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    event = conn.next_event()  # raises if h11 would refuse what lean took
    assert isinstance(event, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)  # and no body either
    assert parsed == (event.method.decode(), event.target.decode(),
                      {k.decode(): v.decode() for k, v in event.headers})


def test_a_streamed_answer_and_a_close_without_h11(data_path):
    async def client(address):
        stream = await trio.open_tcp_stream(*address)
        raw = RawClient(stream)
        streamed = b"first;" + FILE_DATA[10:100_010] + b";(pair);last"
        head, body = await raw.request("GET", "/stream")  # with Content-Length: read by h11
        assert head.status_code == 200 and body == streamed
        assert (b"transfer-encoding", b"chunked") in head.headers
        async with httpx.AsyncClient() as http:  # the common shape: read and answered without h11
            answer = await http.get(f"http://{address[0]}:{address[1]}/stream")
            assert answer.status_code == 200 and answer.content == streamed
        head, body = await raw.request("HEAD", "/stream")
        assert head.status_code == 200 and body == b""
        await stream.aclose()
        # Asked to close: the answer says so and the connection ends after it.
        answer = await raw_exchange(address, b"GET /json?n=5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 200 and b"\r\nConnection: close\r\n" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["query"] == {"n": "5"}
        await still_serving(address)

    run_with_server(data_path, client)
