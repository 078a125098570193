"""Object files read by the mount itself (dorafs/fuse/objectfiles.py), on a real mount.

A file whose pinned version a worker on this machine holds whole, opened where the
kernel does not take it (here `passthrough=0`, and `direct_io` so that every read
reaches the mount), is answered with one `preadv` of the worker's verified object file:
exact bytes, no page fetched, and what it reads never changes while it is open.
"""

from __future__ import annotations

import os

import httpx
import pytest

from tests.cluster import CORRUPT, ProcessSet
from tests.support import free_port, wait_for
from tests.test_operations import scrape

MiB = 1 << 20


def held_reads(metrics: dict) -> float:
    return metrics["dorafs_mount_object_file_reads_total"]


def pages(metrics: dict) -> float:
    return metrics["dorafs_mount_worker_pages_total"]


def read_whole(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def setup(procs: ProcessSet, bucket: str, options: str = ""):
    worker = procs.worker()
    port = free_port()
    m = procs.mount(f"s3://{bucket}/h", workers=[worker.address],
                    options=f"status_ttl=0,passthrough=0,direct_io,metrics_listen=127.0.0.1:{port}{options}")
    return worker, m, lambda: scrape(f"127.0.0.1:{port}")


def prepared(worker, metrics) -> None:
    """Wait until the worker sealed the file read to its end and the mount verified it."""
    wait_for(lambda: worker.metrics()["dorafs_worker_whole_objects"] == 1
             and metrics()["dorafs_mount_object_files_preparing"] == 0, what="the file prepared")


def sealed(worker) -> list:
    return [p for p in (worker.cache_dir / "objects").glob("??/*") if p.is_file() and "." not in p.name]


def test_a_wholly_cached_file_is_read_from_its_object_file_exactly(procs, s3_server, bucket):
    data = os.urandom(3 * MiB + 4321)
    s3_server.client().put_object(Bucket=bucket, Key="h/a.bin", Body=data)
    worker, m, metrics = setup(procs, bucket)
    assert read_whole(m.path("a.bin")) == data  # through the page path, to its end
    prepared(worker, metrics)
    before = metrics()
    with open(m.path("a.bin"), "rb") as f:
        assert f.read() == data
        for offset, size in [(0, 1), (MiB - 3, 7), (2 * MiB + 5, 100_000), (len(data) - 10, 100),
                             (len(data), 5), (123, 2 * MiB)]:
            assert os.pread(f.fileno(), size, offset) == data[offset:offset + size]
    after = metrics()
    assert held_reads(after) > held_reads(before) + 5
    assert pages(after) == pages(before), "pages were fetched for a file held whole"
    assert after["dorafs_mount_object_file_opens_total{result=held}"] >= 1


def test_a_file_read_to_its_end_is_held_with_no_page_checked_again(procs, s3_server, bucket):
    """The pages the mount read from the version's object file (the worker writes a
    version a local mount reads into that file as its pages arrive) were checked as they
    were read: holding the file at the next open checks none of them again, so it is held
    as soon as the last reader closes. A mount that read none of them checks each once."""
    data = os.urandom(5 * MiB + 17)
    s3_server.client().put_object(Bucket=bucket, Key="h/c.bin", Body=data)
    worker, m, metrics = setup(procs, bucket)
    assert read_whole(m.path("c.bin")) == data
    prepared(worker, metrics)
    assert read_whole(m.path("c.bin")) == data
    after = metrics()
    assert after["dorafs_mount_object_file_opens_total{result=held}"] == 1
    assert after["dorafs_mount_object_file_pages_checked_total"] == 0
    port = free_port()
    other = procs.mount(f"s3://{bucket}/h", workers=[worker.address],
                        options=f"passthrough=0,direct_io,metrics_listen=127.0.0.1:{port}")
    assert read_whole(other.path("c.bin")) == data
    theirs = scrape(f"127.0.0.1:{port}")
    assert theirs["dorafs_mount_object_file_opens_total{result=held}"] == 1
    assert theirs["dorafs_mount_object_file_pages_checked_total"] == 6


def test_eviction_and_an_overwrite_leave_an_open_held_file_unchanged(procs, s3_server, bucket):
    s3 = s3_server.client()
    old = os.urandom(2 * MiB + 99)
    s3.put_object(Bucket=bucket, Key="h/c.bin", Body=old)
    worker, m, metrics = setup(procs, bucket)
    assert read_whole(m.path("c.bin")) == old
    prepared(worker, metrics)
    with open(m.path("c.bin"), "rb") as f:
        assert os.pread(f.fileno(), 10, 0) == old[:10]
        new = os.urandom(len(old))
        s3.put_object(Bucket=bucket, Key="h/c.bin", Body=new)  # overwritten in the bucket while open
        r = httpx.post(f"http://{worker.address}/v1/invalidate",
                       params={"uri": f"s3://{bucket}/h/c.bin", "pages": "1"}, timeout=10)
        assert r.status_code == 200 and r.json()["pages"] > 0
        assert not sealed(worker), "the worker kept the object file under its name"
        assert f.read() == old
        assert os.pread(f.fileno(), 1000, MiB) == old[MiB:MiB + 1000]
        # The worker counts the unlinked file the mount holds open.
        info = httpx.get(f"http://{worker.address}/v1/info", timeout=10).json()
        assert info["held"] == len(old), info
        # Another open meanwhile reads the new version, through the page path.
        assert read_whole(m.path("c.bin")) == new
    assert read_whole(m.path("c.bin")) == new
    # Let go at the last close: the worker's gauge (which looks again when scraped) drops to 0.
    wait_for(lambda: worker.metrics()["dorafs_worker_held_bytes"] == 0,
             what="the worker to stop counting the file let go of")


def test_a_corrupt_object_file_is_not_held_and_exact_bytes_still_come(procs, s3_server, bucket):
    procs.allow = CORRUPT
    data = os.urandom(2 * MiB + 17)
    s3_server.client().put_object(Bucket=bucket, Key="h/d.bin", Body=data)
    worker, m, _ = setup(procs, bucket)
    assert read_whole(m.path("d.bin")) == data
    wait_for(lambda: worker.metrics()["dorafs_worker_whole_objects"] == 1, what="the object sealed")
    (path,) = sealed(worker)
    with open(path, "r+b") as f:  # a bit flipped on the disk, behind the worker's back
        f.seek(MiB + 5)
        byte = f.read(1)
        f.seek(MiB + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    # A mount that has not verified that file yet (one verifies a sealed file once).
    port = free_port()
    other = procs.mount(f"s3://{bucket}/h", workers=[worker.address], name="second",
                        options=f"status_ttl=0,passthrough=0,direct_io,metrics_listen=127.0.0.1:{port}")
    assert read_whole(other.path("d.bin")) == data
    after = scrape(f"127.0.0.1:{port}")
    assert after["dorafs_mount_object_file_opens_total{result=corrupt}"] == 1
    assert held_reads(after) == 0


def test_a_file_read_in_parts_by_several_readers_is_held_at_its_next_open(procs, s3_server, bucket):
    """Four readers of a quarter each, opened at once (the bench's seq4): the one that
    reads to the end closes first, before the others' pages are there; whichever closes
    last leaves the version whole, and the next open holds its object file."""
    data = os.urandom(4 * MiB + 333)
    s3_server.client().put_object(Bucket=bucket, Key="h/q.bin", Body=data)
    worker, m, metrics = setup(procs, bucket)
    quarter = len(data) // 4
    readers = [open(m.path("q.bin"), "rb") for _ in range(4)]  # nothing cached yet: none is held
    for f, (start, end) in zip(readers, ((3 * quarter, len(data)), (0, quarter), (quarter, 2 * quarter),
                                         (2 * quarter, 3 * quarter))):
        assert os.pread(f.fileno(), end - start, start) == data[start:end]
        f.close()
    prepared(worker, metrics)
    before = metrics()
    assert read_whole(m.path("q.bin")) == data
    after = metrics()
    assert after["dorafs_mount_object_file_opens_total{result=held}"] == \
        before["dorafs_mount_object_file_opens_total{result=held}"] + 1
    assert held_reads(after) > held_reads(before)
    assert pages(after) == pages(before), "pages were fetched for a file held whole"


def test_a_held_file_is_taken_again_by_the_next_open_and_let_go_once_the_worker_unlinks_it(procs, s3_server,
                                                                                           bucket):
    """The last open of a version ends: its verified object file stays held a while, and
    the next opens take it without asking the worker; once the worker unlinks it (its
    pages dropped), the mount lets go of it within a sweep, the worker stops counting it,
    and the next open reads the version page by page again, exactly."""
    data = os.urandom(2 * MiB + 7)
    s3_server.client().put_object(Bucket=bucket, Key="h/r.bin", Body=data)
    worker, m, metrics = setup(procs, bucket)
    assert read_whole(m.path("r.bin")) == data
    prepared(worker, metrics)
    assert read_whole(m.path("r.bin")) == data  # held from this open on
    before = metrics()
    for _ in range(3):
        assert read_whole(m.path("r.bin")) == data
    after = metrics()
    assert after["dorafs_mount_object_files_taken_again_total"] == \
        before["dorafs_mount_object_files_taken_again_total"] + 3
    assert after["dorafs_mount_object_file_opens_total{result=held}"] == \
        before["dorafs_mount_object_file_opens_total{result=held}"] + 3
    assert held_reads(after) > held_reads(before) and pages(after) == pages(before)
    r = httpx.post(f"http://{worker.address}/v1/invalidate",
                   params={"uri": f"s3://{bucket}/h/r.bin", "pages": "1"}, timeout=10)
    assert r.status_code == 200 and r.json()["pages"] > 0
    assert not sealed(worker)
    wait_for(lambda: worker.metrics()["dorafs_worker_held_bytes"] == 0, timeout=10,
             what="the mount to let go of the idle file the worker unlinked")
    assert read_whole(m.path("r.bin")) == data
    later = metrics()
    assert later["dorafs_mount_object_files_taken_again_total"] == after["dorafs_mount_object_files_taken_again_total"]
    assert held_reads(later) == held_reads(after), "read from the file the worker let go of"


# -- in-process: answering reads of a held file -------------------------------------------


def test_a_held_file_is_answered_from_its_mapping_when_cached_and_never_from_the_disk_on_the_loop(
        tmp_path, monkeypatch):
    """A read of a held file whose pages the kernel's page cache holds is a view of the
    file's mapping (no copy before the reply's); one with a page the cache lacks is left
    to a thread (None); where cachestat cannot answer, the buffer's RWF_NOWAIT read
    decides. Every answer is the file's bytes, short only at its end."""
    import trio

    from dorafs.client import local
    from dorafs.fuse.objectfiles import HeldFile, HeldReader

    data = os.urandom(3 * MiB + 5)
    path = tmp_path / "object"
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())  # clean pages: the kernel may let them go when advised
    fd = os.open(path, os.O_RDONLY)
    try:
        if local.cached_in_range(fd, 0, 1) is None:
            pytest.skip("no cachestat in this kernel")
        held, reader = HeldFile(("u", "v"), fd, len(data)), HeldReader()
        os.pread(fd, len(data), 0)  # all of it in the page cache
        part = reader.now(held, MiB + 3, MiB)
        assert bytes(part) == data[MiB + 3:2 * MiB + 3] and part.obj is held.mapping
        assert bytes(reader.now(held, 3 * MiB, MiB)) == data[3 * MiB:]  # short at the end
        del part
        held.mapping = None  # unmapped (the kernel keeps pages a mapping shows)
        os.posix_fadvise(fd, 2 * MiB, MiB, os.POSIX_FADV_DONTNEED)
        assert local.cached_in_range(fd, 2 * MiB, MiB) == 0
        assert reader.now(held, MiB, 2 * MiB) is None  # a page from the disk: a thread reads it
        assert trio.run(reader.later, held, MiB, 2 * MiB) == data[MiB:3 * MiB]
        monkeypatch.setattr(local, "_cachestat_usable", False)
        other = HeldFile(("u", "w"), fd, len(data))
        assert bytes(reader.now(other, 0, MiB)) == data[:MiB] and other.mapping is None
    finally:
        os.close(fd)
