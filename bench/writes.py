"""Write throughput through a dorafs mount, next to boto3 writing the same bytes directly.

    python3 bench/writes.py [--size-mib 256] [--files 200]

Starts moto's S3 server, one worker and a mount on loopback (the test helpers), then
times: one large file written sequentially in 1 MiB writes and closed (streamed as a
multipart upload), the same bytes uploaded with boto3's `upload_fileobj`, and many
128 KiB files written one after the other. Prints one line per case, and the mount
process's peak RSS (uploads hold at most `upload_concurrency` parts in memory).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import ProcessSet  # noqa: E402
from tests.support import S3Server  # noqa: E402

MiB = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--files", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = S3Server(tmp)
        os.environ.update(server.env)
        try:
            s3 = server.client()
            s3.create_bucket(Bucket="bench")
            with ProcessSet(tmp) as procs:
                worker = procs.worker()
                mount = procs.mount("s3://bench/w", workers=[worker.address],
                                    options=f"staging_dir={tmp / 'staging'}")
                run(mount, s3, args)
        finally:
            server.stop()


def run(mount, s3, args) -> None:
    block = os.urandom(MiB)
    size = args.size_mib * MiB
    start = time.perf_counter()
    with open(mount.path("big.bin"), "wb") as f:
        for _ in range(args.size_mib):
            f.write(block)
    mount_seconds = time.perf_counter() - start
    assert s3.head_object(Bucket="bench", Key="w/big.bin")["ContentLength"] == size

    start = time.perf_counter()
    s3.upload_fileobj(io.BytesIO(block * args.size_mib), "bench", "direct/big.bin")
    boto_seconds = time.perf_counter() - start

    small = os.urandom(128 << 10)
    os.mkdir(mount.path("small"))
    start = time.perf_counter()
    for i in range(args.files):
        with open(mount.path("small", f"f{i:05d}"), "wb") as f:
            f.write(small)
    small_seconds = time.perf_counter() - start

    print(f"sequential write {args.size_mib} MiB + close through the mount: "
          f"{args.size_mib / mount_seconds:7.1f} MiB/s ({mount_seconds:.2f} s)")
    print(f"boto3 upload_fileobj of the same bytes:                   "
          f"{args.size_mib / boto_seconds:7.1f} MiB/s ({boto_seconds:.2f} s)")
    print(f"{args.files} files of 128 KiB through the mount:                  "
          f"{args.files / small_seconds:7.1f} files/s ({small_seconds:.2f} s)")
    print(f"mount process peak RSS: {peak_rss_mib(mount.pid):.0f} MiB")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
