"""The worker's page store on its own: fill, seal, eviction and restart figures.

    python3 bench/pagestore.py [--pages N] [--page-size BYTES] [--repeat R] [--dir DIR]

In-process, no HTTP and no UFS: what `worker/pagestore.py` itself costs on this disk.
Each round, on an empty store directory:
- fill: N pages written as the worker writes a run's pages (`put_many` of up to 8 pages
  when the store has it, else one `put` per page): MiB/s and CPU seconds per GiB;
- restart (pages): a new store loading the directory (`load()`): seconds for N page files;
- seal: those pages made into one object file per 16 pages (objects of 16 MiB), as the
  worker does when the last page of a version lands: MiB/s and CPU-s per GiB;
- restart (sealed): the same load, of N/16 object files;
- evict: N new pages into a store whose capacity is N pages (each put evicts), twice:
  first the sealed objects go (16 pages at once), then the new page files one by one:
  evictions/s and CPU-ms per evicted page;
- grow: on an empty store, the same N pages written into their object files as they
  arrive (`grow`, as the worker does for a version a mount on this machine reads), whole
  at each object's last page with no seal: MiB/s and CPU-s per GiB, and the restart
  (`load()`) of those N/16 object files.

CPU is the process's (every thread's) CPU time, so a thread that writes counts too.
Compare two checkouts by running this file from each with its own PYTHONPATH: the
figures vary with the machine's load; alternate and repeat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dorafs.pages import object_id  # noqa: E402
from worker.pagestore import PageStore, checksum  # noqa: E402

RUN = 16  # pages per object (a worker's run)
BATCH = 8  # pages per put_many, as worker.service writes a run's pages


def measure(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def one_round(root: Path, pages: int, page_size: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = os.urandom(page_size)
    digest = checksum(data)
    objects = [object_id(f"s3://bench/object-{n}", "v1") for n in range(-(-pages // RUN))]
    keys = [(objects[i // RUN], i % RUN) for i in range(pages)]
    store = PageStore(root, pages * page_size * 2)  # room for the pages and a copy while sealing
    store.load()

    async def fill(store: PageStore, keys) -> None:
        if hasattr(store, "put_many"):
            for at in range(0, len(keys), BATCH):
                done = await store.put_many([(k, data, digest) for k in keys[at:at + BATCH]])
                assert all(e is not None for e in done)
        else:
            for k in keys:
                assert await store.put(k, data, digest) is not None

    async def seal() -> None:
        for n, oid in enumerate(objects):
            count = min(RUN, pages - n * RUN)
            assert await store.seal(oid, count * page_size, page_size) is not None

    out = {}
    gib = pages * page_size / (1 << 30)

    def rate(name: str, fn) -> None:
        _, wall, cpu = measure(fn)
        out[f"{name} MiB/s"], out[f"{name} CPU-s/GiB"] = pages * page_size / wall / (1 << 20), cpu / gib

    def restart(name: str) -> PageStore:
        again, wall, _ = measure(lambda: _loaded(root, pages * page_size * 2))
        assert len(again) == pages, (len(again), pages)
        out[f"restart s ({name})"] = wall
        return again

    rate("fill", lambda: trio.run(fill, store, keys))
    store.close()
    store = restart("pages")
    rate("seal", lambda: trio.run(seal))
    store.close()
    restart("sealed").close()

    small = PageStore(root, pages * page_size)  # as many pages as are there: each new one evicts
    small.load()
    for name in ("other", "third"):  # first the sealed objects go (whole), then page files one by one
        fresh = [(object_id(f"s3://bench/{name}-{i // RUN}", "v1"), i % RUN) for i in range(pages)]
        before = small.evictions
        _, wall, cpu = measure(lambda: trio.run(fill, small, fresh))
        evicted = small.evictions - before
        what = "sealed" if name == "other" else "pages"
        out[f"evictions/s ({what})"] = evicted / wall
        out[f"CPU-ms/eviction ({what})"] = cpu * 1000 / max(1, evicted)
        assert small.used <= small.capacity
    small.close()

    shutil.rmtree(root)
    root.mkdir()
    grown = PageStore(root, pages * page_size * 2)
    grown.load()

    async def grow() -> None:
        for n, oid in enumerate(objects):
            assert grown.grow(oid, min(RUN, pages - n * RUN) * page_size, page_size)
        await fill(grown, keys)
        assert all(grown.whole(oid) is not None for oid in objects)

    rate("grow", lambda: trio.run(grow))
    grown.close()
    restart("grown").close()
    return out


def _loaded(root: Path, capacity: int) -> PageStore:
    store = PageStore(root, capacity)
    store.load()
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=512)
    p.add_argument("--page-size", type=int, default=1 << 20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "work" / "pagestore")
    args = p.parse_args()
    rounds = []
    try:
        for n in range(args.repeat):
            rounds.append(one_round(args.dir, args.pages, args.page_size))
            print(f"round {n + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()), flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"median of {len(rounds)} ({args.pages} pages of {args.page_size} bytes):")
    for k in rounds[0]:
        print(f"  {k:>16}: {statistics.median(r[k] for r in rounds):.3g}")


if __name__ == "__main__":
    main()
