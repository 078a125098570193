"""The dorafs demo: mount a dataset through the embedded single-node cluster and read it
three times: cold (from the UFS), warm (a fresh mount, from the worker's page cache) and
hot (the same mount again, from the kernel page cache). Every byte is checked.

With no URI the dataset is generated in a local S3-compatible server (moto) started for
the demo on loopback; `python3 scripts/demo.py s3://bucket/prefix` (credentials from the
standard AWS configuration) or `file:///path` reads your own data instead.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import xxhash
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

console = Console()
CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(workdir: Path) -> tuple[subprocess.Popen, dict]:
    port = free_port()
    log = open(workdir / "moto.log", "wb")
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "demo",
           "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, env
        except OSError:
            time.sleep(0.1)
    raise SystemExit("demo: the local S3 server did not start")


def make_dataset(bucket: str, prefix: str, big_files: int, big_size: int, small_files: int) -> dict[str, str]:
    """Upload the objects; returns each one's xxh3 digest by path relative to the prefix."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    seed = os.urandom(1 << 20)
    jobs = [(f"{prefix}/shards/shard-{i:03d}.bin", big_size) for i in range(big_files)]
    jobs += [(f"{prefix}/samples/{i // 100:02d}/sample-{i:05d}.jpg", 128 << 10) for i in range(small_files)]
    config = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=4)
    with Progress(TextColumn("uploading dataset"), BarColumn(), TextColumn("{task.completed}/{task.total} objects"),
                  console=console, transient=True) as progress:
        task = progress.add_task("upload", total=len(jobs))

        def put(job):
            key, size = job
            body = (seed * (size // len(seed) + 1))[:size]
            body = xxhash.xxh3_64_digest(key.encode()) + body[8:]  # every object distinct
            s3.upload_fileobj(io.BytesIO(body), bucket, key, Config=config)
            progress.advance(task)
            return key[len(prefix) + 1:], xxhash.xxh3_64_hexdigest(body)

        with ThreadPoolExecutor(8) as pool:
            return dict(pool.map(put, jobs))


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def read_all(root: Path, label: str) -> tuple[int, float, dict[str, str]]:
    files = files_under(root)
    total = sum(p.stat().st_size for p in files)
    digests: dict[str, str] = {}
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    with Progress(TextColumn(f"{label:>6}"), BarColumn(), TransferSpeedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        for path in files:
            h = xxhash.xxh3_64()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(memoryview(buf)[:n])
                    progress.advance(task, n)
            digests[str(path.relative_to(root))] = h.hexdigest()
    return total, time.perf_counter() - start, digests


def ufs_reads(cache_dir: Path) -> float:
    address = (cache_dir / "worker.addr").read_text().strip()
    secret = (cache_dir / "worker.secret").read_text().strip()  # the embedded worker's own
    text = httpx.get(f"http://{address}/metrics", headers={"Authorization": f"Bearer {secret}"}, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dorafs_worker_ufs_requests_total" and sample.labels.get("op") == "read":
                return sample.value
    return 0.0


def mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def mount(uri: str, mnt: Path, cache_dir: Path) -> None:
    cmd = ["dorafs", "mount", uri, str(mnt), "--cache-dir", str(cache_dir)]
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"demo: {result.stderr.strip()}")
    console.print(f"[dim]{result.stdout.strip()}[/dim]")


def unmount(mnt: Path, cache_dir: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    deadline = time.monotonic() + 20
    while (mounted(mnt) or (cache_dir / "worker.addr").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", nargs="?", help="UFS URI to mount (default: a generated dataset in a local S3 server)")
    p.add_argument("--shards", type=int, default=6, help="large objects in the generated dataset")
    p.add_argument("--shard-size", type=int, default=64, help="MiB per large object")
    p.add_argument("--samples", type=int, default=400, help="128 KiB objects in the generated dataset")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dorafs-demo-"))
    mnt, cache_dir = work / "mnt", work / "cache"
    mnt.mkdir()
    s3 = None
    try:
        uri, expected = args.uri, None
        if uri is None:
            s3, env = start_s3(work)
            os.environ.update(env)
            expected = make_dataset("demo", "dataset", args.shards, args.shard_size << 20, args.samples)
            uri = "s3://demo/dataset"
            console.print(f"dataset: {args.shards} x {args.shard_size} MiB + {args.samples} x 128 KiB objects "
                          f"in a local S3 server ({env['AWS_ENDPOINT_URL']})")
        rows = []
        mount(uri, mnt, cache_dir)
        before = ufs_reads(cache_dir)
        total, cold, digests = read_all(mnt, "cold")
        rows.append(("cold: UFS → worker → mount", total, cold, ufs_reads(cache_dir) - before))
        unmount(mnt, cache_dir)

        mount(uri, mnt, cache_dir)  # a fresh mount: the kernel's page cache of the old one is gone
        before = ufs_reads(cache_dir)
        _, warm, warm_digests = read_all(mnt, "warm")
        rows.append(("warm: worker page cache", total, warm, ufs_reads(cache_dir) - before))
        before = ufs_reads(cache_dir)
        _, hot, hot_digests = read_all(mnt, "hot")
        rows.append(("hot: kernel page cache", total, hot, ufs_reads(cache_dir) - before))
        unmount(mnt, cache_dir)

        table = Table(title=f"dorafs: reading {len(digests)} files, {total / 2**20:.0f} MiB, from {uri}")
        for column in ("pass", "MiB/s", "seconds", "UFS reads"):
            table.add_column(column, justify="right" if column != "pass" else "left")
        for label, size, seconds, reads in rows:
            table.add_row(label, f"{size / 2**20 / seconds:,.0f}", f"{seconds:.2f}", f"{reads:.0f}")
        console.print(table)
        same = digests == warm_digests == hot_digests and (expected is None or digests == expected)
        source = " and with the objects as uploaded" if expected is not None else ""
        console.print(f"every byte identical across the three passes{source}" if same
                      else "[red]MISMATCH: the mount returned different bytes[/red]")
        if not same:
            sys.exit(1)
    finally:
        if mounted(mnt):
            unmount(mnt, cache_dir)
        if s3 is not None:
            s3.terminate()
            s3.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
