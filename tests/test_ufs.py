"""In-process tests of the UFS adapters: S3 against a real moto server, file:// on
tmp_path, memory:// in fsspec's process-wide memory store."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import trio

from dorafs.errors import InvalidRequest, NotADirectory, NotFound, StaleVersion, UfsError
from dorafs.ufs import FileStatus, FsspecUfs, S3Ufs, UfsSet, UnderFileSystem, join, normalize
from dorafs.ufs.fsspec_ufs import _status

DATA = os.urandom(100_003)  # not a multiple of anything
NAMES = ["plain.txt", "with space.txt", "naïve-ü.bin", "日本語"]


@dataclass
class Store:
    """One backing store: where its test directory is and how to change it behind the adapter."""

    kind: str
    base: str  # URI of this test's own directory
    root: str  # URI of the store's root
    make: Callable[[], UnderFileSystem]
    put: Callable[[str, bytes], None]  # relative path, bytes
    delete: Callable[[str], None]
    mkdir: Callable[[str], None]  # an empty directory


def _s3_store(s3_server, bucket: str) -> Store:
    client = s3_server.client()
    return Store(
        "s3", f"s3://{bucket}/base", f"s3://{bucket}", S3Ufs,
        put=lambda rel, data: client.put_object(Bucket=bucket, Key=f"base/{rel}", Body=data),
        delete=lambda rel: client.delete_object(Bucket=bucket, Key=f"base/{rel}"),
        mkdir=lambda rel: client.put_object(Bucket=bucket, Key=f"base/{rel}/", Body=b""),
    )


def _file_store(tmp_path: Path) -> Store:
    base = tmp_path / "base"
    base.mkdir()

    def put(rel: str, data: bytes) -> None:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)

    return Store(
        "file", normalize(f"file://{base}"), "file:///", lambda: FsspecUfs("file"), put,
        delete=lambda rel: (base / rel).unlink(),
        mkdir=lambda rel: (base / rel).mkdir(parents=True),
    )


def _memory_store() -> Store:
    fs = fsspec.filesystem("memory")
    top = f"dorafs-test-{uuid.uuid4().hex[:8]}"
    return Store(
        "memory", f"memory://{top}", "memory://", lambda: FsspecUfs("memory"),
        put=lambda rel, data: fs.pipe(f"/{top}/{rel}", data),
        delete=lambda rel: fs.rm(f"/{top}/{rel}"),
        mkdir=lambda rel: fs.mkdir(f"/{top}/{rel}"),
    )


@pytest.fixture(params=["s3", "file", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "s3":
        return _s3_store(request.getfixturevalue("s3_server"), request.getfixturevalue("bucket"))
    if request.param == "file":
        return _file_store(tmp_path)
    return _memory_store()


def run(make: Callable[[], UnderFileSystem], body) -> None:
    """Run `body(ufs)` in a fresh trio run with a fresh adapter, closed afterwards."""

    async def main() -> None:
        ufs = make()
        try:
            await body(ufs)
        finally:
            await ufs.aclose()

    trio.run(main)


async def pages(ufs: UnderFileSystem, uri: str) -> list[list[FileStatus]]:
    return [page async for page in ufs.list_batches(uri)]


async def listing(ufs: UnderFileSystem, uri: str) -> list[FileStatus]:
    return [status for page in await pages(ufs, uri) for status in page]


# -- every store ----------------------------------------------------------------------


def test_stat(store: Store):
    store.put("dir/file.bin", DATA)
    store.put("dir/sub/deeper.txt", b"x")

    async def body(ufs: UnderFileSystem):
        status = await ufs.stat(join(store.base, "dir/file.bin"))
        assert (status.name, status.is_dir, status.size) == ("file.bin", False, len(DATA))
        assert status.version and abs(status.mtime - dt.datetime.now().timestamp()) < 120
        assert status == await ufs.stat(join(store.base, "dir/file.bin"))  # stable

        sub = await ufs.stat(join(store.base, "dir/sub"))
        assert (sub.name, sub.is_dir, sub.size, sub.version) == ("sub", True, 0, "")
        assert (await ufs.stat(store.base)).is_dir
        root = await ufs.stat(store.root)
        assert root.is_dir and root.name == ""
        for missing in ("nope", "dir/nope", "dir/file.bin/below", "dir/su"):
            with pytest.raises(NotFound):
                await ufs.stat(join(store.base, missing))

    run(store.make, body)


def test_listing_nested_and_odd_names(store: Store):
    for name in NAMES:
        store.put(f"d/{name}", name.encode())
    store.put("d/sub/x", b"1")
    store.put("d/sub/deeper/y", b"22")
    store.mkdir("d/empty")
    store.put("d2/other", b"")  # a sibling whose name extends `d`

    async def body(ufs: UnderFileSystem):
        entries = await listing(ufs, join(store.base, "d"))
        assert [e.name for e in entries] == sorted(NAMES + ["empty", "sub"])
        by_name = {e.name: e for e in entries}
        assert by_name["sub"].is_dir and by_name["empty"].is_dir
        for name in NAMES:
            assert by_name[name] == await ufs.stat(join(store.base, f"d/{name}"))
            assert by_name[name].size == len(name.encode())
        assert [(e.name, e.is_dir) for e in await listing(ufs, join(store.base, "d/sub"))] == [
            ("deeper", True), ("x", False)]
        assert await pages(ufs, join(store.base, "d/empty")) == []
        assert [e.name for e in await listing(ufs, store.base)] == ["d", "d2"]

        with pytest.raises(NotADirectory):
            await pages(ufs, join(store.base, "d/sub/x"))
        with pytest.raises(NotFound):
            await pages(ufs, join(store.base, "missing"))

    run(store.make, body)


def test_read_ranges(store: Store):
    store.put("f.bin", DATA)
    store.put("empty", b"")
    size = len(DATA)

    async def body(ufs: UnderFileSystem):
        uri = join(store.base, "f.bin")
        version = (await ufs.stat(uri)).version
        cases = [(0, 10), (0, size), (12_345, 54_321), (size - 10, 10), (size - 10, 1000),
                 (size, 10), (size + 5, 10), (7, 0), (size - 1, 1)]
        for offset, length in cases:
            assert await ufs.read(uri, offset, length, version) == DATA[offset:offset + length]
        assert await ufs.read(uri, 100, 50, "") == DATA[100:150]  # unpinned
        empty = join(store.base, "empty")
        assert await ufs.read(empty, 0, 10, (await ufs.stat(empty)).version) == b""

    run(store.make, body)


def test_pinned_read_after_overwrite_and_delete(store: Store):
    store.put("f", DATA)

    async def body(ufs: UnderFileSystem):
        uri = join(store.base, "f")
        version = (await ufs.stat(uri)).version
        assert await ufs.read(uri, 0, 4, version) == DATA[:4]

        await trio.sleep(0.01)  # a later mtime, even on coarse clocks
        store.put("f", DATA[::-1] + b"more")
        with pytest.raises(StaleVersion):
            await ufs.read(uri, 0, 4, version)
        new = (await ufs.stat(uri)).version
        assert new != version
        assert await ufs.read(uri, 0, 4, new) == DATA[::-1][:4]

        store.delete("f")
        with pytest.raises(StaleVersion):
            await ufs.read(uri, 0, 4, new)
        with pytest.raises(NotFound):
            await ufs.read(uri, 0, 4, "")

    run(store.make, body)


# -- S3 only --------------------------------------------------------------------------


def test_s3_directory_shadows_file(s3_server, bucket):
    client = s3_server.client()
    for key in ["a", "a/x", "a.txt", "a!b", "b", "c/", "c"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"12345")

    async def body(ufs: S3Ufs):
        assert (await ufs.stat(f"s3://{bucket}/a")).is_dir
        c = await ufs.stat(f"s3://{bucket}/c")  # a `c/` marker shadows the file `c`
        assert c.is_dir and c.mtime > 0
        assert not (await ufs.stat(f"s3://{bucket}/a.txt")).is_dir
        expected = [("a", True), ("a!b", False), ("a.txt", False), ("b", False), ("c", True)]
        for page_size in (1000, 1, 2, 3):  # a file and its shadowing prefix on different pages
            ufs._page_size = page_size
            entries = await listing(ufs, f"s3://{bucket}")
            assert sorted((e.name, e.is_dir) for e in entries) == expected, page_size
        ufs._page_size = 2
        assert all(len(p) >= 1 for p in await pages(ufs, f"s3://{bucket}"))

    run(S3Ufs, body)


def test_s3_pagination(s3_server, bucket):
    client = s3_server.client()
    keys = [f"big/{i:05d}-ü" for i in range(2100)]
    with ThreadPoolExecutor(10) as pool:  # the client's connection pool size
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"z"), keys))
    client.put_object(Bucket=bucket, Key="big/", Body=b"")  # the directory's own marker

    async def body(ufs: S3Ufs):
        got = await pages(ufs, f"s3://{bucket}/big")
        # The last file of a page waits for the next page, in case `name/` comes there.
        assert len(got) == 3 and all(990 <= len(p) <= 1000 for p in got[:2])
        names = [e.name for p in got for e in p]
        assert names == [k[4:] for k in keys]
        assert all(e.size == 1 and e.version for p in got for e in p)

    run(S3Ufs, body)


def test_s3_marker_and_missing_bucket(s3_server, bucket):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="only-marker/", Body=b"")
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"

    async def body(ufs: S3Ufs):
        assert (await ufs.stat(f"s3://{bucket}/only-marker")).is_dir
        assert await pages(ufs, f"s3://{bucket}/only-marker") == []
        assert await pages(ufs, f"s3://{bucket}/") == [[FileStatus("only-marker", True)]]
        for uri in (f"s3://{missing}", f"s3://{missing}/", f"s3://{missing}/key"):
            with pytest.raises(NotFound):
                await ufs.stat(uri)
            with pytest.raises(NotFound):
                await pages(ufs, uri)
        with pytest.raises(UfsError, match=f"get_object s3://{missing}/key: NoSuchBucket"):
            await ufs.read(f"s3://{missing}/key", 0, 10, '"abc"')

    run(S3Ufs, body)


def test_s3a_and_concurrent_first_use(s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"hello")

    async def body(ufs: S3Ufs):
        results: list[bytes] = []

        async def one() -> None:
            results.append(await ufs.read(f"s3a://{bucket}/k", 1, 3, ""))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert results == [b"ell"] * 8

    run(S3Ufs, body)


# -- fsspec only and the scheme table -------------------------------------------------


def test_fsspec_pages_of_1000(tmp_path):
    for i in range(2100):
        (tmp_path / f"{i:05d}").write_bytes(b"")
    os.mkfifo(tmp_path / "zz-fifo")  # never listed: reading it would block
    (tmp_path / "zz-broken").symlink_to(tmp_path / "nowhere")
    (tmp_path / "zz-link").symlink_to(tmp_path / "00000")

    async def body(ufs: UnderFileSystem):
        got = await pages(ufs, f"file://{tmp_path}")
        assert [len(p) for p in got] == [1000, 1000, 101]
        assert got[-1][-1] == await ufs.stat(f"file://{tmp_path}/zz-link")
        assert got[-1][-1].name == "zz-link" and not got[-1][-1].is_dir

    run(lambda: FsspecUfs("file"), body)


def test_fsspec_memory_uri_matches_fsspec_path():
    fsspec.filesystem("memory").pipe("/dorafs-mem-check/y", b"abc")

    async def body(ufs: UnderFileSystem):
        assert (await ufs.stat("memory://dorafs-mem-check/y")).size == 3
        assert await ufs.read("memory://dorafs-mem-check/y", 0, 3, "") == b"abc"
        assert "dorafs-mem-check" in [e.name for e in await listing(ufs, "memory://")]

    run(lambda: UfsSet().get("memory://"), body)


def test_version_from_info_values():
    base = {"name": "/x/f", "size": 3, "type": "file"}
    when = dt.datetime(2024, 1, 2, 3, 4, 5, 600_000, tzinfo=dt.timezone.utc)
    ns = "1704164645600000000-3"
    assert _status({**base, "mtime": when.timestamp()}).version == ns
    assert _status({**base, "created": when}).version == ns
    assert _status({**base, "LastModified": when.replace(tzinfo=None)}).version == ns
    assert _status({**base, "updated": "2024-01-02T03:04:05.600Z"}).version == ns
    assert _status({**base, "mtime": 1704164645}).version == "1704164645000000000-3"
    assert _status({**base, "mtime": 1.0, "ETag": '"e"'}).version == '"e"'
    assert _status({**base, "generation": 17}).version == "17"


def test_ufs_set():
    async def body() -> None:
        ufs_set = UfsSet(threads=4)
        assert isinstance(ufs_set.get("s3://b/k"), S3Ufs)
        assert ufs_set.get("s3://other") is ufs_set.get("S3://b")
        assert isinstance(ufs_set.get("s3a://b/k"), S3Ufs)
        assert isinstance(ufs_set.get("file:///tmp"), FsspecUfs)
        assert ufs_set.get("memory://x") is ufs_set.get("memory://y")
        for bad in ("nosuchscheme://x/y", "/plain/path"):
            with pytest.raises(InvalidRequest):
                ufs_set.get(bad)
        await ufs_set.aclose()

    trio.run(body)
