"""The benchmark dataset: deterministic bytes, the same for every system.

Layout under `s3://bench/<mode>/`:

    large/big.bin            one large object (1 GiB full, 256 MiB quick)
    small/NN/s00000.bin ...  many 128 KiB objects (10,000 full, 1,000 quick), 100 per directory
    small/_keep              1 KiB: s3rver 3.7.1 leaves a common prefix out of a delimited
                             listing when it holds only deeper prefixes (its directory walk
                             stops at the delimiter), so `small/` needs an object of its own
    dir/e00000 ...           one flat directory (10,000 entries full, 1,000 quick) of 1 KiB
                             objects, for `ls -l` and `stat`
    medium/m00.bin ... m63   64 objects for the "64 files open" scenario

Why the small files are spread over directories of 100: s3rver answers a prefix listing
by walking the whole directory that holds the prefix (O(entries) per LIST, where S3 is
indexed), and dorafs's `stat` lists `name/` next to its HEAD. In one 10,000-entry
directory every dorafs lookup would cost a 30,000-dirent walk in the server, which
measures s3rver more than any mount. The flat directory keeps that cost where it
belongs: in the `ls -l` and `stat` scenarios, which are about large directories.

Content: a fixed pseudo-random pattern of a period slightly over 1 MiB (so page
boundaries never line up with it), rotated by a hash of the key, with the key's 16-byte
hash at offset 0, so every object and every page is distinct. Any range of any object
is computed in O(length) from the pattern alone: the uploader streams it, the FUSE
ceiling serves it from memory without materialising the dataset, and the harness checks
bytes read through each mount against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache

import xxhash

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PERIOD = MiB + 4099
BUCKET = "bench"


@dataclass(frozen=True)
class Spec:
    mode: str
    large_size: int
    small_count: int
    small_size: int
    medium_count: int
    medium_size: int
    flat_count: int
    flat_size: int = 1024
    per_dir: int = 100

    @property
    def prefix(self) -> str:
        return self.mode

    def objects(self) -> list[tuple[str, int]]:
        """(relative path, size) of every object."""
        objs = [("large/big.bin", self.large_size)]
        objs += [(f"small/{n}", self.small_size) for n in self.small_names()] + [("small/_keep", 1024)]
        objs += [(f"medium/{n}", self.medium_size) for n in self.medium_names()]
        objs += [(f"dir/{n}", self.flat_size) for n in self.flat_names()]
        return objs

    def small_names(self) -> list[str]:
        """Paths relative to small/."""
        return [f"{i // self.per_dir:02d}/s{i:05d}.bin" for i in range(self.small_count)]

    def flat_names(self) -> list[str]:
        return [f"e{i:05d}" for i in range(self.flat_count)]

    def medium_names(self) -> list[str]:
        return [f"m{i:02d}.bin" for i in range(self.medium_count)]

    def digest(self) -> str:
        text = json.dumps([asdict(self), self.objects()], sort_keys=True) + f"period={PERIOD}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.objects())


SPECS = {
    "quick": Spec("quick", large_size=256 * MiB, small_count=1000, small_size=128 * KiB,
                  medium_count=64, medium_size=2 * MiB, flat_count=1000),
    "full": Spec("full", large_size=1 * GiB, small_count=10_000, small_size=128 * KiB,
                 medium_count=64, medium_size=8 * MiB, flat_count=10_000),
}


@lru_cache(maxsize=1)
def _pattern2() -> bytes:
    """The pattern twice over, so any window of up to PERIOD bytes is one slice."""
    pattern = random.Random(20261121).randbytes(PERIOD)
    return pattern + pattern


@lru_cache(maxsize=65536)
def _key_info(key: str) -> tuple[int, bytes]:
    h = xxhash.xxh3_128_digest(key.encode())
    return xxhash.xxh3_64_intdigest(key.encode()) % PERIOD, h


def read_range(key: str, size: int, offset: int, length: int) -> bytes | memoryview:
    """Bytes [offset, offset+length) of object `key` (short at its end)."""
    length = max(0, min(length, size - offset))
    if length == 0:
        return b""
    rotation, tag = _key_info(key)
    p2 = memoryview(_pattern2())
    start = (rotation + offset) % PERIOD
    if length <= PERIOD:
        data: bytes | memoryview = p2[start:start + length]
    else:
        out = bytearray()
        pos = offset
        while len(out) < length:
            s = (rotation + pos) % PERIOD
            take = min(PERIOD, length - len(out))
            out += p2[s:s + take]
            pos += take
        data = memoryview(out)
    if offset < len(tag):
        head = tag[offset:offset + length]
        return head + bytes(data[len(head):])
    return data


def object_key(spec: Spec, rel: str) -> str:
    return f"{spec.prefix}/{rel}"


def content(spec: Spec, rel: str, size: int, offset: int = 0, length: int | None = None) -> bytes:
    """What a mount must return for `rel` (relative to the dataset root)."""
    return bytes(read_range(object_key(spec, rel), size, offset, size if length is None else length))


class _RangeReader(io.RawIOBase):
    """A file-like view of one generated object, for boto3's uploader."""

    def __init__(self, key: str, size: int):
        self.key, self.size, self.pos = key, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, b):
        data = read_range(self.key, self.size, self.pos, len(b))
        n = len(data)
        b[:n] = data
        self.pos += n
        return n


def upload(s3, spec: Spec, progress=None, task=None) -> None:
    """Upload every object of `spec` (8 in flight; multipart for the large one)."""
    from boto3.s3.transfer import TransferConfig

    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:  # already there
        if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
            raise
    config = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=4)

    def put(item):
        rel, size = item
        key = object_key(spec, rel)
        if size >= 64 * MiB:
            s3.upload_fileobj(io.BufferedReader(_RangeReader(key, size), 8 * MiB), BUCKET, key, Config=config)
        else:
            s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(read_range(key, size, 0, size)))
        if progress is not None:
            progress.advance(task, size)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, spec.objects()))


def count_objects(s3, spec: Spec) -> int:
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=spec.prefix + "/"):
        n += len(page.get("Contents", []))
    return n
