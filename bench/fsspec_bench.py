"""The fsspec client (`dorafs://`, no mount) beside a dorafs mount, on the same worker
setup over the same s3rver bucket: random 4 KiB reads and a PyTorch DataLoader.

    . .venv/bin/activate
    python3 bench/fsspec_bench.py                  # 2 rounds, 8 s per random-read run
    python3 bench/fsspec_bench.py --rounds 3 --seconds 10 --s3 moto

Each target gets, per round, a fresh `dorafs-worker` (empty cache) and:

    dataloader  DataLoader(num_workers=2, batch 32, shuffled) over the small files, 2 epochs:
                epoch 1 cold (the worker fills from the store), epoch 2 warm
    rand4k      4 KiB reads at random offsets of the large object for --seconds: cold with
                4 threads (the worker's cache empty), then warm with 1 and 4 threads
                (the object read once whole through the target first)

The mount is `dorafs mount s3://bench/fsspec MNT --workers ADDR` with its defaults
(`mount`), and the same with `-o direct_io` (`mount-direct`: every read reaches dorafs,
none is answered by the kernel's page cache). Each run on a mount starts on a fresh one
(the kernel's page cache of the last one is gone with it), so every target starts with
only the worker's cache (and, on the same machine, its page files for short-circuit
reads); within a run the plain mount keeps what the kernel cached. The fsspec client is
`fsspec.filesystem("dorafs", workers=[ADDR])` with its defaults, in a fresh process per
run. Every probe runs in its own process and reports what it measured inside it; the
order of the targets alternates between rounds. Figures: a table, and JSON in
bench/results/fsspec-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1 << 20
PREFIX = "fsspec"
BUCKET = "bench"
LARGE = 256 * MiB
SMALL_FILES, SMALL_SIZE = 600, 128 * 1024
PY = sys.executable


# -- probes: run in their own process, print one JSON line ----------------------------------

def _open_target(args):
    if args.target == "mount":
        return None
    import fsspec

    return fsspec.filesystem("dorafs", workers=[args.worker])


def probe_rand4k(args) -> dict:
    fs = _open_target(args)
    if fs is None:
        fd = os.open(args.path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        read = lambda off: os.pread(fd, 4096, off)  # noqa: E731
    else:
        size = fs.info(args.path)["size"]
        local = threading.local()

        def read(off):
            f = getattr(local, "f", None)
            if f is None:
                f = local.f = fs.open(args.path, block_size=4096)
            f.seek(off)
            return f.read(4096)
    counts = [0] * args.threads
    stop = time.perf_counter() + args.seconds

    def job(i):
        rng = random.Random(i)
        n = 0
        while time.perf_counter() < stop:
            off = rng.randrange(0, size // 4096) * 4096
            if len(read(off)) != 4096:
                raise AssertionError("short read")
            n += 1
        counts[i] = n

    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(job, range(args.threads)))
    seconds = time.perf_counter() - start
    out = {"iops": sum(counts) / seconds, "reads": sum(counts), "seconds": seconds}
    if fs is not None:
        out["client"] = {k: v for k, v in fs.statistics().items() if k != "by_worker"}
    return out


def probe_readall(args) -> dict:
    fs = _open_target(args)
    start = time.perf_counter()
    if fs is None:
        with open(args.path, "rb", buffering=0) as f:
            n = sum(len(c) for c in iter(lambda: f.read(MiB), b""))
    else:
        with fs.open(args.path, block_size=MiB) as f:
            n = sum(len(c) for c in iter(lambda: f.read(MiB), b""))
    return {"bytes": n, "seconds": time.perf_counter() - start}


class _Files:
    def __init__(self, fs, paths):
        self.fs, self.paths = fs, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch

        if self.fs is None:
            with open(self.paths[i], "rb", buffering=0) as f:
                data = f.read()
        else:
            data = self.fs.cat_file(self.paths[i])
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def probe_dataloader(args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    fs = _open_target(args)
    if fs is None:
        paths = sorted(os.path.join(args.path, n) for n in os.listdir(args.path))
    else:
        paths = sorted(fs.find(args.path))
    loader = DataLoader(_Files(fs, paths), batch_size=32, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(1), collate_fn=lambda b: sum(len(t) for t in b))
    epochs = []
    for _ in range(2):
        start = time.perf_counter()
        total = sum(loader)
        epochs.append({"seconds": time.perf_counter() - start, "samples": len(paths), "bytes": total})
    return {"epochs": epochs}


def run_probe(name: str, target: str, path: str, worker: str, **extra) -> dict:
    argv = [PY, __file__, "probe", name, "--target", target, "--path", path, "--worker", worker]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(f"probe {name} {target} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------

def upload(s3) -> None:
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:  # already there
        if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
            raise
    have = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=PREFIX + "/") for o in page.get("Contents", [])}
    want = {f"{PREFIX}/large/big.bin": LARGE}
    want.update({f"{PREFIX}/small/{i:05d}.bin": SMALL_SIZE for i in range(SMALL_FILES)})
    missing = [(k, n) for k, n in want.items() if have.get(k) != n]
    if not missing:
        return
    print(f"uploading {len(missing)} objects", flush=True)
    from boto3.s3.transfer import TransferConfig

    def put(item):
        key, size = item
        data = os.urandom(size)
        if size > 64 * MiB:
            import io
            s3.upload_fileobj(io.BytesIO(data), BUCKET, key,
                              Config=TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4))
        else:
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, missing))


def start_worker(root: Path, env: dict):
    from procs import Tracked, wait_for

    port_file = root / "worker.addr"
    worker = Tracked("dorafs-worker", [PY, "-m", "worker.main", "--listen", "127.0.0.1:0", "--cache-dir",
                                       root / "cache", "--port-file", port_file], root / "worker.log", env=env)

    def ready():
        if not worker.alive():
            raise RuntimeError(f"dorafs-worker exited:\n{worker.log_tail()}")
        return port_file.exists() and port_file.read_text().strip()
    return worker, wait_for(ready, what="dorafs-worker")


class Mount:
    def __init__(self, root: Path, worker: str, env: dict, n: int, options: str = ""):
        from procs import REGISTRY, Tracked, is_mounted, wait_for

        self.path = root / f"mnt{n}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.proc = Tracked("dorafs-mount", [PY, "-m", "dorafs.cli.main", "mount", f"s3://{BUCKET}/{PREFIX}",
                                             self.path, "--foreground", "--workers", worker]
                            + (["-o", options] if options else []),
                            root / "mount.log", env=env)
        REGISTRY.mountpoints.append(self.path.resolve())

        def ready():
            if not self.proc.alive():
                raise RuntimeError(f"mount exited:\n{self.proc.log_tail()}")
            return is_mounted(self.path)
        wait_for(ready, timeout=60, what="the dorafs mount")

    def close(self):
        from procs import REGISTRY, unmount

        unmount(self.path)
        if not self.proc.wait_exit(20):
            self.proc.stop()
        REGISTRY.discard(self.proc)
        if self.path.resolve() in REGISTRY.mountpoints:
            REGISTRY.mountpoints.remove(self.path.resolve())


def measure(target: str, root: Path, env: dict, seconds: float) -> dict:
    """One target on a fresh worker: the DataLoader, then random 4 KiB reads cold and warm."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    worker, address = start_worker(root, env)
    mounts = []
    kind = "fsspec" if target == "fsspec" else "mount"
    options = "direct_io" if target == "mount-direct" else ""

    def fresh_mount():  # a new mount: the kernel's page cache of the last one is gone
        while mounts:
            mounts.pop().close()
        if kind == "mount":
            mounts.append(Mount(root, address, env, len(mounts) + fresh_mount.n, options))
            fresh_mount.n += 1
    fresh_mount.n = 1

    def where(rel):
        return str(mounts[-1].path / rel) if kind == "mount" else f"{BUCKET}/{PREFIX}/{rel}"

    try:
        fresh_mount()
        out = {"dataloader": run_probe("dataloader", kind, where("small"), address, workers=2)}
        fresh_mount()
        out["rand4k-4-cold"] = run_probe("rand4k", kind, where("large/big.bin"), address, threads=4,
                                         seconds=seconds)
        out["prefill"] = run_probe("readall", kind, where("large/big.bin"), address)
        for threads in (1, 4):
            fresh_mount()
            out[f"rand4k-{threads}-warm"] = run_probe("rand4k", kind, where("large/big.bin"), address,
                                                      threads=threads, seconds=seconds)
        return out
    finally:
        for m in mounts:
            m.close()
        worker.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    pr = sub.add_parser("probe")
    pr.add_argument("name", choices=["rand4k", "readall", "dataloader"])
    pr.add_argument("--target", choices=["mount", "fsspec"], required=True)  # mount: a path in any mount
    pr.add_argument("--path", required=True)
    pr.add_argument("--worker", required=True)
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--seconds", type=float, default=8)
    pr.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="per warm random-read run (cold: half)")
    p.add_argument("--s3", choices=["s3rver", "moto"], default="s3rver")
    args = p.parse_args()
    if args.cmd == "probe":
        fn = {"rand4k": probe_rand4k, "readall": probe_readall, "dataloader": probe_dataloader}[args.name]
        print(json.dumps(fn(args)))
        return

    from procs import REGISTRY, WORK, clean_stale
    from servers import SERVERS

    for line in clean_stale():
        print(line)
    work = WORK / "fsspec"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"mount": [], "mount-direct": [], "fsspec": []}
    try:
        server = SERVERS[args.s3](work)
        env = dict(os.environ, **server.env)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        os.environ.update(server.env)
        upload(server.client())
        for r in range(args.rounds):
            order = list(results) if r % 2 == 0 else list(reversed(results))
            for target in order:
                print(f"round {r + 1}: {target}", flush=True)
                results[target].append(measure(target, work / target, env, args.seconds))
    finally:
        REGISTRY.teardown()
    report(results, args)


