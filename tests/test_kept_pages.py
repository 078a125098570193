"""Page files a mount keeps open for short-circuit reads (dorafs/client/local.py) do not
pin the disk space of pages the worker evicted: the worker's disk, a small tmpfs that
counts the blocks of unlinked files still open, returns under its cache bound."""

from __future__ import annotations

import os

import pytest
import trio
import xxhash

from dorafs.client.local import LocalPages, WouldBlock
from tests.support import free_port, mount_counters, tmpfs, wait_for

MiB = 1 << 20


@pytest.fixture
def cache_disk(tmp_path):
    """A 64 MiB tmpfs for the worker's cache (we are root), always unmounted."""
    with tmpfs(tmp_path / "cache-disk", "64m") as path:
        yield path


def used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_kept_page_files_are_dropped_when_the_worker_evicts_them(procs, s3_server, bucket, cache_disk):
    s3 = s3_server.client()
    files = {f"f{i}.bin": os.urandom(6 * MiB) for i in range(4)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"kept/{name}", Body=data)
    worker = procs.worker(cache_dir=cache_disk / "cache", cache_size="8MiB")
    try:
        # A page buffer smaller than a file: the mount rereads pages through kept files.
        mount = procs.mount(f"s3://{bucket}/kept", workers=[worker.address], options="buffer_size=2MiB")
        base = used(cache_disk)
        for name, data in files.items():
            with open(mount.path(name), "rb", buffering=0) as f:
                assert f.read() == data
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                f.seek(0)
                assert f.read() == data  # again: from the kept page files
        assert len(worker.page_files()) <= 8
        # 24 MiB of pages were cached, 16 MiB of them evicted since; what the mount keeps
        # open of them is closed within a sweep, so the disk holds the worker's 8 MiB.
        wait_for(lambda: used(cache_disk) - base <= 8 * MiB + 512 * 1024, timeout=10,
                 what=f"the cache disk to come back under its bound (used {used(cache_disk) - base})")
        for name, data in files.items():  # and reads are still exact
            with open(mount.path(name), "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert f.read() == data
    finally:
        for proc in procs.started:
            proc.stop()  # free the tmpfs before the fixture unmounts it


def test_pages_held_as_mappings_are_let_go_when_the_worker_evicts_them(procs, s3_server, bucket, cache_disk):
    """Readers going backwards a page at a time, their files still open: the mount holds
    their pages in a large page buffer as mappings of the worker's files (a tmpfs cache
    is all in the kernel's page cache), which pin them as a kept descriptor does; the
    sweep lets go of those the worker evicted, and the disk comes back under its bound."""
    s3 = s3_server.client()
    files = {f"f{i}.bin": os.urandom(6 * MiB) for i in range(4)}
    for name, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"mapped/{name}", Body=data)
    worker = procs.worker(cache_dir=cache_disk / "cache", cache_size="8MiB")
    opened = []
    try:
        port = free_port()
        mount = procs.mount(f"s3://{bucket}/mapped", workers=[worker.address],
                            options=f"buffer_size=128MiB,direct_io,metrics_listen=127.0.0.1:{port}")
        base = used(cache_disk)
        for name, data in files.items():
            f = open(mount.path(name), "rb", buffering=0)
            opened.append(f)
            for at in range(len(data) - MiB, -1, -MiB):  # (not to a page's end: that would drop it)
                assert os.pread(f.fileno(), 64 << 10, at) == data[at:at + (64 << 10)]
        metrics = mount_counters(port, "dorafs_mount_mapped_pages_total", "dorafs_mount_buffer_mapped_bytes")
        assert metrics["dorafs_mount_mapped_pages_total"] >= 16, metrics  # most of the 24 pages
        assert metrics["dorafs_mount_buffer_mapped_bytes"] >= 16 * MiB, metrics  # and held
        wait_for(lambda: used(cache_disk) - base <= 8 * MiB + 512 * 1024, timeout=10,
                 what=f"the cache disk to come back under its bound (used {used(cache_disk) - base})")
    finally:
        for f in opened:
            f.close()
        for proc in procs.started:
            proc.stop()  # free the tmpfs before the fixture unmounts it


# -- in-process: the kept descriptors themselves -------------------------------------------


def _kept(tmp_path, pages: LocalPages, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    fd = LocalPages.load_page_file(memoryview(bytearray(len(data))), str(path), xxhash.xxh3_64_hexdigest(data))
    pages.keep(name, fd, len(data))
    return str(path)


def test_kept_files_are_bounded_by_bytes_and_dropped_once_unlinked(tmp_path):
    pages = LocalPages(max_open=100, max_bytes=3 * 4096)
    try:
        paths = [_kept(tmp_path, pages, f"p{i}", bytes([i]) * 4096) for i in range(4)]
        assert "p0" not in pages and len(pages) == 3 and pages.bytes == 3 * 4096  # the oldest went
        assert trio.run(pages.pread, "p1", 10, 5) == bytes([1]) * 10
        os.unlink(paths[1])  # the worker evicted it
        # Until the sweep, the kept descriptor still reads the verified bytes of its page.
        assert trio.run(pages.pread, "p1", 10, 5) == bytes([1]) * 10
        pages.check()  # what the sweep does every SWEEP_SECONDS
        assert trio.run(pages.pread, "p1", 10, 5) is None  # not read: closed, the caller asks the worker
        assert "p1" not in pages and pages.dropped == 1 and pages.bytes == 2 * 4096
        os.replace(paths[3], paths[2])  # replaced under its name: the kept one is unlinked
        pages.check()
        assert not pages.readinto("p2", memoryview(bytearray(10)), 0)
        assert pages.readinto("p3", memoryview(bytearray(10)), 0)  # p3 is p2's file now: still linked
    finally:
        pages.close()
    assert pages.bytes == 0


def _dropped(path: str) -> bool:
    """Drop a file from the page cache, then probe it with a read that does not wait:
    True if that read found it gone. This test reads a kept descriptor whose readahead
    a fast disk can finish before the read looks (tests/support.py `disk_only` failed
    ten times in a row in a clean run of the suite), so it asks the way it always has."""
    from tests.support import drop_from_page_cache

    if not drop_from_page_cache(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_kept_file_not_in_the_page_cache_is_never_read_on_the_loop(tmp_path):
    pages = LocalPages()
    data = os.urandom(1 << 20)
    try:
        path = _kept(tmp_path, pages, "cold", data)
        if not _dropped(path):
            pytest.skip("the kernel keeps this file cached (tmpfs, or a readahead that finished at once)")
        far = len(data) - 8192  # beyond the readahead the probe at 0 may have started
        with pytest.raises(WouldBlock):
            pages.readinto("cold", memoryview(bytearray(4096)), far)
        threads = []

        async def read():
            original = trio.to_thread.run_sync

            async def counted(fn, *args, **kw):
                threads.append(fn)
                return await original(fn, *args, **kw)
            trio.to_thread.run_sync = counted
            try:
                return await pages.pread("cold", 4096, far + 4096)
            finally:
                trio.to_thread.run_sync = original

        drop = os.open(path, os.O_RDONLY)
        os.posix_fadvise(drop, 0, 0, os.POSIX_FADV_DONTNEED)  # whatever the refused read started
        os.close(drop)
        assert trio.run(read) == data[far + 4096:]
        assert len(threads) == 1  # the waiting read went to a thread
        assert "cold" in pages
    finally:
        pages.close()
