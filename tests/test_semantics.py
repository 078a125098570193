"""Promises of docs/SEMANTICS.md not already checked elsewhere, and the doc-to-test link."""

from __future__ import annotations

import errno
import os
import re
import time

import httpx
import pytest

from tests.cluster import ESTALE_READ, REPO

MiB = 1 << 20


def test_every_promise_has_a_test():
    text = (REPO / "docs" / "SEMANTICS.md").read_text()
    promises = re.findall(r"^\d+\. \*\*", text, flags=re.M)
    cited = re.findall(r"(tests/[\w/]+\.py)::(\w+)", text)
    assert len(promises) >= 10
    blocks = re.split(r"^\d+\. \*\*", text, flags=re.M)[1:]
    assert all("(test: " in block for block in blocks), "a promise without a test"
    for path, name in cited:
        source = (REPO / path).read_text()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"{path}::{name} does not exist"


@pytest.fixture
def short_ttl_mount(procs, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="s/.keep", Body=b"")
    worker = procs.worker()  # the worker's default TTLs are long: the mount's own apply
    mount = procs.mount(f"s3://{bucket}/s", workers=[worker.address],
                        options="status_ttl=1s,listing_ttl=1s,negative_ttl=1s,attr_timeout=0.2,entry_timeout=0.2")
    return mount, worker, s3_server.client(), bucket


def test_listing_changes_show_after_ttl(short_ttl_mount):
    mount, _, s3, bucket = short_ttl_mount
    s3.put_object(Bucket=bucket, Key="s/one.txt", Body=b"1")
    s3.put_object(Bucket=bucket, Key="s/two.txt", Body=b"2")
    time.sleep(1.5)
    assert sorted(os.listdir(mount.mountpoint)) == [".keep", "one.txt", "two.txt"]
    s3.put_object(Bucket=bucket, Key="s/three.txt", Body=b"3")
    s3.delete_object(Bucket=bucket, Key="s/one.txt")
    time.sleep(1.5)  # past listing_ttl + entry_timeout
    assert sorted(os.listdir(mount.mountpoint)) == [".keep", "three.txt", "two.txt"]
    assert not mount.path("one.txt").exists()
    assert mount.path("three.txt").read_bytes() == b"3"


def test_deleted_object_gives_estale_to_open_handle(short_ttl_mount, procs):
    mount, _, s3, bucket = short_ttl_mount
    procs.allow = (ESTALE_READ,)
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=bucket, Key="s/gone.bin", Body=data)
    time.sleep(1.2)
    fd = os.open(mount.path("gone.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data[:4096]
        s3.delete_object(Bucket=bucket, Key="s/gone.bin")
        with pytest.raises(OSError) as info:
            os.pread(fd, MiB, 3 * MiB)  # a page never read: the object is gone
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    time.sleep(1.5)
    with pytest.raises(FileNotFoundError):
        os.stat(mount.path("gone.bin"))


def test_kernel_cache_kept_while_version_unchanged(procs, s3_server, bucket):
    s3 = s3_server.client()
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    s3.put_object(Bucket=bucket, Key="k/f.bin", Body=old)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/k", workers=[worker.address], options="status_ttl=0.5s,attr_timeout=0.1")

    def served() -> float:
        return worker.counter("dorafs_worker_page_requests_total")

    assert mount.path("f.bin").read_bytes() == old
    after_first = served()
    assert after_first >= 2
    for _ in range(3):  # unchanged version: the kernel serves it, dorafs sees no page read
        assert mount.path("f.bin").read_bytes() == old
    assert served() == after_first
    s3.put_object(Bucket=bucket, Key="k/f.bin", Body=new)  # same size, new bytes
    time.sleep(0.8)
    assert mount.path("f.bin").read_bytes() == new  # the next open dropped the old pages
    assert served() > after_first


def test_directory_shadows_same_named_object(procs, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="sh/a", Body=b"object a")
    s3.put_object(Bucket=bucket, Key="sh/a/inner.txt", Body=b"inner")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/sh", workers=[worker.address])
    assert os.listdir(mount.mountpoint) == ["a"]
    assert mount.path("a").is_dir()
    assert mount.path("a", "inner.txt").read_bytes() == b"inner"


def test_unrepresentable_names_are_hidden(procs, s3_server, bucket):
    s3 = s3_server.client()
    keys = ["u/ok.txt", "u/" + "n" * 256, "u/empty//x", "u/dot/./y", "u/dotdot/../z"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"k")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/u", workers=[worker.address])
    # The directories the keys pass through show; the names '', '.', '..' and the 256-byte
    # one do not, so each of those directories lists empty.
    assert sorted(os.listdir(mount.mountpoint)) == ["dot", "dotdot", "empty", "ok.txt"]
    for name in ("dot", "dotdot", "empty"):
        assert os.listdir(mount.path(name)) == [], name
    assert mount.path("ok.txt").read_bytes() == b"k"


def test_open_of_a_grown_object_reads_past_the_kernels_old_size(procs, s3_server, bucket):
    """The kernel keeps attributes for attr_timeout (here a minute); an open that pins a
    new, larger version must still return all of it, not stop at the old size."""
    s3 = s3_server.client()
    old, new = os.urandom(MiB), os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="g/f.bin", Body=old)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/g", workers=[worker.address], options="status_ttl=0.3s,attr_timeout=60s,entry_timeout=60s")
    assert mount.path("f.bin").read_bytes() == old
    s3.put_object(Bucket=bucket, Key="g/f.bin", Body=new)
    time.sleep(0.6)  # past the status TTL, far within the kernel's attribute timeout
    with open(mount.path("f.bin"), "rb") as f:
        assert f.read() == new


def test_open_keeps_the_status_it_was_given_for_attr_timeout(procs, s3_server, bucket):
    """Opening a file again within the mount's attr_timeout asks no worker for its status;
    past it, the next open asks and pins the version the workers now know."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="m/f.bin", Body=b"one")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/m", workers=[worker.address], options="attr_timeout=1s")

    def stat_requests() -> float:
        return sum(v for k, v in worker.metrics().items()
                   if k.startswith("dorafs_worker_metadata_requests_total{op=stat,"))

    assert mount.path("f.bin").read_bytes() == b"one"
    asked = stat_requests()
    for _ in range(5):
        assert mount.path("f.bin").read_bytes() == b"one"
    assert stat_requests() == asked
    s3.put_object(Bucket=bucket, Key="m/f.bin", Body=b"two!")
    response = httpx.post(f"http://{worker.address}/v1/invalidate", params={"uri": f"s3://{bucket}/m/f.bin"},
                          timeout=10)
    assert response.status_code == 200, response.text
    time.sleep(1.3)  # past attr_timeout, far within status_ttl (300 s)
    assert mount.path("f.bin").read_bytes() == b"two!"
    assert stat_requests() > asked


def test_a_read_that_finds_the_object_changed_makes_the_next_open_see_it(procs, s3_server, bucket):
    """With TTLs of minutes, an ESTALE read is what tells the mount and the worker that the
    status they keep is out of date: the next open pins the new version at once."""
    procs.allow = (ESTALE_READ,)
    s3 = s3_server.client()
    old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="c/f.bin", Body=old)
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/c", workers=[worker.address], options="readahead_pages=0")
    fd = os.open(mount.path("f.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == old[:4096]
        s3.put_object(Bucket=bucket, Key="c/f.bin", Body=new)
        with pytest.raises(OSError) as info:
            os.pread(fd, MiB, 2 * MiB)  # a page never read, of a version the UFS no longer has
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    assert mount.path("f.bin").read_bytes() == new
