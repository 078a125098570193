"""What a fresh receive buffer costs to fill, in small pages and in transparent huge pages.

    python3 bench/hugebuffers.py [--mib 16] [--repeat 10]

A worker's long GET receives into a buffer of 16 MiB (dorafs/ufs/buffers.py); a fresh
one is faulted in as the bytes arrive. This maps a fresh private anonymous buffer and
fills it a MiB at a time (as `recv_into` does), with and without MADV_HUGEPAGE,
alternately, `--repeat` times each, two ways:

- recycled: each buffer unmapped before the next is mapped, so the next one's pages are
  the ones just freed (what a worker that keeps its buffers never pays again);
- never used: every buffer kept mapped to the end, so each takes memory this process
  had not touched, as a fresh worker's first buffers do. On a virtual machine that gives
  its free memory back to the host (a balloon's free page reporting) that memory must
  be supplied again at the first touch; free 2 MiB blocks, what a huge page takes, are
  the ones given back.

Prints the CPU milliseconds and minor page faults per buffer (medians). Where THP is
`never`, both kinds of page are the same.
"""

from __future__ import annotations

import argparse
import mmap
import resource
import statistics

MiB = 1 << 20


def fill(size: int, huge: bool, kept: list) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without THP: small pages
    piece = b"\xa5" * MiB
    view = memoryview(buf)
    for at in range(0, size, MiB):
        view[at:at + MiB] = piece
    view.release()
    after = resource.getrusage(resource.RUSAGE_SELF)
    kept.append(buf)  # the caller decides when it is unmapped
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
    for way in ("never used", "recycled"):
        runs: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
        kept: list[mmap.mmap] = []
        for _ in range(args.repeat):
            for huge in (False, True):
                runs[huge].append(fill(args.mib * MiB, huge, kept))
                if way == "recycled":
                    kept.pop().close()
        for buf in kept:
            buf.close()
        for huge, got in runs.items():
            print(f"{way:<10}  {'MADV_HUGEPAGE' if huge else 'small pages  '}: "
                  f"{statistics.median(c for c, _ in got):6.1f} ms of CPU, "
                  f"{statistics.median(f for _, f in got):6.0f} faults per {args.mib} MiB buffer "
                  f"(median of {args.repeat})", flush=True)


if __name__ == "__main__":
    main()
