"""Writes through the mount: new files, overwrite, append, random writes, namespace changes.

Real processes throughout: moto S3, a worker, FUSE mounts. Upload failures come from a
small fault-injecting HTTP proxy between the mount's boto3 and moto that answers 500 to
every upload request.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import random
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port

MiB = 1 << 20


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`, with its bytes."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def mount_options(procs, extra: str = "") -> str:
    options = f"staging_dir={procs.tmp / 'staging'},attr_timeout=0.2,entry_timeout=0.2,upload_part_size=5MiB"
    return options + ("," + extra if extra else "")


@pytest.fixture
def rw(procs, s3_server, bucket):
    """A writable mount of a prefix that does not exist yet (how a user starts)."""
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/w", workers=[worker.address],
                        options=mount_options(procs, "status_ttl=1s,listing_ttl=1s,negative_ttl=1s"))
    return mount, s3_server.client(), bucket


def expect_errno(code: int, fn, *args):
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, f"{fn.__name__}{args}: {info.value!r}"


# -- files ------------------------------------------------------------------------------

def test_new_files_overwrite_append_and_random_writes(rw):
    mount, s3, bucket = rw
    assert os.listdir(mount.mountpoint) == []  # an empty prefix mounts, empty
    mount.path("a.txt").write_bytes(b"hello")
    assert objects(s3, bucket) == {"w/a.txt": b"hello"}  # visible in the UFS once closed
    assert mount.path("a.txt").read_bytes() == b"hello"

    with open(mount.path("a.txt"), "ab") as f:  # echo >> file
        f.write(b" world")
    assert mount.path("a.txt").read_bytes() == b"hello world"
    subprocess.run(f"echo again >> {mount.path('a.txt')}", shell=True, check=True)
    assert objects(s3, bucket)["w/a.txt"] == b"hello world" + b"again\n"

    src = Path(mount.mountpoint).parent / "local-src.bin"
    src.write_bytes(os.urandom(300_000))
    shutil.copy(src, mount.path("a.txt"))  # O_TRUNC over an existing file
    assert mount.path("a.txt").read_bytes() == src.read_bytes()
    assert mount.path("a.txt").stat().st_size == 300_000

    model = bytearray(src.read_bytes())
    rng = random.Random(3)
    with open(mount.path("a.txt"), "r+b") as f:  # random writes, reads of own writes, truncate
        for _ in range(40):
            offset, data = rng.randrange(0, 400_000), rng.randbytes(rng.randrange(1, 20_000))
            f.seek(offset)
            f.write(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
        f.flush()
        f.seek(0)
        assert f.read() == bytes(model)
        f.truncate(123_456)
        del model[123_456:]
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
        model += b"tail"
    assert objects(s3, bucket)["w/a.txt"] == bytes(model)
    assert mount.path("a.txt").read_bytes() == bytes(model)

    os.truncate(mount.path("a.txt"), 10)  # truncate(2) of a closed file uploads at once
    assert objects(s3, bucket)["w/a.txt"] == bytes(model[:10])
    os.truncate(mount.path("a.txt"), 20)
    assert mount.path("a.txt").read_bytes() == bytes(model[:10]) + bytes(10)

    fd = os.open(mount.path("empty"), os.O_CREAT | os.O_WRONLY | os.O_EXCL)
    os.close(fd)
    assert objects(s3, bucket)["w/empty"] == b""
    expect_errno(errno.EEXIST, os.open, mount.path("empty"), os.O_CREAT | os.O_WRONLY | os.O_EXCL)


def test_handles_of_one_file_share_its_staged_bytes(rw):
    mount, s3, bucket = rw
    mount.path("shared").write_bytes(b"0123456789")
    first = os.open(mount.path("shared"), os.O_WRONLY)
    second = os.open(mount.path("shared"), os.O_RDWR)
    reader = os.open(mount.path("shared"), os.O_RDONLY)
    try:
        os.pwrite(first, b"AB", 0)
        assert os.pread(second, 100, 0) == b"AB23456789"  # every handle reads the writes
        assert os.pread(reader, 100, 0) == b"AB23456789"
        assert os.fstat(reader).st_size == 10
        os.close(first)  # uploads what is staged so far
        first = -1
        assert objects(s3, bucket)["w/shared"] == b"AB23456789"
        os.pwrite(second, b"CD", 8)
        os.ftruncate(second, 12)
    finally:
        for fd in (first, second, reader):
            if fd >= 0:
                os.close(fd)
    assert objects(s3, bucket)["w/shared"] == b"AB234567CD\0\0"
    assert mount.path("shared").read_bytes() == b"AB234567CD\0\0"


def test_large_sequential_file_streams_as_multipart_upload(procs, s3_server, bucket):
    s3 = s3_server.client()
    worker = procs.worker()
    # The staging space is smaller than the file: a sequential writer streams past it.
    port = free_port()
    mount = procs.mount(f"s3://{bucket}", workers=[worker.address], options=mount_options(
        procs, f"staging_size=12MiB,upload_concurrency=2,metrics_listen=127.0.0.1:{port}"))
    data = os.urandom(33 * MiB + 17)
    with open(mount.path("big.bin"), "wb") as f:
        for start in range(0, 24 * MiB, MiB):
            f.write(data[start:start + MiB])
        # Before close, full parts are already in an upload in progress, and nothing is visible.
        deadline = time.monotonic() + 30
        while True:
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            parts = s3.list_parts(Bucket=bucket, Key="big.bin", UploadId=uploads[0]["UploadId"]).get(
                "Parts", []) if uploads else []
            if len(parts) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(parts) >= 3
        assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
        f.write(data[24 * MiB:])
    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-7")  # seven 5 MiB parts (the last shorter)
    body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert hashlib.sha256(mount.path("big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list((procs.tmp / "staging").glob("*/*")) == []  # staged bytes gone after close
    metrics = {f"{x.name}{x.labels.get('result', '')}": x.value for family in text_string_to_metric_families(
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text) for x in family.samples}
    assert metrics["dorafs_mount_uploads_totalok"] == 1
    assert metrics["dorafs_mount_upload_bytes_total"] == metrics["dorafs_mount_write_bytes_total"] == len(data)
    assert metrics["dorafs_mount_staging_bytes"] == 0


def test_staging_space_exhausted_gives_enospc_and_uploads_nothing(procs, s3_server, bucket):
    procs.allow = (r"WARNING dorafs\.fuse .* (open|write): staging space exhausted \(\d+ of \d+ bytes in use; "
                   r"raise staging_size\) \(ENOSPC\)$",)
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="s/existing.bin", Body=os.urandom(3 * MiB))
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/s", workers=[worker.address],
                        options=mount_options(procs, "staging_size=2MiB"))
    expect_errno(errno.ENOSPC, open, mount.path("existing.bin"), "r+b")  # staging it needs 3 MiB
    fd = os.open(mount.path("random.bin"), os.O_CREAT | os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 1000, 0)
        expect_errno(errno.ENOSPC, os.pwrite, fd, b"y" * 1000, 4 * MiB)  # not sequential: must stage
    finally:
        os.close(fd)  # what fitted is uploaded: the file as written, never a part of a write
    assert objects(s3, bucket, "s/random") == {"s/random.bin": b"x" * 1000}
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    free = os.statvfs(mount.mountpoint)
    assert free.f_bavail * free.f_frsize == 2 * MiB  # df shows the staging space left


def test_read_only_mount_refuses_changes_with_erofs(procs, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="ro/f.txt", Body=b"data")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/ro", workers=[worker.address], options="ro")
    for attempt in (lambda: open(mount.path("new.txt"), "w"), lambda: open(mount.path("f.txt"), "a"),
                    lambda: os.mkdir(mount.path("d")), lambda: os.unlink(mount.path("f.txt")),
                    lambda: os.rename(mount.path("f.txt"), mount.path("g.txt")),
                    lambda: os.truncate(mount.path("f.txt"), 0)):
        expect_errno(errno.EROFS, attempt)
    assert mount.path("f.txt").read_bytes() == b"data"
    assert objects(s3, bucket) == {"ro/f.txt": b"data"}
    assert os.statvfs(mount.mountpoint).f_bavail == 0


# -- namespace --------------------------------------------------------------------------

def test_directories_unlink_and_rename(rw):
    mount, s3, bucket = rw
    os.mkdir(mount.path("d"))
    assert objects(s3, bucket) == {"w/d/": b""}  # a directory marker
    expect_errno(errno.EEXIST, os.mkdir, mount.path("d"))
    os.makedirs(mount.path("d", "sub", "deeper"))
    mount.path("d", "sub", "f1").write_bytes(b"one")
    mount.path("d", "sub", "deeper", "f2").write_bytes(b"two")
    expect_errno(errno.ENOTEMPTY, os.rmdir, mount.path("d"))
    expect_errno(errno.ENOTDIR, os.rmdir, mount.path("d", "sub", "f1"))
    expect_errno(errno.EISDIR, os.unlink, mount.path("d", "sub"))
    expect_errno(errno.ENOENT, os.unlink, mount.path("d", "nothing"))

    os.rename(mount.path("d", "sub"), mount.path("moved"))  # a directory, with its contents
    assert sorted(os.listdir(mount.mountpoint)) == ["d", "moved"]
    assert os.listdir(mount.path("d")) == []
    assert mount.path("moved", "deeper", "f2").read_bytes() == b"two"
    assert objects(s3, bucket) == {"w/d/": b"", "w/moved/": b"", "w/moved/f1": b"one",
                                   "w/moved/deeper/": b"", "w/moved/deeper/f2": b"two"}

    mount.path("other").write_bytes(b"other")
    os.rename(mount.path("moved", "f1"), mount.path("other"))  # replaces a file
    assert mount.path("other").read_bytes() == b"one"
    expect_errno(errno.EISDIR, os.rename, mount.path("other"), mount.path("d"))
    expect_errno(errno.ENOTDIR, os.rename, mount.path("moved"), mount.path("other"))
    expect_errno(errno.ENOTEMPTY, os.rename, mount.path("d"), mount.path("moved"))
    os.rename(mount.path("moved"), mount.path("d"))  # over an empty directory
    assert mount.path("d", "deeper", "f2").read_bytes() == b"two"

    os.unlink(mount.path("d", "deeper", "f2"))
    assert os.listdir(mount.path("d", "deeper")) == []  # the directory stays, as on a disk
    os.rmdir(mount.path("d", "deeper"))
    os.rmdir(mount.path("d"))
    assert sorted(os.listdir(mount.mountpoint)) == ["other"]
    assert objects(s3, bucket) == {"w/other": b"one"}

    expect_errno(errno.ENOTSUP, os.symlink, "other", mount.path("link"))
    expect_errno(errno.ENOTSUP, os.link, mount.path("other"), mount.path("hard"))
    expect_errno(errno.ENOTSUP, os.setxattr, mount.path("other"), "user.k", b"v")
    os.chmod(mount.path("other"), 0o600)  # accepted, not kept: S3 stores no modes
    os.utime(mount.path("other"), (1, 1))
    assert mount.path("other").read_bytes() == b"one"


def test_writes_invalidate_the_workers_and_other_mounts_see_them(procs, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="v/f.bin", Body=b"A" * MiB)
    worker = procs.worker()
    ttls = "status_ttl=60s,listing_ttl=60s,negative_ttl=60s"
    writer = procs.mount(f"s3://{bucket}/v", workers=[worker.address], options=mount_options(procs, ttls))
    reader = procs.mount(f"s3://{bucket}/v", workers=[worker.address],
                         options=f"{ttls},attr_timeout=0.2,entry_timeout=0.2")
    assert reader.path("f.bin").read_bytes() == b"A" * MiB  # status, listing and pages cached
    assert os.listdir(reader.mountpoint) == ["f.bin"]
    writer.path("f.bin").write_bytes(b"B" * MiB)  # same size, new bytes
    writer.path("g.txt").write_bytes(b"new")
    time.sleep(0.5)  # past the reader's kernel timeouts; far within the worker's 60 s TTLs
    assert reader.path("f.bin").read_bytes() == b"B" * MiB  # a new version: new page ids
    assert sorted(os.listdir(reader.mountpoint)) == ["f.bin", "g.txt"]
    os.unlink(writer.path("g.txt"))
    time.sleep(0.5)
    assert os.listdir(reader.mountpoint) == ["f.bin"]


def test_file_ufs_writes(procs, tmp_path):
    root = tmp_path / "local-ufs"
    root.mkdir()
    (root / "old.txt").write_bytes(b"old")
    worker = procs.worker()
    mount = procs.mount(f"file://{root}", workers=[worker.address], options=mount_options(procs))
    with open(mount.path("old.txt"), "ab") as f:
        f.write(b"er")
    mount.path("big.bin").write_bytes(data := os.urandom(12 * MiB))
    os.mkdir(mount.path("d"))
    os.rename(mount.path("old.txt"), mount.path("d", "older.txt"))
    assert (root / "d" / "older.txt").read_bytes() == b"older"
    assert (root / "big.bin").read_bytes() == data
    expect_errno(errno.ENOTEMPTY, os.rmdir, mount.path("d"))
    assert sorted(os.listdir(root)) == ["big.bin", "d"]  # no temporary files left behind


# -- upload failures --------------------------------------------------------------------

class FailingS3Proxy:
    """Forwards S3 requests to `upstream`, but answers 500 to uploads (PUT of an object or
    a part, completing a multipart upload) as long as `failing` is set."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.failing = True
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                upload = self.command == "PUT" or (self.command == "POST" and "uploadId=" in self.path)
                if proxy.failing and upload:
                    proxy.refused += 1
                    payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_upload_failures_surface_at_close_with_eio_and_leave_no_object(procs, s3_server, bucket, monkeypatch):
    procs.allow = (r"WARNING dorafs\.fuse .* (fsync|flush): S3 (put_object|upload_part) \S+: InternalError injected "
                   r"\(HTTP 500\) .* \(EIO\)$",)
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="f/old.txt", Body=b"old")
    worker = procs.worker()
    proxy = FailingS3Proxy(s3_server.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the mount's uploads go through the proxy
        mount = procs.mount(f"s3://{bucket}/f", workers=[worker.address], options=mount_options(procs))
        monkeypatch.undo()

        big = open(mount.path("big.bin"), "wb")
        big.write(os.urandom(12 * MiB))  # multipart: every part refused, retries included
        fd = os.open(mount.path("old.txt"), os.O_WRONLY)
        os.write(fd, b"NEW")
        with ThreadPoolExecutor(2) as pool:  # both wait out boto3's retries: side by side
            closing = pool.submit(expect_errno, errno.EIO, big.close)
            syncing = pool.submit(expect_errno, errno.EIO, os.fsync, fd)  # fsync reports it too
            closing.result()
            syncing.result()
        assert objects(s3, bucket) == {"f/old.txt": b"old"}  # nothing new, nothing partial
        proxy.failing = False
        os.fsync(fd)  # the staged bytes stayed: a retry succeeds
        os.close(fd)
        assert proxy.refused >= 10  # boto3 retried each request before giving up
        assert objects(s3, bucket) == {"f/old.txt": b"NEW"}  # never a partial object
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted
        mount.unmount()
    finally:
        proxy.close()


# -- what users run ---------------------------------------------------------------------

def test_torch_save_and_load_round_trip(rw):
    import torch  # scripts/setup.sh installs torch==2.13.0 (CPU)
    mount, s3, bucket = rw
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 2048))
    path = mount.path("ckpt", "model.pt")
    os.makedirs(path.parent)
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert len(objects(s3, bucket, "w/ckpt/model.pt")["w/ckpt/model.pt"]) == path.stat().st_size > 8 * MiB


