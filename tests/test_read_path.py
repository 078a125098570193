"""The end-to-end read path through real processes: moto S3 -> workers -> FUSE mount."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorafs.client.prefetch import GROUP_PAGES
from dorafs.pages import object_id, page_count
from dorafs.ring import HashRing
from tests.cluster import CORRUPT, ESTALE_READ, FAILOVER, ProcessSet
from tests.support import wait_for

MiB = 1 << 20
PAGE = MiB
# Files read page by page: one of a page or more read to its end is otherwise sealed into
# one object file and held by the next open (tests/test_objectfiles.py), and what these
# tests look at (page files, page requests, the page buffer) is the page path.
PAGEWISE = "passthrough_min_size=1GiB"
# A worker that keeps such files as pages: one seals a version of a page or more into one
# object file as soon as its last page is cached (seal_min_size); the tests that look at
# page files themselves ask it not to.
PAGE_FILES = ["--seal-min-size", "0"]


def put(s3, bucket: str, key: str, data: bytes) -> str:
    return s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def worker_id(worker) -> str:
    return httpx.get(f"http://{worker.address}/v1/info", timeout=5).json()["id"]


# -- byte-exact reads, checked with Hypothesis over (offset, size) sequences ------------

SIZES = {"empty": 0, "one": 1, "page-1": PAGE - 1, "page": PAGE, "page+1": PAGE + 1,
         "pages": 3 * PAGE + 12345, "large": 100 * MiB + 7}


@pytest.fixture(scope="module")
def exact_cluster(s3_server, tmp_path_factory):
    """One worker and a direct_io mount (no kernel cache: every read reaches dorafs)."""
    s3 = s3_server.client()
    bucket = "exact-reads"
    s3.create_bucket(Bucket=bucket)
    rng = random.Random(7)
    objects = {}
    for name, size in SIZES.items():
        data = rng.randbytes(size)
        put(s3, bucket, f"data/{name}.bin", data)
        objects[name] = data
    with ProcessSet(tmp_path_factory.mktemp("exact")) as procs:
        worker = procs.worker()
        mount = procs.mount(f"s3://{bucket}/data", workers=[worker.address], options="direct_io")
        yield mount, objects


def test_whole_files_byte_exact(exact_cluster):
    mount, objects = exact_cluster
    for name, data in objects.items():
        path = mount.path(f"{name}.bin")
        assert path.stat().st_size == len(data), name
        assert read_file(path) == data, name


reads = st.lists(st.tuples(st.integers(0, 101 * MiB), st.integers(0, 3 * MiB)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SIZES)), ops=reads, data=st.data())
def test_positional_reads_byte_exact(exact_cluster, name, ops, data):
    mount, objects = exact_cluster
    expected = objects[name]
    size = len(expected)
    fd = os.open(mount.path(f"{name}.bin"), os.O_RDONLY)
    try:
        for offset, length in ops:
            # Half the reads land inside the object, near its pages' edges.
            if size and data.draw(st.booleans()):
                edge = data.draw(st.integers(0, size // PAGE)) * PAGE
                offset = max(0, min(size - 1, edge + data.draw(st.integers(-3, 3))))
            assert os.pread(fd, length, offset) == expected[offset:offset + length], (name, offset, length)
    finally:
        os.close(fd)


# -- listings ---------------------------------------------------------------------------

def test_listing_matches_bucket(procs, s3_server, bucket):
    s3 = s3_server.client()
    keys = ["top.txt", "a/b/c/deep.txt", "a/b/sibling.bin", "a/x.txt", "with space/file name.txt",
            "ünïcødé/日本語.txt", "ünïcødé/emoji-🙂.txt", "empty-parent/child/leaf"]
    keys += [f"big/entry-{i:05d}.dat" for i in range(2100)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda k: put(s3, bucket, f"root/{k}", k.encode()), keys))
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/root", workers=[worker.address])

    expected_dirs: dict[str, set[str]] = {"": set()}
    expected_files: dict[str, set[str]] = {"": set()}
    for key in keys:
        parts = key.split("/")
        for depth in range(len(parts) - 1):
            parent, child = "/".join(parts[:depth]), parts[depth]
            expected_dirs.setdefault(parent, set()).add(child)
            expected_dirs.setdefault("/".join(parts[:depth + 1]), set())
            expected_files.setdefault("/".join(parts[:depth + 1]), set())
        expected_files.setdefault("/".join(parts[:-1]), set()).add(parts[-1])

    seen_dirs, seen_files = {}, {}
    for root, dirs, files in os.walk(mount.mountpoint):
        rel = os.path.relpath(root, mount.mountpoint)
        rel = "" if rel == "." else rel
        seen_dirs[rel], seen_files[rel] = set(dirs), set(files)
    assert seen_dirs == expected_dirs
    assert seen_files == expected_files
    assert len(os.listdir(mount.path("big"))) == 2100
    assert mount.path("a", "b", "c", "deep.txt").read_bytes() == b"a/b/c/deep.txt"
    assert mount.path("ünïcødé", "日本語.txt").read_bytes() == "ünïcødé/日本語.txt".encode()
    st_ = mount.path("with space", "file name.txt").stat()
    assert st_.st_size == len("with space/file name.txt")


# -- the cache serves second reads ------------------------------------------------------

def test_second_read_makes_no_ufs_request_even_after_worker_restart(procs, s3_server, bucket):
    data = os.urandom(5 * MiB + 100)
    put(s3_server.client(), bucket, "ds/file.bin", data)
    worker = procs.worker(extra=["--status-ttl", "60s"])
    first = procs.mount(f"s3://{bucket}/ds", workers=[worker.address], options=PAGEWISE)
    assert read_file(first.path("file.bin")) == data
    reads_after_first = worker.counter("dorafs_worker_ufs_requests_total")
    metrics = worker.metrics()
    assert metrics["dorafs_worker_ufs_bytes_total"] == len(data)  # every page read from the UFS once,
    assert 1 <= metrics["dorafs_worker_ufs_requests_total{op=read}"] < 6  # readahead in runs of pages
    first.unmount()

    second = procs.mount(f"s3://{bucket}/ds", workers=[worker.address], options=PAGEWISE)  # no kernel cache
    assert read_file(second.path("file.bin")) == data
    assert worker.counter("dorafs_worker_ufs_requests_total") == reads_after_first  # not one UFS request
    assert worker.metrics()["dorafs_worker_page_requests_total{result=hit}"] >= 6
    second.unmount()

    worker.restart()  # the page index is rebuilt from disk
    third = procs.mount(f"s3://{bucket}/ds", workers=[worker.address], options=PAGEWISE)
    assert read_file(third.path("file.bin")) == data
    metrics = worker.metrics()
    assert metrics.get("dorafs_worker_ufs_requests_total{op=read}", 0) == 0
    assert metrics["dorafs_worker_page_requests_total{result=hit}"] >= 6


def test_pages_live_only_on_their_ring_owner(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"f{i:02d}.bin": os.urandom(2 * MiB + i) for i in range(24)}
    etags = {name: put(s3, bucket, f"two/{name}", data) for name, data in files.items()}
    workers = [procs.worker(extra=PAGE_FILES), procs.worker(extra=PAGE_FILES)]
    mount = procs.mount(f"s3://{bucket}/two", workers=[w.address for w in workers], options=PAGEWISE)
    for name, data in files.items():
        assert read_file(mount.path(name)) == data
    ring = HashRing([worker_id(w) for w in workers])
    by_id = {worker_id(w): w for w in workers}
    owners = set()
    for name in files:
        uri = f"s3://{bucket}/two/{name}"
        oid = object_id(uri, etags[name])
        owner = by_id[ring.owner(uri)]
        owners.add(owner.name)
        for w in workers:
            pages = sorted(int(p.name.split("_")[1]) for p in w.page_files() if p.name.startswith(oid))
            expected = list(range(page_count(len(files[name]), PAGE))) if w is owner else []
            assert pages == expected, (name, w.name)
    assert len(owners) == 2  # 24 files: both workers own some


def test_read_survives_worker_killed_mid_read(procs, s3_server, bucket):
    data = os.urandom(64 * MiB)
    put(s3_server.client(), bucket, "k/long.bin", data)
    workers = [procs.worker(), procs.worker()]
    mount = procs.mount(f"s3://{bucket}/k", workers=[w.address for w in workers])
    ring = HashRing([worker_id(w) for w in workers])
    owner = next(w for w in workers if worker_id(w) == ring.owner(f"s3://{bucket}/k/long.bin"))
    procs.allow = (FAILOVER,)
    got = bytearray()
    with open(mount.path("long.bin"), "rb") as f:
        while chunk := f.read(256 * 1024):
            got += chunk
            if len(got) == 8 * MiB:
                owner.kill()  # SIGKILL in the middle of the read
    assert bytes(got) == data
    assert not owner.alive()


# -- versions: never a mix of old and new bytes -------------------------------------------

def test_overwritten_object_never_mixes_versions(procs, s3_server, bucket):
    procs.allow = (ESTALE_READ,)
    s3 = s3_server.client()
    old, new = os.urandom(8 * MiB), os.urandom(8 * MiB)
    put(s3, bucket, "v/obj.bin", old)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/v", workers=[worker.address],
                        options="status_ttl=1s,attr_timeout=0.2,entry_timeout=0.2,readahead_pages=0")
    with open(mount.path("obj.bin"), "rb", buffering=0) as f:
        assert f.read(MiB) == old[:MiB]
        put(s3, bucket, "v/obj.bin", new)  # overwritten while the handle is open
        offset = MiB
        errors = []
        while offset < len(old):
            try:
                chunk = os.pread(f.fileno(), MiB, offset)
            except OSError as exc:
                errors.append(exc.errno)
                offset += MiB
                continue
            assert chunk == old[offset:offset + len(chunk)], "an open handle returned new bytes"
            offset += len(chunk)
        assert errors and set(errors) == {errno.ESTALE}  # unread pages of the old version are gone
    time.sleep(1.5)  # past the status TTL
    assert read_file(mount.path("obj.bin")) == new


def test_corrupt_page_file_is_detected_and_refetched(procs, s3_server, bucket):
    data = os.urandom(3 * MiB)
    put(s3_server.client(), bucket, "c/file.bin", data)
    worker = procs.worker(extra=PAGE_FILES)
    mount = procs.mount(f"s3://{bucket}/c", workers=[worker.address], options=PAGEWISE)
    assert read_file(mount.path("file.bin")) == data
    mount.unmount()
    cold_reads = worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"]  # 1-3: the pages' runs
    page = sorted(worker.page_files())[1]
    raw = bytearray(page.read_bytes())
    raw[1000] ^= 0xFF
    raw[2000] ^= 0x01
    page.write_bytes(raw)
    procs.allow = CORRUPT
    again = procs.mount(f"s3://{bucket}/c", workers=[worker.address], options=PAGEWISE)
    assert read_file(again.path("file.bin")) == data
    metrics = worker.metrics()
    assert metrics["dorafs_worker_corrupt_pages_total"] == 1
    assert metrics["dorafs_worker_ufs_requests_total{op=read}"] == cold_reads + 1  # the refetch


# -- other stores -------------------------------------------------------------------------

def test_file_ufs_mounts_and_reads(procs, tmp_path):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    files = {"a.bin": os.urandom(PAGE + 1), "nested/b.txt": b"hello", "nested/deeper/c": os.urandom(3 * PAGE),
             "spaced name ü.txt": b"x" * 10, "empty": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    worker = procs.worker()
    mount = procs.mount(f"file://{src}", workers=[worker.address])
    found = {}
    for root, _, names in os.walk(mount.mountpoint):
        for name in names:
            path = Path(root) / name
            found[str(path.relative_to(mount.mountpoint))] = read_file(path)
    assert found == files
    assert worker.counter("dorafs_worker_page_requests_total") > 0  # served through the worker


# -- read-only, errors ----------------------------------------------------------------

def test_writes_are_refused_with_erofs(procs, s3_server, bucket):
    put(s3_server.client(), bucket, "ro/f.txt", b"data")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/ro", workers=[worker.address], options="ro")
    for attempt in (lambda: open(mount.path("new.txt"), "w"), lambda: open(mount.path("f.txt"), "a"),
                    lambda: os.mkdir(mount.path("d")), lambda: os.unlink(mount.path("f.txt"))):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    with pytest.raises(FileNotFoundError):
        open(mount.path("missing.txt"))
    with pytest.raises(NotADirectoryError):
        os.listdir(mount.path("f.txt"))
    assert read_file(mount.path("f.txt")) == b"data"


# -- the worker's own promises, seen from outside ---------------------------------------

def test_concurrent_cold_readers_cause_one_ufs_read_per_page(procs, s3_server, bucket):
    data = os.urandom(4 * MiB)
    put(s3_server.client(), bucket, "sf/hot.bin", data)
    worker = procs.worker()
    mounts = [procs.mount(f"s3://{bucket}/sf", workers=[worker.address], options="direct_io,readahead_pages=0")
              for _ in range(2)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: read_file(mounts[i % 2].path("hot.bin")), range(8)))
    assert all(r == data for r in results)
    metrics = worker.metrics()
    assert metrics["dorafs_worker_ufs_requests_total{op=read}"] == 4  # one per page, whatever the readers
    assert metrics["dorafs_worker_ufs_bytes_total"] == len(data)


def test_a_run_fills_following_pages_with_one_ufs_read(procs, s3_server, bucket):
    data = os.urandom(6 * MiB + 3)
    etag = put(s3_server.client(), bucket, "run/f.bin", data)
    worker = procs.worker()
    params = {"uri": f"s3://{bucket}/run/f.bin", "version": etag, "size": len(data), "page_size": MiB}

    def page(index: int, **extra) -> bytes:
        response = httpx.get(f"http://{worker.address}/v1/page", params=params | {"index": index} | extra, timeout=30)
        assert response.status_code == 200, response.text
        return response.content

    assert page(1, run=4) == data[MiB:2 * MiB]  # one UFS read fills pages 1-4
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] == 1
    assert page(2) == data[2 * MiB:3 * MiB] and page(4) == data[4 * MiB:5 * MiB]
    assert page(6, run=16) == data[6 * MiB:]  # a run never passes the end
    metrics = worker.metrics()
    assert metrics["dorafs_worker_ufs_requests_total{op=read}"] == 2
    assert metrics["dorafs_worker_page_requests_total{result=hit}"] == 2
    assert len(worker.page_files()) == 5

    # Requests racing a run: whichever fill gets a page first, no page is read twice.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda a: page(a[0], **a[1]), [(0, {"run": 8}), (3, {}), (5, {})]))
    assert got == [data[:MiB], data[3 * MiB:4 * MiB], data[5 * MiB:6 * MiB]]
    assert worker.metrics()["dorafs_worker_ufs_bytes_total"] == len(data)  # every page exactly once


def test_a_warm_sequential_read_leaves_no_page_behind_in_the_buffer(procs, tmp_path):
    """A reader reaching a page its readahead run is still reading waits for the run, so
    every page is buffered before it is read and discarded once read: at the end of the
    file the buffer holds nothing. (Read from the kept page file instead, the page was
    buffered after its discard and pinned its run's block until the buffer filled.)"""
    from tests.support import free_port

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(96 * MiB)
    (src / "f.bin").write_bytes(data)
    worker = procs.worker()
    mount = procs.mount(f"file://{src}", workers=[worker.address], options=PAGEWISE)
    assert read_file(mount.path("f.bin")) == data  # the worker now holds every page
    mount.unmount()
    port = free_port()
    mount = procs.mount(f"file://{src}", workers=[worker.address], options=f"metrics_listen=127.0.0.1:{port},{PAGEWISE}")
    with open(mount.path("f.bin"), "rb") as f:
        while f.read(MiB):
            pass
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("dorafs_mount_buffer_bytes", "dorafs_mount_buffer_mapped_bytes",
                                   "dorafs_mount_short_circuit_pages_total"))}
    mount.unmount()
    assert metrics["dorafs_mount_short_circuit_pages_total"] == 96
    assert metrics["dorafs_mount_buffer_bytes"] == 0 and metrics["dorafs_mount_buffer_mapped_bytes"] == 0


