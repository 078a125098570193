"""How the worker's metadata store scales: lookup latency, memory and disk per entry.

    python3 bench/metastore.py                 # 1M and 10M entries (about 10 minutes)
    python3 bench/metastore.py --sizes 1e5,1e6 # quicker
    python3 bench/metastore.py --diskcache     # also diskcache at the smallest size, for comparison
                                               # (needs: .venv/bin/pip install -e '.[bench-compare]')

For each size the store (`worker.metastore.MetaStore`, the code the worker runs) is filled
with that many statuses under realistic S3 URIs, in directories of 1,000 files. Then a
fresh store instance is opened on the file (memory level empty, as after a restart) and
random statuses are looked up through the same async path the worker uses for a memory
miss (`disk_status`, one SQLite query in the store's thread), then again from memory;
and pages of 1,000 entries are read from a 100,000-entry listing. 50M is extrapolated
from the measured bytes per entry and the latency curve. Results are printed as a table
and written to bench/results/metastore-<time>.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dorafs.ufs import FileStatus  # noqa: E402
from worker.metastore import FILE, MetaStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PER_DIR = 1000
LOOKUPS = 20_000
console = Console(width=150)


def uri_of(i: int) -> str:
    return f"s3://datasets-prod/imagenet/train/shard-{i // PER_DIR:07d}/img-{i:010d}.jpeg"


def fill(path: Path, n: int, progress: Progress) -> float:
    """Bulk-load n statuses (and one 100k-entry listing) straight through the store's schema."""
    store = MetaStore(path, 1000)
    store.load()
    db = store._db
    task = progress.add_task(f"fill {n:,}", total=n)
    start = time.perf_counter()
    batch = 100_000
    fetched = time.time()
    for lo in range(0, n, batch):
        rows = [(uri_of(i), fetched, FILE, 110_000 + i % 1000, 1.7e9, f'"{i:032x}"')
                for i in range(lo, min(n, lo + batch))]
        with db:
            db.executemany("INSERT INTO status VALUES (?, ?, ?, ?, ?, ?)", rows)
        progress.update(task, advance=len(rows))
    listing_dir = "s3://datasets-prod/imagenet/val"
    rows = [(listing_dir, 1, f"img-{i:010d}.jpeg", FILE, 110_000, 1.7e9, f'"{i:032x}"') for i in range(100_000)]
    with db:
        db.executemany("INSERT INTO entry VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT INTO listing VALUES (?, 1, ?, 100000)", (listing_dir, fetched))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    progress.remove_task(task)
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(path: Path, n: int) -> dict:
    store = MetaStore(path, 100_000)
    await trio.to_thread.run_sync(store.open)
    rng = random.Random(n)
    keys = [uri_of(rng.randrange(n)) for _ in range(LOOKUPS)]
    disk, memory = [], []
    for key in keys:
        t = time.perf_counter()
        cached = store.memory_status(key) or await store.disk_status(key)
        disk.append(time.perf_counter() - t)
        assert cached is not None and cached.status is not None
    for key in keys:
        t = time.perf_counter()
        cached = store.memory_status(key)
        memory.append(time.perf_counter() - t)
        assert cached is not None
    listing, _ = await store.listing("s3://datasets-prod/imagenet/val")
    pages, after = [], ""
    for _ in range(100):
        t = time.perf_counter()
        entries = await store.batch(listing, after, 1000)
        pages.append(time.perf_counter() - t)
        after = entries[-1].name
    store.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {
        "entries": n,
        "disk_p50_us": percentile(disk, 0.5) * 1e6, "disk_p99_us": percentile(disk, 0.99) * 1e6,
        "memory_p50_us": percentile(memory, 0.5) * 1e6, "memory_p99_us": percentile(memory, 0.99) * 1e6,
        "page1000_p50_ms": statistics.median(pages) * 1e3,
        "disk_bytes": size, "bytes_per_entry": size / (n + 100_000),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def diskcache_figures(workdir: Path, n: int, progress: Progress) -> dict:
    """The same statuses in diskcache (pickled FileStatus values), for comparison."""
    import diskcache

    cache = diskcache.Cache(str(workdir / "diskcache"), size_limit=1 << 40, eviction_policy="none")
    task = progress.add_task(f"diskcache fill {n:,}", total=n)
    for lo in range(0, n, 10_000):
        with cache.transact():
            for i in range(lo, min(n, lo + 10_000)):
                cache.set(uri_of(i), (time.time(), FileStatus(uri_of(i).rpartition("/")[2], False, 110_000, 1.7e9,
                                                             f'"{i:032x}"')))
        progress.update(task, advance=min(10_000, n - lo))
    progress.remove_task(task)
    cache.close()
    cache = diskcache.Cache(str(workdir / "diskcache"))
    rng = random.Random(n)
    times = []
    for _ in range(LOOKUPS):
        key = uri_of(rng.randrange(n))
        t = time.perf_counter()
        assert cache.get(key) is not None
        times.append(time.perf_counter() - t)
    cache.close()
    size = sum(p.stat().st_size for p in (workdir / "diskcache").rglob("*") if p.is_file())
    return {"entries": n, "disk_p50_us": percentile(times, 0.5) * 1e6, "disk_p99_us": percentile(times, 0.99) * 1e6,
            "disk_bytes": size, "bytes_per_entry": size / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e6,1e7", help="comma-separated entry counts (default 1e6,1e7)")
    p.add_argument("--diskcache", action="store_true", help="also measure diskcache at the smallest size")
    p.add_argument("--dir", help="work directory (default: a temp dir on the same disk as /var/tmp)")
    args = p.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.diskcache and importlib.util.find_spec("diskcache") is None:
        p.error("--diskcache needs the diskcache package: .venv/bin/pip install -e '.[bench-compare]'")
    rows, other = [], None
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp", prefix="dorafs-metastore-") as tmp, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"),
                     TimeRemainingColumn(), console=console) as progress:
        for n in sizes:
            path = Path(tmp) / f"{n}" / "metadata.db"
            seconds = fill(path, n, progress)
            row = trio.run(measure, path, n)
            row["fill_s"] = seconds
            rows.append(row)
            progress.console.print(f"{n:,} entries: disk lookup p50 {row['disk_p50_us']:.0f} µs, "
                                   f"p99 {row['disk_p99_us']:.0f} µs, {row['bytes_per_entry']:.0f} B/entry")
            for f in path.parent.glob("*"):
                f.unlink()
        if args.diskcache:
            other = diskcache_figures(Path(tmp), sizes[0], progress)

    big = rows[-1]
    growth = big["disk_p99_us"] / rows[0]["disk_p99_us"] if len(rows) > 1 else 1.0
    table = Table(title="worker metadata store (SQLite, WITHOUT ROWID) — lookups after a restart (memory level cold)")
    for col in ("entries", "disk p50", "disk p99", "memory p50", "memory p99", "1,000-entry page", "bytes/entry",
                "disk", "process RSS"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['entries']:,}", f"{r['disk_p50_us']:.0f} µs", f"{r['disk_p99_us']:.0f} µs",
                      f"{r['memory_p50_us']:.1f} µs", f"{r['memory_p99_us']:.1f} µs", f"{r['page1000_p50_ms']:.1f} ms",
                      f"{r['bytes_per_entry']:.0f}", f"{r['disk_bytes'] / 2**30:.2f} GiB", f"{r['max_rss_mib']:.0f} MiB")
    projected = {"entries": 50_000_000, "disk_bytes": big["bytes_per_entry"] * 50e6,
                 "disk_p99_us_estimate": big["disk_p99_us"] * (1 + max(0.0, growth - 1) * 0.7)}
    table.add_row("50,000,000 (projected)", "", f"~{projected['disk_p99_us_estimate']:.0f} µs", "", "", "",
                  f"{big['bytes_per_entry']:.0f}", f"{projected['disk_bytes'] / 2**30:.1f} GiB", "")
    console.print(table)
    if len(rows) > 1:
        console.print(f"p99 growth from {rows[0]['entries']:,} to {big['entries']:,}: {growth:.2f}× (target ≤ 2×)")
    if other:
        console.print(f"diskcache at {other['entries']:,}: p50 {other['disk_p50_us']:.0f} µs, p99 "
                      f"{other['disk_p99_us']:.0f} µs, {other['bytes_per_entry']:.0f} B/entry")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows, "projected_50m": projected, "diskcache": other, "cpus": os.cpu_count(),
           "loadavg": os.getloadavg(), "command": " ".join(sys.argv)}
    (RESULTS / f"metastore-{stamp}.json").write_text(json.dumps(out, indent=2))
    with open(RESULTS / f"metastore-{stamp}.md", "w") as f:
        Console(file=f, width=140).print(table)
    console.print(f"results: bench/results/metastore-{stamp}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
