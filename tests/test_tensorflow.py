"""TensorFlow (CPU) reads through a real mount: `tf.data.TFRecordDataset` over TFRecord
files in the bucket, every record checked, and `tf.io.gfile` listing, stat and reads.

The TFRecord files are framed here, from TensorFlow's documented format (length,
masked CRC-32C of the length, data, masked CRC-32C of the data), so TensorFlow checks
its own CRCs over bytes it did not write. TensorFlow runs in a child process: it starts
many threads of its own, which the rest of the test process should not inherit.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest

# Not imported here (that would start TensorFlow's threads in the test process): the child does.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow-cpu is installed by scripts/setup.sh")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(records: list[bytes]) -> bytes:
    out = bytearray()
    for record in records:
        length = struct.pack("<Q", len(record))
        out += length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))
    return bytes(out)


def test_crc32c_matches_the_published_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) check value


READER = textwrap.dedent("""
    import hashlib, json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    root, names, gz = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    assert not tf.config.list_physical_devices("GPU")
    sha = lambda b: hashlib.sha256(b).hexdigest()
    out = {"records": {}, "gfile": {}, "size": {}}
    for name in names:
        out["records"][name] = [sha(r.numpy()) for r in tf.data.TFRecordDataset(os.path.join(root, name))]
        with tf.io.gfile.GFile(os.path.join(root, name), "rb") as f:
            out["gfile"][name] = sha(f.read())
            f.seek(100_000)
            out.setdefault("at", {})[name] = sha(f.read(70_000))
        out["size"][name] = tf.io.gfile.stat(os.path.join(root, name)).length
    out["gz"] = [sha(r.numpy()) for r in tf.data.TFRecordDataset(os.path.join(root, gz), compression_type="GZIP")]
    files = tf.data.Dataset.list_files(os.path.join(root, "shards", "*.tfrecord"), shuffle=False)
    out["interleaved"] = sorted(sha(r.numpy()) for r in tf.data.TFRecordDataset(files, num_parallel_reads=3))
    out["listdir"] = sorted(tf.io.gfile.listdir(os.path.join(root, "shards")))
    out["glob"] = sorted(os.path.relpath(p, root) for p in tf.io.gfile.glob(os.path.join(root, "shards", "*.tfrecord")))
    out["isdir"] = tf.io.gfile.isdir(os.path.join(root, "shards"))
    out["missing"] = tf.io.gfile.exists(os.path.join(root, "shards", "nope.tfrecord"))
    out["walk"] = sorted(f for _, _, fs in tf.io.gfile.walk(root) for f in fs)
    print(json.dumps(out))
""")


def test_tensorflow_reads_tfrecords_and_gfile_through_the_mount(procs, s3_server, bucket, tmp_path):
    s3 = s3_server.client()
    rng = random.Random(20)
    shards: dict[str, list[bytes]] = {}
    for i in range(3):
        shards[f"shards/train-{i}.tfrecord"] = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(150)]
    for name, records in shards.items():
        s3.put_object(Bucket=bucket, Key=f"tf/{name}", Body=tfrecords(records))
    gz_records = [rng.randbytes(rng.randrange(1, 2000)) for _ in range(100)]
    s3.put_object(Bucket=bucket, Key="tf/other/val.tfrecord.gz", Body=gzip.compress(tfrecords(gz_records)))
    s3.put_object(Bucket=bucket, Key="tf/shards/README", Body=b"three shards\n")

    # 64 KiB pages: every file spans several, and records cross page boundaries.
    worker = procs.worker(page_size="64KiB")
    mount = procs.mount(f"s3://{bucket}/tf", workers=[worker.address])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", READER, str(mount.mountpoint), json.dumps(sorted(shards)),
                           "other/val.tfrecord.gz"], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])

    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    for name, records in shards.items():
        framed = tfrecords(records)
        assert got["records"][name] == [sha(r) for r in records], f"records of {name}"
        assert got["gfile"][name] == sha(framed)
        assert got["at"][name] == sha(framed[100_000:170_000])
        assert got["size"][name] == len(framed)
    assert got["gz"] == [sha(r) for r in gz_records]
    assert got["interleaved"] == sorted(sha(r) for records in shards.values() for r in records)
    assert got["listdir"] == sorted(["README"] + [n.split("/")[1] for n in shards])
    assert got["glob"] == sorted(shards)
    assert got["isdir"] is True and got["missing"] is False
    assert got["walk"] == sorted(["README", "val.tfrecord.gz"] + [n.split("/")[1] for n in shards])
    assert len(worker.page_files()) >= 3 * 3  # the reads went through the worker, which cached their pages