def test_locate_fills_a_run_and_answers_where_its_pages_are(procs, s3_server, bucket):
    """/v1/locate: the files and offsets of consecutive pages, filled by one UFS read, for
    a client on the same machine; they hold exactly the pages' bytes under the checksums
    given (a version read by such a client grows in its one object file)."""
    import xxhash

    data = os.urandom(5 * MiB + 7)
    etag = put(s3_server.client(), bucket, "loc/f.bin", data)
    worker = procs.worker()
    params = {"uri": f"s3://{bucket}/loc/f.bin", "version": etag, "size": len(data), "page_size": MiB}

    def locate(index: int, count: int) -> list[dict]:
        response = httpx.get(f"http://{worker.address}/v1/locate", params=params | {"index": index, "count": count},
                             timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["pages"]

    pages = locate(1, 4)  # answered once page 1 is in, with the pages of the run cached by then
    assert [p["index"] for p in pages] == list(range(1, 1 + len(pages))) and pages
    wait_for(lambda: [p["index"] for p in locate(1, 4)] == [1, 2, 3, 4], what="the rest of the run")
    pages = locate(1, 4)
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] == 1  # one UFS read for the run
    assert len({p["path"] for p in pages}) == 1 and [p["offset"] for p in pages] == [i * MiB for i in (1, 2, 3, 4)]
    for p in pages:
        with open(p["path"], "rb") as f:
            f.seek(p["offset"])
            content = f.read(p["size"])
        assert content == data[p["index"] * MiB:(p["index"] + 1) * MiB] and len(content) == p["size"]
        assert xxhash.xxh3_64_hexdigest(content) == p["checksum"]
    tail = locate(4, 16)  # never past the end; page 4 is a hit, page 5 (7 bytes) a new fill
    assert [(p["index"], p["size"]) for p in tail] == [(4, MiB), (5, 7)]
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] == 2
    response = httpx.get(f"http://{worker.address}/v1/locate", params=params | {"index": 6}, timeout=30)
    assert response.status_code == 400 and "past the end" in response.json()["message"]
    response = httpx.get(f"http://{worker.address}/v1/locate", params=params | {"index": 0, "version": "other"},
                         timeout=30)
    assert response.status_code == 412  # the object is not at that version: ESTALE, nothing cached
    assert worker.metrics()["dorafs_worker_pages"] == 5


