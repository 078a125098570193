"""Thousands of hostile requests against a real worker: 4xx answers, no crash, no escape.

One worker (with the cluster secret and `ufs_roots` set to a file:// root and an S3
prefix) takes Hypothesis-generated requests over raw keep-alive sockets: traversal in
every spelling, huge and negative numbers, malformed versions, odd methods and paths,
giant headers, wrong tokens. Meanwhile slow clients hold connections open. Afterwards:
every answer was a 2xx or 4xx, no answer carried the decoy bytes kept outside the root,
nothing outside the cache directory changed, the slow clients were dropped, and the
worker still serves correct pages to a well-behaved client.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import REFUSED, ProcessSet

DECOY = b"DECOY-" + secrets.token_hex(8).encode()  # kept outside the root; must never be served
PAGE = 64 * 1024
EXAMPLES = int(os.environ.get("DORAFS_FUZZ_EXAMPLES", "600"))


class RawClient:
    """Keep-alive HTTP/1.1 over a plain socket, sending bytes exactly as given."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.target = (host, int(port))
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        return data

    def exchange(self, raw: bytes, head_only: bool) -> tuple[int, dict[str, str], bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(self.target, timeout=30)
        try:
            self.sock.sendall(raw)
            while b"\r\n\r\n" not in self.buf:
                self.buf += self._recv()
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = 0 if head_only else int(headers.get("content-length", "0"))
            while len(self.buf) < length:
                self.buf += self._recv()
            body, self.buf = self.buf[:length], self.buf[length:]
        except (ConnectionError, OSError):
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


# -- the hostile vocabulary ---------------------------------------------------------------

def uris(root: Path, bucket: str) -> st.SearchStrategy[str]:
    base = f"file://{root}"
    pieces = st.sampled_from(["..", ".", "", "a.bin", "sub", "b.txt", "link-out", "decoy.txt", "%2e%2e", "%2F",
                              "..%2F..%2Foutside", "\x00", "..\\..", "~", "\u2603", "n" * 300, "/", "//", "?", "#"])
    suffix = st.lists(pieces, max_size=6).map("/".join)
    return st.one_of(
        suffix.map(lambda s: f"{base}/{s}"),
        suffix.map(lambda s: f"s3://{bucket}/fz/{s}"),
        st.sampled_from([
            "file:///etc/passwd", "file:///etc/shadow", f"{base}/../outside/decoy.txt", f"{base}/link-out/decoy.txt",
            f"{base}-sibling/x", f"file://{root.parent}/outside/decoy.txt", "file://", "file:///", f"{base}/",
            f"FILE://{root}/a.bin", f"file:{root}/a.bin", f"file:/{root}/a.bin", f"s3://{bucket}",
            f"s3://{bucket}/fz/../../etc", "s3://", "s3:///x", "memory:///x", "http://127.0.0.1:1/x",
            "gopher://x", "/etc/passwd", "", "..", f"{base}/a.bin", f"{base}/sub", f"s3://{bucket}/fz/k.bin",
        ]),
        st.text(max_size=40),
    )


numbers = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.sampled_from(["", "-0", "0x10", "1e9", " 5", "5 ", "NaN", "inf", "4611686018427387904", "9" * 400,
                     "0", "1", str(PAGE), str(2 * PAGE + 17), "+3", "٣"]),
)
versions = st.one_of(st.text(max_size=30), st.sampled_from(["", "\x00", "x" * 5000, '"etag"', "\r\nX: y"]))


