"""What a Parquet reader pays per file and per column chunk on a mount over a full cache.

    python3 bench/parquetopens.py [--systems dorafs,s3fs] [--rounds 3] [--repeat 10] [--chunks 256]

The files of bench/parquet.py (written and uploaded as it does), read once whole through
a first mount of each system (its cache filled), then, on a second mount (a warm mount:
the kernel holds none of their pages through it), each file read once, and timed in one
process, `--rounds` times:

- `open` and `close` of each file (`--repeat` times over the 8 files), per file;
- `open`, a 64 KiB `pread` of its end (a footer) and `close`, per file;
- `pyarrow.parquet.ParquetFile` of each file (open, footer, metadata), per file;
- `--chunks` column-chunk-sized reads at random offsets of the open files, each
  `posix_fadvise(WILLNEED)` then `pread` of 512 KiB (what pyarrow does before and for a
  column chunk), each call's time apart.

One process and no other load: what each costs, not how a busy machine shares it
(bench/parquet.py times the whole workload).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parquet  # noqa: E402
from procs import REGISTRY, WORK, clean_stale  # noqa: E402

CHUNK = 512 << 10


def per_file(paths: list[str], repeat: int, one) -> float:
    """Microseconds per file of `one(path)`, over `repeat` passes of the files."""
    began = time.perf_counter()
    for _ in range(repeat):
        for path in paths:
            one(path)
    return (time.perf_counter() - began) / (repeat * len(paths)) * 1e6


def open_close(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY))


def open_footer_close(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 65536, os.fstat(fd).st_size - 65536)
    finally:
        os.close(fd)


def chunks(paths: list[str], count: int, seed: int) -> tuple[float, float]:
    """Mean microseconds of fadvise(WILLNEED) and of pread, 512 KiB at random offsets."""
    import pyarrow  # noqa: F401  (loaded as the workload has it)

    rng = random.Random(seed)
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    advise = read = 0.0
    try:
        for _ in range(count):
            fd = rng.choice(fds)
            at = rng.randrange(0, os.fstat(fd).st_size - CHUNK)
            began = time.perf_counter()
            os.posix_fadvise(fd, at, CHUNK, os.POSIX_FADV_WILLNEED)
            advised = time.perf_counter()
            os.pread(fd, CHUNK, at)
            advise += advised - began
            read += time.perf_counter() - advised
    finally:
        for fd in fds:
            os.close(fd)
    return advise / count * 1e6, read / count * 1e6


def measure(system, args) -> list[dict]:
    import pyarrow.parquet as pq

    session = system.session()
    with session.mount() as m:  # fills the system's cache
        for path in sorted((m.path / "data").glob("*.parquet")):
            with open(path, "rb") as f:
                while f.read(8 << 20):
                    pass
    rows = []
    with session.mount() as m:
        paths = sorted(str(p) for p in (m.path / "data").glob("*.parquet"))
        for path in paths:
            with open(path, "rb") as f:
                f.read()
        for r in range(args.rounds):
            row = {"open": per_file(paths, args.repeat, open_close),
                   "footer": per_file(paths, args.repeat, open_footer_close),
                   "parquetfile": per_file(paths, args.repeat, pq.ParquetFile)}
            row["fadvise"], row["pread"] = chunks(paths, args.chunks, r)
            rows.append(row)
            print(f"{system.name} round {r + 1}: " + ", ".join(f"{k} {v:.0f} us" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="dorafs,s3fs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10, help="passes over the files per figure")
    p.add_argument("--chunks", type=int, default=256, help="fadvise+pread pairs per round")
    args = p.parse_args()
    from servers import SERVERS
    from systems import SYSTEMS

    files = argparse.Namespace(files=8, row_groups=4, chunk_kib=512)
    for line in clean_stale():
        print(line)
    work = WORK / "parquetopens"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    local = parquet.write_files(files)
    results = {}
    try:
        server = SERVERS["s3rver"](work)
        os.environ.update(server.env)
        parquet.upload(server.client(), local)
        for name in args.systems.split(","):
            results[name] = measure(SYSTEMS[name](server, parquet.PREFIX, work), args)
    finally:
        REGISTRY.teardown()
    keys = ("open", "footer", "parquetfile", "fadvise", "pread")
    print("\nMicroseconds, median of the rounds (each round's in brackets):\n")
    print("| system | open+close | open+footer+close | ParquetFile | fadvise WILLNEED 512 KiB | pread 512 KiB |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        cells = [f"{statistics.median(r[k] for r in rows):.0f} ({', '.join(f'{r[k]:.0f}' for r in rows)})"
                 for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