def test_a_streamed_run_waiting_on_a_slow_store_says_so_while_it_waits(procs, s3_server, bucket, proxy,
                                                                        monkeypatch):
    """`/v1/locate?stream=1` while its pages come from a store slower than a reader's
    patience for silence (1.5 s; a page takes about 2 s): the worker sends a WAIT frame
    each PROGRESS_INTERVAL it has nothing else to send, and the reader gets every page
    of the run, in order, each where the worker says."""
    import trio

    from dorafs import runs
    from dorafs.client.workers import WorkerClient
    from dorafs.http.server import PROGRESS_INTERVAL

    data = os.urandom(2 * MiB)
    etag = put(s3_server.client(), bucket, "slowrun/f.bin", data)
    proxy.limit(512 * 1024)
    worker = procs.worker(env=proxy.env(s3_server.env))
    waits: list[float] = []
    parse = runs.parse

    def counting(frame: bytes):  # the reader's own parsing, counting what it skips
        parsed = parse(frame)
        if parsed[0] == runs.WAIT:
            waits.append(time.monotonic())
        return parsed

    monkeypatch.setattr(runs, "parse", counting)

    async def read_run() -> list[tuple]:
        client = WorkerClient(timeout=1.5, connect_timeout=1)
        placed: list[tuple] = []

        async def each(located: list) -> bool:
            placed.extend(located)
            return True

        try:
            await client.places(worker.address, f"s3://{bucket}/slowrun/f.bin", etag, len(data), 0, MiB, 2, each)
        finally:
            await client.aclose()
        return placed

    began = time.monotonic()
    placed = trio.run(read_run)
    took = time.monotonic() - began
    assert [p[0] for p in placed] == [0, 1]
    for index, path, size, _checksum, offset in placed:
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(size) == data[index * MiB:(index + 1) * MiB]
    assert took > 3 and len(waits) >= int(took / PROGRESS_INTERVAL) - 2, (took, waits)


