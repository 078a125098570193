"""What a mount pays to map and check one page file a worker just wrote, per page.

    python3 bench/pagemap.py [--pages 256] [--repeat 5]

Writes `--pages` page files of 1 MiB under bench/.cache/work/pagemap (in the kernel's
page cache, as a run's pages are when the mount is told of them), then, per page, what
the mount does with each (`LocalPages.map_page_file` and the checksum, then unmapping
it), once asking the page cache with cachestat(2) and once with mincore over the
mapping (the way a kernel without cachestat is asked), alternately, `--repeat` times;
and each question alone. CPU microseconds per page, the best of the repeats.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import xxhash  # noqa: E402

from dorafs.client import local  # noqa: E402
from procs import WORK, own_cpu  # noqa: E402

MiB = 1 << 20


def map_and_check(path: str) -> None:
    fd, mapping, at = local.LocalPages.map_page_file(path, 0, MiB)
    try:
        xxhash.xxh3_64_hexdigest(memoryview(mapping)[at:at + MiB])
    finally:
        mapping.close()
        os.close(fd)


def per_page(paths: list[str], fn) -> float:
    began = own_cpu()
    for path in paths:
        fn(path)
    return (own_cpu() - began) / len(paths) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    root = WORK / "pagemap"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        data = os.urandom(MiB)
        paths = []
        for i in range(args.pages):
            path = root / f"page-{i}"
            path.write_bytes(data)
            paths.append(str(path))
        with open(paths[0], "rb") as f:
            if local.cached_in_range(f.fileno(), 0, MiB) is None:
                print("no cachestat in this kernel: the mount asks with mincore")
            best = {"cachestat": float("inf"), "mincore": float("inf")}
            alone = {"cachestat": float("inf"), "mincore": float("inf")}
            mapping = mmap.mmap(f.fileno(), MiB, access=mmap.ACCESS_COPY)
            for _ in range(args.repeat):
                for way in best:
                    local._cachestat_usable = way == "cachestat"
                    best[way] = min(best[way], per_page(paths, map_and_check))
                local._cachestat_usable = True
                alone["cachestat"] = min(alone["cachestat"], per_page(
                    paths, lambda _: local.cached_in_range(f.fileno(), 0, MiB)))
                alone["mincore"] = min(alone["mincore"], per_page(
                    paths, lambda _: local.page_cache_residency(mapping)))
            mapping.close()
        print(f"CPU microseconds per 1 MiB page file, best of {args.repeat} x {args.pages} pages:")
        for way in best:
            print(f"  map, ask with {way:9s} and check: {best[way]:6.1f}   (the question alone: {alone[way]:5.1f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
