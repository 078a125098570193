"""What a fresh receive buffer costs to fill, in small pages and in transparent huge pages.

    python3 bench/hugebuffers.py [--mib 16] [--repeat 10]

A worker's long GET receives into a buffer of 16 MiB (dorafs/ufs/buffers.py); a fresh
one is faulted in as the bytes arrive. This maps a fresh private anonymous buffer,
fills it a MiB at a time (as `recv_into` does), and unmaps it, `--repeat` times, with
and without MADV_HUGEPAGE, alternately: CPU milliseconds and minor page faults per
buffer, the median. Where THP is `never`, both are the same.
"""

from __future__ import annotations

import argparse
import mmap
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dorafs.ufs.buffers import _advise_huge  # noqa: E402

MiB = 1 << 20


def fill(size: int, huge: bool) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        _advise_huge(buf)  # what the worker's BufferPool does to a fresh buffer
    piece = b"\xa5" * MiB
    view = memoryview(buf)
    for at in range(0, size, MiB):
        view[at:at + MiB] = piece
    view.release()
    buf.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu * 1e3, after.ru_minflt - before.ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            print(f"transparent huge pages: {f.read().strip()}")
    except OSError:
        print("transparent huge pages: not in this kernel")
    runs: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for _ in range(args.repeat):
        for huge in (False, True):
            runs[huge].append(fill(args.mib * MiB, huge))
    for huge, got in runs.items():
        print(f"{'MADV_HUGEPAGE' if huge else 'small pages  '}: {statistics.median(c for c, _ in got):5.1f} ms of CPU, "
              f"{statistics.median(f for _, f in got):6.0f} faults per fresh {args.mib} MiB buffer "
              f"(median of {args.repeat})")


if __name__ == "__main__":
    main()