def report(results: dict, args) -> None:
    rows = []

    def med(values):
        return statistics.median(values) if values else float("nan")

    for name, label, unit in [("dataloader-1", "DataLoader epoch 1 (cold), 2 workers", "samples/s"),
                              ("dataloader-2", "DataLoader epoch 2 (warm), 2 workers", "samples/s"),
                              ("rand4k-4-cold", "random 4 KiB, 4 threads, cold", "IOPS"),
                              ("rand4k-1-warm", "random 4 KiB, 1 thread, warm", "IOPS"),
                              ("rand4k-4-warm", "random 4 KiB, 4 threads, warm", "IOPS")]:
        figures = {}
        for target, runs in results.items():
            values = []
            for run in runs:
                if name.startswith("dataloader"):
                    epoch = run["dataloader"]["epochs"][int(name[-1]) - 1]
                    values.append(epoch["samples"] / epoch["seconds"])
                else:
                    values.append(run[name]["iops"])
            figures[target] = values
        rows.append((label, unit, figures))
    fmt = lambda vs: ", ".join(f"{v:,.0f}" for v in vs)  # noqa: E731
    print(f"\n| {'measure':44} | mount | mount, direct_io | fsspec | fsspec / mount | fsspec / direct_io |")
    print("|---|---|---|---|---|---|")
    for label, unit, figures in rows:
        m, d, f = (med(figures[t]) for t in ("mount", "mount-direct", "fsspec"))
        print(f"| {label + ' (' + unit + ')':44} | {fmt(figures['mount'])} | {fmt(figures['mount-direct'])} | "
              f"{fmt(figures['fsspec'])} | {f / m:.2f}x | {f / d:.2f}x |")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"fsspec-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({"argv": sys.argv, "rounds": args.rounds, "seconds": args.seconds,
                                "s3": args.s3, "results": results}, indent=1))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