def test_cp_r_round_trips_a_tree(rw, tmp_path):
    mount, s3, bucket = rw
    src = tmp_path / "tree"
    rng = random.Random(5)
    for i in range(30):
        path = src / f"d{i % 4}" / f"sub{i % 3}" / f"file-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.choice([0, 1, 4096, 100_000, 6 * MiB + 3])))
    (src / "empty-dir").mkdir()
    subprocess.run(["cp", "-r", str(src), str(mount.path("tree"))], check=True)
    out = tmp_path / "back"
    subprocess.run(["cp", "-r", str(mount.path("tree")), str(out)], check=True)
    subprocess.run(["diff", "-r", str(src), str(out)], check=True)
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == \
        sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))


def test_fio_sequential_write_jobs(rw):
    mount, s3, bucket = rw
    assert shutil.which("fio"), "fio comes from Debian: run scripts/setup.sh"
    for i, job in enumerate((["--rw=write", "--bs=256k", "--size=24m", "--numjobs=2"],
                             ["--rw=write", "--bs=4k", "--size=2m", "--fsync=64"],
                             ["--rw=randwrite", "--bs=64k", "--size=4m"])):
        result = subprocess.run(["fio", f"--name=job{i}", f"--directory={mount.mountpoint}", "--ioengine=psync",
                                 "--end_fsync=1", "--output-format=terse", *job],
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr + result.stdout
    written = objects(s3, bucket)
    sizes = sorted(len(v) for v in written.values())
    assert sizes == [2 * MiB, 4 * MiB, 24 * MiB, 24 * MiB]  # one file per job, each whole
    for name in os.listdir(mount.mountpoint):
        assert mount.path(name).read_bytes() == written[f"w/{name}"]