@st.composite
def requests(draw, root: Path, bucket: str, secret: str, good_version: str) -> tuple[bytes, bool]:
    method = draw(st.sampled_from(["GET"] * 6 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "BREW", "G\x01T"]))
    path = draw(st.sampled_from(["/v1/page"] * 4 + ["/v1/stat"] * 2 + [
        "/v1/list", "/v1/info", "/metrics", "/healthz", "/", "//v1/page", "/v1/page/", "/v1/page/../info",
        "/%2e%2e/etc/passwd", "/v1/../../etc/passwd", "/V1/PAGE", "/v1/page%00", "*", "http://x/v1/info"]))
    params = {}
    for name in draw(st.lists(st.sampled_from(["uri", "version", "size", "index", "page_size", "after", "limit",
                                               "verify", "x"]), max_size=8)):
        if name == "uri":
            params[name] = draw(uris(root, bucket))
        elif name == "version":
            params[name] = draw(st.one_of(versions, st.just(good_version)))
        elif name in ("after", "x"):
            params[name] = draw(st.text(max_size=20))
        else:
            params[name] = draw(numbers)
    if draw(st.booleans()):  # a well-formed query
        query = urlencode(params, quote_via=quote)
    else:  # bytes as they come: spaces, NUL, raw '/' and '%', non-ASCII
        query = "&".join(f"{k}={v}" for k, v in params.items())
    token = draw(st.sampled_from([secret] * 6 + ["", secret[:-1], secret + "0", "x" * 100, secret.upper()]))
    headers = [("Host", "w")]
    if token:
        headers.append(("Authorization", draw(st.sampled_from(["Bearer ", "bearer ", "Basic ", "Bearer  "])) + token))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("X-Big", "b" * draw(st.sampled_from([100, 17_000, 70_000]))))
    if draw(st.integers(0, 9)) == 0:
        headers.append(draw(st.sampled_from([("Content-Length", "-1"), ("Transfer-Encoding", "chunked"),
                                             ("X-Request-Id", "\u2603" * 80), ("Content-Length", "3, 4"),
                                             ("X\x00Y", "z"), ("Host", "second")])))
    body = b""
    if ("Transfer-Encoding", "chunked") in headers:  # a chunked body, well formed or not, but complete
        body = draw(st.sampled_from([b"0\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\n\r\n", b"-1\r\n\r\n"]))
    elif method in ("POST", "PUT") and draw(st.booleans()):
        body = draw(st.binary(max_size=200))
        headers.append(("Content-Length", str(len(body))))
    target = path + ("?" + query if params else "")
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body, method == "HEAD"


@st.composite
def near_valid(draw, root: Path, bucket: str, secret: str, good: dict) -> tuple[bytes, bool]:
    """A well-formed, authenticated API request with one or two hostile parameters."""
    path = draw(st.sampled_from(["/v1/page", "/v1/page", "/v1/stat", "/v1/list"]))
    params = {"uri": f"file://{root}/a.bin", "version": good["version"], "size": str(good["size"]), "index": "0"}
    if path == "/v1/list":
        params = {"uri": f"file://{root}", "after": "", "limit": "10"}
    elif path == "/v1/stat":
        params = {"uri": params["uri"]}
    for name in draw(st.lists(st.sampled_from(sorted(params)), min_size=1, max_size=2, unique=True)):
        params[name] = draw(uris(root, bucket) if name == "uri" else versions if name == "version"
                            else st.text(max_size=10) if name == "after" else numbers)
    target = f"{path}?{urlencode(params, quote_via=quote)}"
    return f"GET {target} HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {secret}\r\n\r\n".encode(), False


# -- the test ------------------------------------------------------------------------------

class FileWatch:
    """inotify on a few directories: any open, read, write, create or delete inside them."""

    MASK = 0x1 | 0x2 | 0x4 | 0x20 | 0x100 | 0x200  # ACCESS MODIFY ATTRIB OPEN CREATE DELETE

    def __init__(self, directories: list[Path]):
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.paths = {}
        for directory in directories:
            wd = self._libc.inotify_add_watch(self.fd, str(directory).encode(), self.MASK)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.paths[wd] = directory

    def events(self) -> list[tuple[Path, int, str]]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = int.from_bytes(data[offset:offset + 4], "little", signed=True), \
                    int.from_bytes(data[offset + 4:offset + 8], "little"), 0, \
                    int.from_bytes(data[offset + 12:offset + 16], "little")
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                found.append((self.paths.get(wd), mask, name))
                offset += 16 + length
        return found

    def close(self) -> None:
        os.close(self.fd)



def snapshot(base: Path, skip: Path) -> dict[str, tuple]:
    """Every path under `base` except `skip`: type, mode, size, mtime and a hash of files."""
    found = {}
    for directory, dirs, files in os.walk(base):
        here = Path(directory)
        if here == skip or skip in here.parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = here / name
            st_ = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            found[str(path.relative_to(base))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return found


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, s3_server):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (base / "outside").mkdir()
    (base / "outside" / "decoy.txt").write_bytes(DECOY)
    (base / "root-sibling").mkdir()
    (base / "root-sibling" / "x").write_bytes(DECOY)
    data = os.urandom(2 * PAGE + 17)
    (root / "a.bin").write_bytes(data)
    (root / "sub" / "b.txt").write_bytes(b"hello")
    (root / "link-out").symlink_to(base / "outside")
    bucket = "fuzz-bucket"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="fz/k.bin", Body=b"k" * 100)
    s3.put_object(Bucket=bucket, Key="decoy.txt", Body=DECOY)
    secret = secrets.token_hex(32)
    with ProcessSet(base / "procs") as procs:
        procs.allow = (REFUSED,)  # the hostile requests without or with a wrong secret
        worker = procs.worker(page_size="64KiB", env={"DORAFS_SECRET": secret},
                              extra=["--ufs-roots", f"file://{root},s3://{bucket}/fz"],
                              http={"headers": {"Authorization": f"Bearer {secret}"}})
        yield base, root, bucket, secret, worker, data