def test_the_mount_raises_the_kernel_readahead_of_its_device(procs, s3_server, bucket):
    """read_ahead_kb: sequential readers get whole-page requests; 0 leaves the kernel's default."""
    if os.geteuid() != 0:
        pytest.skip("the kernel readahead of a mount is set through sysfs, which needs root")
    data = os.urandom(4 * MiB + 1)
    put(s3_server.client(), bucket, "ra/f.bin", data)
    worker = procs.worker()
    for setting, expected in (("2048", "2048"), ("0", None)):
        mount = procs.mount(f"s3://{bucket}/ra", workers=[worker.address], options=f"read_ahead_kb={setting}")
        device = os.stat(mount.path()).st_dev
        bdi = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        if expected is not None:
            wait_for(lambda: open(bdi).read().strip() == expected, 10)
        else:
            assert int(open(bdi).read()) <= 1024  # the kernel's own default, not raised
        assert read_file(mount.path("f.bin")) == data
        mount.unmount()


def test_worker_cache_never_exceeds_its_capacity(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"e{i}.bin": os.urandom(MiB) for i in range(10)}
    for name, blob in files.items():
        put(s3, bucket, f"ev/{name}", blob)
    worker = procs.worker(cache_size="3MiB")
    mount = procs.mount(f"s3://{bucket}/ev", workers=[worker.address], options="direct_io")
    for _ in range(2):
        for name, blob in files.items():
            assert read_file(mount.path(name)) == blob
            assert worker.page_bytes() <= 3 * MiB
    metrics = worker.metrics()
    assert metrics["dorafs_worker_cache_used_bytes"] <= 3 * MiB
    assert metrics["dorafs_worker_evictions"] >= 7


