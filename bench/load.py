"""Load-job throughput against reading the same files once through a cold mount.

    python3 bench/load.py [--files 2000] [--size 64KiB] [--workers 3] [--readers 8] [--s3 s3rver|moto]

One run, one dataset on an S3 server on loopback (s3rver when installed by bench/setup.sh,
else moto), three passes each on a fresh cluster (registry + workers with empty caches):

  cold read   a mount reads every file once with --readers threads (UFS -> worker -> mount)
  load        `dorafs-admin load --recursive --progress` of the same prefix (UFS -> workers)
  warm read   after the load, a fresh mount reads every file once (workers -> mount)

and prints files/s, MiB/s, seconds and S3 requests per pass. A load moves no bytes through
FUSE or to a client, and batches many files per request to each worker; how much that
buys over reading once is what this measures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dorafs.config import parse_size  # noqa: E402
from servers import SERVERS, S3rver  # noqa: E402
from tests.cluster import ProcessSet  # noqa: E402
from tests.support import wait_for  # noqa: E402

BUCKET = "bench"


def upload(s3, prefix: str, files: int, size: int) -> list[str]:
    names = [f"d{i % 8}/f{i:06d}.bin" for i in range(files)]
    body = os.urandom(size)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception:
        pass  # already there (s3rver keeps its data)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body), names))
    return names


def start_cluster(procs: ProcessSet, workers: int, cache_size: str):
    registry = procs.registry(ttl="10s")
    started = [procs.worker(registry=registry.url, cache_size=cache_size,
                            extra=["--status-ttl", "10m", "--listing-ttl", "10m"]) for _ in range(workers)]
    wait_for(lambda: len(registry.workers()) == workers, what="workers to register")
    return registry, started


def read_all(mountpoint: Path, names: list[str], readers: int) -> int:
    def one(name: str) -> int:
        with open(mountpoint / name, "rb") as f:
            return len(f.read())
    with ThreadPoolExecutor(readers) as pool:
        return sum(pool.map(one, names))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", default="64KiB", help="bytes per file (default 64KiB)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--readers", type=int, default=8, help="threads reading through the mount")
    p.add_argument("--s3", choices=sorted(SERVERS), default="s3rver" if S3rver.available() else "moto")
    args = p.parse_args()
    size = parse_size(args.size)
    total = args.files * size
    cache_size = f"{max(1 << 30, 2 * total)}"

    with tempfile.TemporaryDirectory(prefix="dorafs-bench-load-") as tmp:
        tmp = Path(tmp)
        server = SERVERS[args.s3](tmp)
        os.environ.update(server.env)
        try:
            prefix = f"load-{args.files}x{size}"
            server.clear(prefix)
            t = time.perf_counter()
            names = upload(server.client(), prefix, args.files, size)
            print(f"uploaded {args.files} files of {size} bytes to {args.s3} in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr)
            uri = f"s3://{BUCKET}/{prefix}"
            rows = []

            def measure(label: str, fn) -> None:
                before = server.requests()
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
                rows.append((label, args.files / seconds, total / seconds / (1 << 20), seconds,
                             server.requests() - before))

            with ProcessSet(tmp / "cold") as procs:
                registry, _ = start_cluster(procs, args.workers, cache_size)
                mount = procs.mount(uri, registry=registry.url)
                measure(f"cold read, mount, {args.readers} readers",
                        lambda: read_all(mount.mountpoint, names, args.readers))

            with ProcessSet(tmp / "load") as procs:
                registry, _ = start_cluster(procs, args.workers, cache_size)

                def load() -> None:
                    subprocess.run([sys.executable, "-m", "dorafs.cli.admin", "--registry", registry.url, "load",
                                    uri, "--recursive", "--progress"], check=True, cwd=REPO)
                measure(f"load job, {args.workers} workers", load)
                mount = procs.mount(uri, registry=registry.url)
                measure(f"warm read after load, {args.readers} readers",
                        lambda: read_all(mount.mountpoint, names, args.readers))
        finally:
            server.stop()

    table = Table(title=f"dorafs load: {args.files} files x {args.size}, {args.workers} workers, {args.s3}")
    for column in ("pass", "files/s", "MiB/s", "seconds", "S3 requests"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for label, files_s, mib_s, seconds, requests in rows:
        table.add_row(label, f"{files_s:,.0f}", f"{mib_s:,.1f}", f"{seconds:.2f}", f"{requests:,}")
    Console().print(table)
    cold, loaded = rows[0], rows[1]
    print(f"load / cold read: {loaded[1] / cold[1]:.2f}x files/s")


if __name__ == "__main__":
    main()