def test_worker_survives_thousands_of_hostile_requests(fuzz_target):
    base, root, bucket, secret, worker, data = fuzz_target
    auth = {"Authorization": f"Bearer {secret}"}
    status = httpx.get(f"http://{worker.address}/v1/stat", params={"uri": f"file://{root}/a.bin"}, headers=auth,
                       timeout=10).json()
    before = snapshot(base, worker.dir)
    # Nothing may even open a file beside the root (the decoys) or create one next to it.
    watch = FileWatch([base, base / "outside", base / "root-sibling"])

    # Slow clients, held open during the whole run: a head dribbled byte by byte, and a
    # body promised but never sent.
    host, port = worker.address.rsplit(":", 1)
    slow = [socket.create_connection((host, int(port)), timeout=60) for _ in range(2)]
    slow[0].sendall(b"GET /v1/info HTTP/1.1\r\nHo")
    slow[1].sendall(b"POST /v1/info HTTP/1.1\r\nHost: w\r\nContent-Length: 1000000000\r\n"
                    + f"Authorization: Bearer {secret}\r\n\r\n".encode())
    started = time.monotonic()

    client = RawClient(worker.address)
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.lists(st.one_of(requests(root, bucket, secret, status["version"]),
                              near_valid(root, bucket, secret, status)), min_size=1, max_size=8))
    def hostile(batch):
        for raw, head_only in batch:
            code, headers, body = client.exchange(raw, head_only)
            seen[code] = seen.get(code, 0) + 1
            assert 200 <= code < 500, (raw[:300], code, body[:300])
            assert DECOY not in body, raw[:300]
            if code == 200 and raw.startswith(b"GET /v1/page"):
                assert body in (data[:PAGE], data[PAGE:2 * PAGE], data[2 * PAGE:]) or len(body) == 100, raw[:300]

    try:
        hostile()
    finally:
        client.close()
    total = sum(seen.values())
    print(f"{total} hostile requests, answers by status: {dict(sorted(seen.items()))}")
    assert total >= 2000
    assert seen.get(401, 0) > 100 and seen.get(400, 0) > 100 and seen.get(403, 0) > 10 and seen.get(200, 0) > 10

    # The slow clients were cut off (after the head timeout), and nothing else was.
    for sock in slow:
        sock.settimeout(max(1.0, 40 - (time.monotonic() - started)))
        try:
            leftover = sock.recv(4096)
        except ConnectionResetError:
            leftover = b""
        assert leftover == b"" or leftover.startswith(b"HTTP/1.1 4"), leftover[:100]
        sock.close()

    # Still serving, correctly, to a well-behaved client.
    assert worker.alive()
    assert httpx.get(f"http://{worker.address}/healthz", timeout=10).status_code == 200
    pages = [httpx.get(f"http://{worker.address}/v1/page", headers=auth, timeout=10,
                       params={"uri": f"file://{root}/a.bin", "version": status["version"], "size": status["size"],
                               "index": i}).content for i in range(3)]
    assert b"".join(pages) == data

    # Nothing outside the root was opened or read; nothing outside the cache directory
    # changed; inside it, only page-store names (pages, and objects sealed whole).
    touched = [e for e in watch.events() if not (e[0] == base and e[2] == "root")]  # the root itself: listed
    watch.close()
    assert touched == [], touched[:20]
    assert snapshot(base, worker.dir) == before
    names = {p.relative_to(worker.cache_dir).as_posix() for p in worker.cache_dir.rglob("*")}
    for name in names:
        assert re.fullmatch(r"lock|worker-id|metadata\.db(-wal|-shm)?|pages|pages/tmp|pages/[0-9a-f]{2}|"
                            r"pages/[0-9a-f]{2}/[0-9a-f]{32}_\d+_[0-9a-f]{16}|"
                            r"objects|objects/[0-9a-f]{2}|objects/[0-9a-f]{2}/[0-9a-f]{32}(\.sums)?", name), name
