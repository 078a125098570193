"""Writes through the mount: new files, overwrite, append, random writes, namespace changes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

MiB = 1 << 20


def keys(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under `prefix`, with its bytes."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


@pytest.fixture
def rw(procs, s3_server, bucket):
    """A writable mount of an empty prefix, with short TTLs."""
    worker = procs.worker(extra=["--status-ttl", "1s", "--listing-ttl", "1s"])
    mount = procs.mount(f"s3://{bucket}/w", workers=[worker.address],
                        options=f"staging_dir={procs.tmp / 'staging'},attr_timeout=0.2,entry_timeout=0.2")
    return mount, s3_server.client(), bucket


def test_smoke(rw):
    mount, s3, bucket = rw
    mount.path("a.txt").write_bytes(b"hello")
    assert keys(s3, bucket) == {"w/a.txt": b"hello"}
    assert mount.path("a.txt").read_bytes() == b"hello"
    with open(mount.path("a.txt"), "ab") as f:
        f.write(b" world")
    assert mount.path("a.txt").read_bytes() == b"hello world"
    assert keys(s3, bucket) == {"w/a.txt": b"hello world"}
    os.mkdir(mount.path("d"))
    os.rename(mount.path("a.txt"), mount.path("d", "b.txt"))
    assert sorted(os.listdir(mount.mountpoint)) == ["d"]
    assert keys(s3, bucket) == {"w/d/": b"", "w/d/b.txt": b"hello world"}
