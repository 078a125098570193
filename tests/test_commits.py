"""Writes that tell the truth, and no lost update: real mounts, the real moto server, and
tests/faultproxy.py between them to lose answers, delay requests and count the bytes.

- A commit whose answer is lost (PUT, UploadPart, CompleteMultipartUpload) is looked up
  before anything is sent again: close succeeds once the object is there, and the proxy
  sees each byte once.
- A CompleteMultipartUpload that takes longer than `ufs_deadline` is waited for.
- Commits are conditional: two mounts changing one object from the same version, one
  close fails with ESTALE and the object holds exactly the other writer's result.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest


MiB = 1 << 20


def options(procs, extra: str = "") -> str:
    base = f"staging_dir={procs.tmp / 'staging'},attr_timeout=0.2,entry_timeout=0.2,upload_part_size=5MiB"
    return base + ("," + extra if extra else "")


def through(procs, s3_server, bucket, proxy, prefix: str = "", name: str = "mount", extra: str = ""):
    """A worker and a mount whose S3 requests all go through `proxy`."""
    env = proxy.env(s3_server.env)
    worker = procs.worker(env=env, name=f"{name}-worker")
    return procs.mount(f"s3://{bucket}{prefix}", workers=[worker.address], env=env, name=name,
                       options=options(procs, extra))


def expect_errno(code: int, fn, *args):
    with pytest.raises(OSError) as failure:
        fn(*args)
    assert failure.value.errno == code, f"expected {errno.errorcode[code]}, got {failure.value!r}"


def body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# -- truthful failures ---------------------------------------------------------------------

def test_a_put_whose_answer_is_lost_still_succeeds_once_the_object_is_there(procs, s3_server, bucket, proxy):
    """Through a link of 256 KB/s per connection (the PUT takes 8 s), its answer is lost."""
    s3 = s3_server.client()
    mount = through(procs, s3_server, bucket, proxy)
    proxy.limit(256_000)
    data = os.urandom(2 * MiB)
    proxy.drop(1, lambda seen: seen.op == "put_object" and "small.bin" in seen.path)
    with open(mount.path("small.bin"), "wb") as f:
        f.write(data)
    # close succeeded: the object is there, sent once (the lost answer was looked up, not resent)
    assert body(s3, bucket, "small.bin") == data
    assert proxy.injected == 1
    puts = [seen for seen in proxy.seen if seen.op == "put_object" and "small.bin" in seen.path]
    assert len(puts) == 1 and proxy.payload("put_object") == len(data)


def test_a_lost_part_answer_and_a_lost_complete_answer_send_nothing_twice(procs, s3_server, bucket, proxy):
    """Through a link of 1 MB/s per connection (a part takes 5 s), the answers of part 2
    and of the complete are lost: both are looked up, nothing is sent again."""
    s3 = s3_server.client()
    mount = through(procs, s3_server, bucket, proxy)
    proxy.limit(1_000_000)
    data = os.urandom(17 * MiB + 5)  # four 5 MiB parts, the last shorter
    proxy.drop(1, lambda seen: seen.op == "upload_part" and "partNumber=2" in seen.path)
    proxy.drop(1, lambda seen: seen.op == "complete")
    with open(mount.path("big.bin"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert proxy.injected == 2
    got = body(s3, bucket, "big.bin")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert proxy.payload("upload_part") == len(data)  # each byte once
    assert proxy.count("complete") == 1  # the object was found, the complete not sent again
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_complete_slower_than_the_deadline_is_waited_for(procs, s3_server, bucket, proxy):
    """The complete is held 6 s (beyond ufs_deadline 4 s and ufs_timeout 2 s): it is a slow
    answer, not a failure, and nothing is sent again."""
    s3 = s3_server.client()
    mount = through(procs, s3_server, bucket, proxy)
    data = os.urandom(11 * MiB)
    proxy.delay(6, 1, lambda seen: seen.op == "complete")
    started = time.monotonic()
    with open(mount.path("slow.bin"), "wb") as f:
        f.write(data)
    assert time.monotonic() - started >= 6
    assert body(s3, bucket, "slow.bin") == data
    assert proxy.count("complete") == 1 and proxy.payload("upload_part") == len(data)


def test_512_mib_sequential_write_with_fsync_lands_and_each_byte_is_sent_once(procs, s3_server, bucket, proxy):
    """moto takes seconds to complete an upload this large (more than ufs_deadline): fsync
    and close succeed, and the proxy sees every byte exactly once."""
    s3 = s3_server.client()
    mount = through(procs, s3_server, bucket, proxy, extra="upload_part_size=16MiB")
    size = 512 * MiB
    block = os.urandom(MiB)
    digest = hashlib.md5()
    with open(mount.path("huge.bin"), "wb") as f:
        for i in range(size // MiB):
            piece = block[i % 7:] + block[:i % 7]  # distinct pieces, cheap to make
            f.write(piece)
            digest.update(piece)
        f.flush()  # Python's buffer to the mount, then fsync: `dd conv=fsync`
        os.fsync(f.fileno())
    head = s3.head_object(Bucket=bucket, Key="huge.bin")
    assert head["ContentLength"] == size
    parts = [s.path.split("partNumber=")[1] + f":{s.payload}:{s.status}" for s in proxy.seen if s.op == "upload_part"]
    assert proxy.payload("upload_part") == size, " ".join(parts)  # each byte once
    assert proxy.count("complete") == 1
    check = hashlib.md5()
    stream = s3.get_object(Bucket=bucket, Key="huge.bin")["Body"]
    while chunk := stream.read(8 * MiB):
        check.update(chunk)
    assert check.digest() == digest.digest()


def test_a_failed_commit_keeps_the_upload_and_the_retry_sends_only_what_is_missing(
        procs, s3_server, bucket, proxy):
    s3 = s3_server.client()
    mount = through(procs, s3_server, bucket, proxy, extra="ufs_attempts=2")
    procs.allow = (r"InternalError",)
    data = os.urandom(12 * MiB)
    fd = os.open(mount.path("retry.bin"), os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, data)
        deadline = time.monotonic() + 30  # the two full parts stream out while writing
        while True:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            parts = s3.list_parts(Bucket=bucket, Key="retry.bin", UploadId=uploads[0]["UploadId"]).get(
                "Parts", []) if uploads else []
            if len(parts) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(parts) == 2
        proxy.fail(None, 500, "InternalError", reads_only=False)
        expect_errno(errno.EIO, os.fsync, fd)  # the last part cannot be sent: reported
        assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
        proxy.passthrough()
        before = proxy.payload("upload_part")
        os.fsync(fd)  # the staged bytes and the upload stayed: this sends the last part, completes
        assert proxy.payload("upload_part") - before == 2 * MiB  # only what was missing
    finally:
        os.close(fd)
    assert body(s3, bucket, "retry.bin") == data
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- no lost update --------------------------------------------------------------------------

def two_writing_mounts(procs, bucket):
    """Two mounts of one bucket through one worker, each with its own staging, whose
    conflicting commits are expected (and logged)."""
    worker = procs.worker()
    a = procs.mount(f"s3://{bucket}", workers=[worker.address], name="a", options=options(procs))
    b = procs.mount(f"s3://{bucket}", workers=[worker.address], name="b",
                    options=f"staging_dir={procs.tmp / 'staging-b'},attr_timeout=0.2,entry_timeout=0.2")
    procs.allow = (r"changed while it was written here",)
    return a, b


def test_two_mounts_appending_from_one_version_one_close_fails_nothing_is_lost(procs, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="log.txt", Body=b"line 0\n")
    a, b = two_writing_mounts(procs, bucket)
    fa = os.open(a.path("log.txt"), os.O_WRONLY | os.O_APPEND)
    fb = os.open(b.path("log.txt"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fa, b"line from a\n")
        os.write(fb, b"line from b\n")
        os.close(fa)
        fa = -1
        assert body(s3, bucket, "log.txt") == b"line 0\nline from a\n"
        expect_errno(errno.ESTALE, os.fsync, fb)  # b staged from the version a replaced
        expect_errno(errno.ESTALE, os.fsync, fb)  # and again: the staged bytes stay, nothing is forced
    finally:
        if fa >= 0:
            os.close(fa)
        try:
            os.close(fb)  # its flush fails the same way
        except OSError as exc:
            assert exc.errno == errno.ESTALE
    assert body(s3, bucket, "log.txt") == b"line 0\nline from a\n"  # exactly a's result
    logged = b.log_text()
    head = s3.head_object(Bucket=bucket, Key="log.txt")
    assert "changed while it was written here" in logged
    assert head["ETag"] in logged  # both versions named: the one it found...
    assert hashlib.md5(b"line 0\n").hexdigest() in logged  # ...and the one it staged from


def test_two_mounts_creating_one_new_file_the_second_close_fails(procs, s3_server, bucket):
    s3 = s3_server.client()
    a, b = two_writing_mounts(procs, bucket)
    fa = os.open(a.path("new.txt"), os.O_CREAT | os.O_WRONLY)
    fb = os.open(b.path("new.txt"), os.O_CREAT | os.O_WRONLY)
    os.write(fa, b"from a")
    os.write(fb, b"from b, longer")
    os.close(fa)
    try:
        expect_errno(errno.ESTALE, os.fsync, fb)
    finally:
        try:
            os.close(fb)
        except OSError as exc:
            assert exc.errno == errno.ESTALE
    assert body(s3, bucket, "new.txt") == b"from a"


def test_a_server_that_ignores_conditional_writes_is_logged_once_and_checked_by_version(
        procs, s3_server, bucket, proxy):
    """The proxy strips If-Match/If-None-Match from writes: the mount finds out with its
    probe, says so once, and checks the version with a HEAD before each commit instead."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="log.txt", Body=b"line 0\n")
    proxy.ignore_conditions = True
    mount = through(procs, s3_server, bucket, proxy, name="a")
    procs.allow = (r"changed while it was written here", r"does not honour conditional writes")
    with open(mount.path("first.txt"), "wb") as f:
        f.write(b"one")
    with open(mount.path("second.txt"), "wb") as f:
        f.write(b"two")
    fd = os.open(mount.path("log.txt"), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"line from the mount\n")
        s3.put_object(Bucket=bucket, Key="log.txt", Body=b"line 0\nline from elsewhere\n")
        expect_errno(errno.ESTALE, os.fsync, fd)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ESTALE
    assert body(s3, bucket, "log.txt") == b"line 0\nline from elsewhere\n"
    assert body(s3, bucket, "second.txt") == b"two"
    assert mount.log_text().count("does not honour conditional writes") == 1
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [
        "first.txt", "log.txt", "second.txt"]  # the probe object was removed
