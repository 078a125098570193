"""Workloads that fio does not express, each run as its own process and timed inside it.

    python3 bench/workloads.py smallfiles --root DIR --names FILE --procs 4 --seed 1
    python3 bench/workloads.py stat       --root DIR --names FILE --seed 1 [--max-seconds S]
    python3 bench/workloads.py ttfb       PATH...
    python3 bench/workloads.py readall    PATH...
    python3 bench/workloads.py openfiles  PATH...           (every file open at once, one thread each)
    python3 bench/workloads.py dataloader --root DIR --names FILE --workers 4 --epochs 2

Each prints one JSON object on stdout. Timings exclude interpreter and torch start-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time

CHUNK = 1 << 20


def _read_file(path: str, buf: bytearray) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while n := os.readv(fd, [buf]):
            total += n
        return total
    finally:
        os.close(fd)


def _names(args) -> list[str]:
    with open(args.names) as f:
        return [line.strip() for line in f if line.strip()]


def _small_worker(paths, barrier, out):
    buf = bytearray(CHUNK)
    barrier.wait()
    total = 0
    for p in paths:
        total += _read_file(p, buf)
    out.put(total)


def smallfiles(args) -> dict:
    names = _names(args)
    random.Random(args.seed).shuffle(names)
    paths = [os.path.join(args.root, n) for n in names]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(args.procs + 1), ctx.Queue()
    procs = [ctx.Process(target=_small_worker, args=(paths[i::args.procs], barrier, out)) for i in range(args.procs)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    total = sum(out.get() for _ in procs)
    seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    return {"seconds": seconds, "files": len(paths), "bytes": total}


def stat_all(args) -> dict:
    names = _names(args)
    random.Random(args.seed).shuffle(names)
    start = time.perf_counter()
    deadline = start + args.max_seconds
    done = 0
    for n in names:
        os.stat(os.path.join(args.root, n))
        done += 1
        if time.perf_counter() > deadline:
            break
    return {"seconds": time.perf_counter() - start, "entries": done, "of": len(names)}


def ttfb(args) -> dict:
    """Open to first byte, per path, in order (each path touched for the first time)."""
    ms = []
    for p in args.paths:
        start = time.perf_counter()
        fd = os.open(p, os.O_RDONLY)
        data = os.read(fd, 1)
        ms.append((time.perf_counter() - start) * 1000)
        os.close(fd)
        assert len(data) == 1, p
    return {"ms": ms, "median_ms": statistics.median(ms)}


def readall(args) -> dict:
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    total = sum(_read_file(p, buf) for p in args.paths)
    return {"seconds": time.perf_counter() - start, "bytes": total}


def openfiles(args) -> dict:
    """Every path opened first, then all read at once, one thread per file, 256 KiB reads."""
    fds = [os.open(p, os.O_RDONLY) for p in args.paths]
    totals = [0] * len(fds)
    gate = threading.Barrier(len(fds) + 1)

    def reader(i):
        buf = bytearray(256 << 10)
        gate.wait()
        while n := os.readv(fds[i], [buf]):
            totals[i] += n

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(fds))]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for fd in fds:
        os.close(fd)
    return {"seconds": seconds, "bytes": sum(totals), "files": len(fds)}


def dataloader(args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(1)
    names = _names(args)

    class Files(Dataset):
        """One sample per file: its bytes as a uint8 tensor (decoding left out)."""

        def __init__(self, root, names):
            self.paths = [os.path.join(root, n) for n in names]

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with open(self.paths[i], "rb", buffering=0) as f:
                data = f.read()
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    loader = DataLoader(Files(args.root, names), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed))
    epochs = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        samples = total = 0
        for batch in loader:
            samples += batch.shape[0]
            total += batch.numel()
        epochs.append(time.perf_counter() - start)
        assert samples == len(names), (samples, len(names))
    return {"epochs": epochs, "samples": len(names), "bytes": total}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smallfiles")
    s.add_argument("--root", required=True)
    s.add_argument("--names", required=True)
    s.add_argument("--procs", type=int, default=4)
    s.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("stat")
    s.add_argument("--root", required=True)
    s.add_argument("--names", required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--max-seconds", type=float, default=1e9)
    for name in ("ttfb", "readall", "openfiles"):
        sub.add_parser(name).add_argument("paths", nargs="+")
    s = sub.add_parser("dataloader")
    s.add_argument("--root", required=True)
    s.add_argument("--names", required=True)
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    fn = {"smallfiles": smallfiles, "stat": stat_all, "ttfb": ttfb, "readall": readall,
          "openfiles": openfiles, "dataloader": dataloader}[args.cmd]
    json.dump(fn(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
