"""Memory the machine has not touched lately costs several times more to touch.

    python3 bench/firsttouch.py                 # 3 rounds of 8 GiB, touched a GiB at a time
    python3 bench/firsttouch.py --gib 16 --pause 10

On a virtual machine whose host backs the guest's memory only when it is first touched,
and takes back what the guest reports free (virtio-balloon's free page reporting: free
blocks of 2 MiB and more, a few seconds after they were freed), a page the guest kernel
hands out costs its first toucher a fault in the host as well: here 1.6 CPU-s per GiB
against 0.4 for memory freed a moment ago (bench/README.md, "Memory the machine has not
touched"). A cold pass fills about a gigabyte of fresh page cache and buffers, so the
first system timed on a new machine, or after a pause, pays up to a second more than the
next one, which is handed the pages the first one freed. `prime` touches and frees
memory just before a timed pass, so that every system's pass starts from memory touched
a moment ago; the kernel hands out recently freed pages first.

Each round maps `--gib` GiB, faults it in a GiB at a time (MADV_POPULATE_WRITE, small
pages), prints each GiB's CPU seconds, unmaps it and waits `--pause` seconds.
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import own_cpu  # noqa: E402

GiB = 1 << 30
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def _touch(mapping: mmap.mmap, start: int, length: int) -> None:
    try:
        mapping.madvise(_POPULATE_WRITE, start, length)
    except OSError:  # a kernel without it: a write to each page
        for at in range(start, start + length, mmap.PAGESIZE):
            mapping[at] = 1


def touch_rounds(gib: int, rounds: int, pause: float) -> Iterator[list[float]]:
    """CPU seconds of each GiB faulted in, a list per round as each round ends."""
    for i in range(rounds):
        mapping = mmap.mmap(-1, gib * GiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            mapping.madvise(mmap.MADV_NOHUGEPAGE)
        costs = []
        for g in range(gib):
            began = own_cpu()
            _touch(mapping, g * GiB, GiB)
            costs.append(own_cpu() - began)
        mapping.close()
        yield costs
        if i < rounds - 1:
            time.sleep(pause)


def available() -> int:
    """MemAvailable of /proc/meminfo, in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prime(gib: float) -> float:
    """Touch `gib` GiB and free it at once (see the module's note); the seconds it took.
    At most a quarter of the memory available, so that no cache the pass reads from
    (s3rver's files in the page cache) is pushed out for it."""
    size = min(int(gib * GiB), available() // 4) // mmap.PAGESIZE * mmap.PAGESIZE
    if size <= 0:
        return 0.0
    began = time.perf_counter()
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _touch(mapping, 0, size)
    finally:
        mapping.close()
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    args = p.parse_args()
    print(f"CPU seconds to fault in each GiB of {args.gib}, {args.rounds} rounds, {args.pause} s apart:")
    for i, costs in enumerate(touch_rounds(args.gib, args.rounds, args.pause)):
        print(f"round {i}: " + " ".join(f"{c:.2f}" for c in costs), flush=True)


if __name__ == "__main__":
    main()