def test_local_worker_pages_are_read_from_their_files(procs, s3_server, bucket):
    """A worker on loopback: the mount reads its page files itself (short-circuit), and
    a corrupt file there is never used."""
    procs.allow = CORRUPT
    from tests.support import free_port, mount_counters

    data = os.urandom(3 * MiB + 5)
    put(s3_server.client(), bucket, "sc/f.bin", data)
    worker = procs.worker(extra=PAGE_FILES)
    counts = {}
    for setting in ("1", "0"):
        port = free_port()
        mount = procs.mount(f"s3://{bucket}/sc", workers=[worker.address],
                            options=f"short_circuit={setting},direct_io,metrics_listen=127.0.0.1:{port},{PAGEWISE}")
        assert read_file(mount.path("f.bin")) == data
        counts[setting] = mount_counters(port, "dorafs_mount_short_circuit_pages_total",
                                         "dorafs_mount_worker_pages_total")
        mount.unmount()
    assert counts["1"]["dorafs_mount_short_circuit_pages_total"] == counts["1"]["dorafs_mount_worker_pages_total"] == 4
    assert counts["0"]["dorafs_mount_short_circuit_pages_total"] == 0
    assert counts["0"]["dorafs_mount_worker_pages_total"] == 4

    # A small page buffer: random reads of pages read once come from the kept page files.
    mount = procs.mount(f"s3://{bucket}/sc", workers=[worker.address], options=f"direct_io,buffer_size=1MiB,{PAGEWISE}")
    assert read_file(mount.path("f.bin")) == data
    requests = worker.counter("dorafs_worker_page_requests_total")
    rng = random.Random(3)
    with open(mount.path("f.bin"), "rb", buffering=0) as f:
        offsets = [rng.randrange(len(data)) for _ in range(200)] + [MiB - 100, 2 * MiB - 1]  # two straddle pages
        for offset in offsets:
            assert os.pread(f.fileno(), 4096, offset) == data[offset:offset + 4096]
    assert worker.counter("dorafs_worker_page_requests_total") == requests
    mount.unmount()

    victim = sorted(worker.page_files())[0]
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    mount = procs.mount(f"s3://{bucket}/sc", workers=[worker.address], options=f"direct_io,{PAGEWISE}")
    assert read_file(mount.path("f.bin")) == data
    assert worker.counter("dorafs_worker_corrupt_pages_total") == 1


def test_a_local_workers_cached_pages_are_mapped_and_pages_on_its_disk_only_are_read(procs, s3_server, bucket):
    """Pages a worker on this machine just wrote are in the kernel's page cache: the
    mount maps them into its buffer and checks them there, no copy into its memory.
    A page only on the worker's disk is read into memory instead (in a thread, never
    through a mapping on the event loop). Exact bytes both ways."""
    from tests.support import drop_from_page_cache, free_port, mount_counters

    data = os.urandom(4 * MiB + 100_000)  # (a last page under 64 KiB would be copied: client/local.py MAP_MIN)
    put(s3_server.client(), bucket, "mapped/f.bin", data)
    worker = procs.worker()
    counts = []
    for _ in ("just written", "on the disk only"):
        port = free_port()
        mount = procs.mount(f"s3://{bucket}/mapped", workers=[worker.address],
                            options=f"direct_io,metrics_listen=127.0.0.1:{port},{PAGEWISE}")
        assert read_file(mount.path("f.bin")) == data
        counts.append(mount_counters(port, "dorafs_mount_short_circuit_pages_total", "dorafs_mount_mapped_pages_total"))
        mount.unmount()
        (held,) = (worker.cache_dir / "objects").glob("??/????????????????????????????????")
        if not drop_from_page_cache(held):
            pytest.skip("the worker's cache keeps its files in memory (tmpfs): no page is on the disk only")
    assert counts[0] == {"dorafs_mount_short_circuit_pages_total": 5, "dorafs_mount_mapped_pages_total": 5}
    # The first page came from the disk, read; the kernel's readahead of that read may
    # have brought the pages after it, which are then cached and mapped.
    assert counts[1]["dorafs_mount_short_circuit_pages_total"] == 5
    assert counts[1]["dorafs_mount_mapped_pages_total"] < 5


def test_a_remote_workers_run_comes_in_one_answer(procs, s3_server, bucket):
    """Without short-circuit reads, a sequential reader's readahead runs come from the
    worker as one `/v1/run` answer each (every page with its checksum), not a request
    per page; the bytes are exact, cold and warm."""
    from tests.support import free_port

    data = os.urandom(20 * MiB + 12345)
    put(s3_server.client(), bucket, "runs/f.bin", data)
    worker = procs.worker()

    def requests(path: str) -> float:
        return sum(v for k, v in worker.metrics().items()
                   if k.startswith("dorafs_worker_request_latency_seconds_count") and f"path={path}," in k)

    for rounds in ("cold", "warm"):
        port = free_port()
        # passthrough=0: the warm read would be the kernel's, from the object file.
        mount = procs.mount(f"s3://{bucket}/runs", workers=[worker.address],
                            options=f"short_circuit=0,passthrough=0,metrics_listen=127.0.0.1:{port}")
        pages_before, runs_before = requests("/v1/page"), requests("/v1/run")
        assert read_file(mount.path("f.bin")) == data, rounds
        pages, run_answers = requests("/v1/page") - pages_before, requests("/v1/run") - runs_before
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        got = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith("dorafs_mount_worker_pages_total")}
        mount.unmount()
        assert got["dorafs_mount_worker_pages_total"] == 21, (rounds, got, pages, run_answers)
        assert run_answers >= 2, (rounds, pages, run_answers)
        assert pages + run_answers <= 8, (rounds, pages, run_answers)  # not one request per page
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] <= 8  # cold: a GET per run, not per page (21)


def test_a_run_answer_carries_each_page_with_its_checksum_and_says_why_it_stops(procs, s3_server, bucket):
    """`/v1/run` against a real worker: the pages of a run in order, each checked; a
    corrupt page file ends the run there (the reader fetches the rest page by page); a
    run of a version the store no longer has is ESTALE; a run past the end is EINVAL."""
    import trio

    from dorafs.client.workers import WorkerClient
    from dorafs.errors import InvalidRequest, StaleVersion

    data = os.urandom(5 * MiB + 77)
    etag = put(s3_server.client(), bucket, "wire/f.bin", data)
    worker = procs.worker(extra=PAGE_FILES)
    uri = f"s3://{bucket}/wire/f.bin"

    async def run(index: int, count: int, version: str = etag) -> tuple[list[int], bytearray]:
        client = WorkerClient(timeout=5, connect_timeout=1)
        block = bytearray(len(data))
        got: list[int] = []
        try:
            await client.run(worker.address, uri, version, len(data), index, MiB, count,
                             lambda i, n: memoryview(block)[i * MiB:i * MiB + n], got.append)
        finally:
            await client.aclose()
        return got, block

    got, block = trio.run(run, 0, 6)  # cold: one UFS read for the run
    assert got == [0, 1, 2, 3, 4, 5] and bytes(block) == data
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] == 1
    got, block = trio.run(run, 2, 16)  # warm, and a count past the end is cut to the object
    assert got == [2, 3, 4, 5] and bytes(block[2 * MiB:]) == data[2 * MiB:]

    page3 = data[3 * MiB:4 * MiB]
    for path in worker.page_files():  # wherever the store keeps page 3: same size, wrong bytes
        held = path.read_bytes()
        if (at := held.find(page3)) >= 0:
            with open(path, "r+b") as f:
                f.seek(at)
                f.write(b"\0" * len(page3))
            break
    else:
        raise AssertionError("page 3 not found in the worker's files")
    got, _ = trio.run(run, 1, 5)
    assert got == [1, 2]

    s3_server.client().put_object(Bucket=bucket, Key="wire/f.bin", Body=b"changed")
    with pytest.raises(StaleVersion):
        trio.run(run, 0, 2, '"0123456789abcdef0123456789abcdef"')
    with pytest.raises(InvalidRequest):
        trio.run(run, 6, 2)


def test_a_random_reader_of_a_remote_worker_fetches_parts_of_pages(procs, s3_server, bucket):
    """Without short-circuit reads, a random 4 KiB reader gets the aligned 64 KiB around
    each read from the worker (which still fills and caches whole pages), not 1 MiB
    pages: the bytes are exact, and the mount's buffer holds parts, not pages."""
    from tests.support import free_port

    data = os.urandom(4 * MiB + 999)
    put(s3_server.client(), bucket, "rnd/f.bin", data)
    worker = procs.worker()
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/rnd", workers=[worker.address],
                        options=f"short_circuit=0,direct_io,metrics_listen=127.0.0.1:{port}")
    rng = random.Random(5)
    with open(mount.path("f.bin"), "rb", buffering=0) as f:
        for _ in range(200):
            at = rng.randrange(1, len(data) // 4096) * 4096 + 512
            f.seek(at)
            assert f.read(4096) == data[at:at + 4096]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    pages = next(float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("dorafs_mount_worker_pages_total"))
    assert pages <= 3, text  # whole pages only for reads that happened to follow the one before
    parts = next(float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("dorafs_mount_worker_page_parts_total"))
    assert parts >= 40, text  # most of the file's 64 parts, each fetched once
    assert worker.counter("dorafs_worker_request_latency_seconds_count") >= 40  # parts, one request each
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] <= 5  # whole pages filled once
    assert worker.metrics()["dorafs_worker_pages"] <= 5


def _ufs_reads(worker) -> float:
    return worker.metrics().get("dorafs_worker_ufs_requests_total{op=read}", 0.0)


def test_a_cold_archive_read_from_its_index_at_the_end_then_through_makes_few_gets(procs, s3_server, bucket):
    """numpy loads an npz file as a zip archive: its index at the end first, then the
    whole member from the start. The read from the start begins a sequential reader
    afresh (the index read did not leave the window at nothing), and its first pages
    come in the same run as the pages after them: a cold 16 MiB file is a handful of
    GETs (before: one per page or two, 8-9 per file in bench/dlio.py), with exact bytes."""
    data = os.urandom(16 * MiB + 4321)
    put(s3_server.client(), bucket, "npz/a.npz", data)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/npz", workers=[worker.address], options="passthrough=0")
    before = _ufs_reads(worker)
    fd = os.open(mount.path("a.npz"), os.O_RDONLY)
    try:
        assert os.pread(fd, 65536, len(data) - 65536) == data[-65536:]  # the archive's index
        got = bytearray()
        while chunk := os.pread(fd, 4 * MiB, len(got)):  # then the member, from the start
            got += chunk
    finally:
        os.close(fd)
    mount.unmount()
    assert bytes(got) == data
    gets = _ufs_reads(worker) - before
    assert gets <= 5, gets  # the index's page, then runs of up to 8 pages: 17 pages


def _dense_and_scattered(procs, s3_server, bucket, prefix: str):
    """The same 64 MiB of random bytes as `dense.bin` and `scattered.bin` under `prefix`,
    a worker, and a mount of them that reads every page through the worker: (the
    bytes, the worker, the mount)."""
    data = os.urandom(64 * MiB)
    client = s3_server.client()
    put(client, bucket, f"{prefix}/dense.bin", data)
    put(client, bucket, f"{prefix}/scattered.bin", data)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/{prefix}", workers=[worker.address], options="passthrough=0")
    return data, worker, mount


def _gets_for_reads(worker, mount, data: bytes, name: str, offsets: list[int], size: int) -> float:
    """GETs the worker made for reads of `size` bytes at these offsets of the mounted
    file `name`, one after another, each checked against `data`."""
    before = _ufs_reads(worker)
    fd = os.open(mount.path(name), os.O_RDONLY)
    try:
        for offset in offsets:
            assert os.pread(fd, size, offset) == data[offset:offset + size], (name, offset)
    finally:
        os.close(fd)
    return _ufs_reads(worker) - before


def test_large_reads_at_random_places_bring_their_group_of_pages_in_one_get(procs, s3_server, bucket):
    """A reader of column chunks (0.5 MiB reads at random places, as pyarrow reads a
    Parquet row group) makes one GET per aligned group of pages it touches
    (`prefetch.GROUP_PAGES`), not one per page; a read across two pages of a group is
    served from that one run, exact."""
    data = os.urandom(32 * MiB)
    put(s3_server.client(), bucket, "cols/t.parquet", data)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/cols", workers=[worker.address], options="passthrough=0")
    before = _ufs_reads(worker)
    rng = random.Random(5)
    offsets = [rng.randrange(0, 32 * MiB - 600_000) for _ in range(24)]
    fd = os.open(mount.path("t.parquet"), os.O_RDONLY)
    try:
        for offset in offsets:
            assert os.pread(fd, 528384, offset) == data[offset:offset + 528384], offset
    finally:
        os.close(fd)
    mount.unmount()
    groups = {(offset // PAGE) // GROUP_PAGES for offset in offsets} | {
        ((offset + 528383) // PAGE) // GROUP_PAGES for offset in offsets}
    gets = _ufs_reads(worker) - before
    assert gets <= len(groups) + 1, (gets, groups)  # 32 pages in groups; 24 reads of 1-2 pages each before


def test_a_reader_coming_back_to_what_it_fetched_gets_larger_groups_and_a_scattered_one_does_not(
        procs, s3_server, bucket):
    """Large reads at random places bring groups of `GROUP_PAGES` pages; once most of a
    file's large reads land in pages already coming (column chunks of row groups read
    again and again), its groups are `RUN_LIMIT` pages: one GET where two were. A reader
    whose reads keep landing in new places keeps the smaller groups, so each of its reads
    waits for fewer bytes it never reads. Exact bytes throughout."""
    from dorafs.client.prefetch import DENSE_AFTER, RUN_LIMIT

    assert RUN_LIMIT == 2 * GROUP_PAGES
    data, worker, mount = _dense_and_scattered(procs, s3_server, bucket, "groups")

    def reads(name: str, pages: list[float]) -> float:
        """GETs the worker made for column-chunk reads at these page positions."""
        return _gets_for_reads(worker, mount, data, name, [int(at * PAGE) for at in pages], 528384)

    # Reads back and forth within the first group: all but the first land in its pages.
    assert reads("dense.bin", [0.1, 1.3, 2.5, 3.7, 4.2, 5.5][:DENSE_AFTER + 2]) >= 1
    # Now one read brings the 16 pages from page 32 on: the reads at 40 and 45 need no GET.
    assert reads("dense.bin", [32.2, 40.3, 45.1]) == 1

    # Reads that each land in a new group bring 8 pages each: page 9 is not among them.
    assert reads("scattered.bin", [1.1, 17.1, 33.1, 49.1]) == 4
    assert reads("scattered.bin", [9.1]) == 1


def test_small_reads_covering_a_file_bring_groups_and_scattered_ones_their_page(procs, s3_server, bucket):
    """A small read at a random place brings its own page only; once most of a file's
    small reads that miss find another page of their group (`RUN_LIMIT` pages) coming
    already, its readers are covering the file, and a miss brings the rest of its group
    in one run (one GET per stretch nothing brings yet). A reader whose small reads keep
    landing in new groups gets one page per read. Exact bytes throughout."""
    from dorafs.client.prefetch import DENSE_AFTER, RUN_LIMIT

    assert RUN_LIMIT == 16 and DENSE_AFTER == 4
    data, worker, mount = _dense_and_scattered(procs, s3_server, bucket, "small")

    def reads(name: str, offsets: list[int]) -> float:
        """GETs the worker made for 4 KiB reads at these offsets."""
        return _gets_for_reads(worker, mount, data, name, offsets, 4096)

    try:
        # 4 KiB reads all over the first 32 pages: a GET per page touched before, here
        # about a page per read for the first few misses, then the rest of each group.
        rng = random.Random(11)
        offsets = [rng.randrange(4096, 32 * MiB - 4096) for _ in range(400)]
        assert len({offset // PAGE for offset in offsets}) == 32
        covering = reads("dense.bin", offsets)
        assert covering <= 16, covering

        # Misses in four new groups, then one near each of two of them: too few near.
        scattered = [int((page + 0.3) * PAGE) for page in (1, 17, 33, 49, 2, 18)]
        assert reads("scattered.bin", scattered) == 6
        assert reads("scattered.bin", [int(3.3 * PAGE)]) == 1  # page 3 was not brought along
    finally:
        mount.unmount()


def test_a_local_workers_run_is_located_in_a_few_requests(procs, s3_server, bucket):
    """With short-circuit reads, the pages of a readahead run after its first are asked
    for together (`/v1/locate` of the rest of the run brings every page already in), not
    one request per page; a GET per run, exact bytes."""
    data = os.urandom(20 * MiB + 12345)
    put(s3_server.client(), bucket, "lruns/f.bin", data)
    worker = procs.worker()

    def locates() -> float:
        return sum(v for k, v in worker.metrics().items()
                   if k.startswith("dorafs_worker_request_latency_seconds_count") and "path=/v1/locate," in k)

    mount = procs.mount(f"s3://{bucket}/lruns", workers=[worker.address], options=PAGEWISE)
    before = locates()
    assert read_file(mount.path("f.bin")) == data
    asked = locates() - before
    mount.unmount()
    assert asked < 21, asked  # 21 pages: one request per page before (12 seen here)
    assert worker.metrics()["dorafs_worker_ufs_requests_total{op=read}"] <= 8


def test_a_sequential_readers_runs_end_on_run_boundaries(procs, s3_server, bucket):
    """Once a sequential reader's window is a run or more, its readahead asks for whole
    runs of `RUN_PAGES` pages: a top-up that would leave a tail of a page or two waits
    for the next one, so a cold read costs about one UFS read per run, not one per
    top-up's tail as well. The mount learns where a run's pages are from one streamed
    ask (`/v1/locate?stream=1`) that also starts the run, not one ask per page, nor a
    first ask for the run's first page and a second for the rest. The bytes are exact."""
    from dorafs.client.prefetch import RUN_PAGES

    pages = 96
    data = os.urandom(pages * MiB)
    put(s3_server.client(), bucket, "seq/f.bin", data)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/seq", workers=[worker.address], options="passthrough=0")
    with open(mount.path("f.bin"), "rb", buffering=0) as f:
        got = bytearray()
        while chunk := f.read(256 << 10):
            got += chunk
    mount.unmount()
    assert got == data
    metrics = worker.metrics()
    reads = metrics["dorafs_worker_ufs_requests_total{op=read}"]
    locates = sum(v for k, v in metrics.items()
                  if k.startswith("dorafs_worker_request_latency_seconds_count") and "path=/v1/locate," in k)
    # Whole runs from page 8 on, and the window's first few small ones before it.
    assert reads <= pages // RUN_PAGES + 4, reads
    assert locates <= reads + 2, (locates, reads)  # one streamed ask per run, its first page included
