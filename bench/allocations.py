"""What a fresh buffer costs a daemon, with glibc's defaults and with dorafs's setting.

    python3 bench/allocations.py [--gib 16] [--rounds 2]

A worker's fill receives runs of 1-16 pages into buffers, and a mount reads pages into
blocks of such sizes; each is made, used and freed. This makes and frees bytearrays of
1 to 16 MiB (sizes in turn, six alive at a time, as runs in flight) until `--gib` GiB
were made, in a fresh interpreter for each setting, and prints the CPU seconds per GiB:
`glibc defaults` (each buffer over the mmap threshold is fresh pages, faulted in and
zeroed by the kernel, then zeroed again by Python) against `keep_freed_memory`
(dorafs/memory.py, what the worker and the mount call at start).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import os, sys
sys.path.insert(0, {repo!r})
if {tuned}:
    from dorafs.memory import keep_freed_memory
    keep_freed_memory()
target = {gib} << 30
alive, made, i = [], 0, 0
before = os.times()
while made < target:
    size = (i % 16 + 1) << 20
    alive.append(bytearray(size))
    made += size
    i += 1
    if len(alive) > 6:
        alive.pop(0)
after = os.times()
print((after.user - before.user + after.system - before.system) / (made / 2**30))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=16, help="GiB of buffers made per run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{'setting':<22} CPU-s per GiB of buffers made and freed (1-16 MiB each)")
    for _ in range(args.rounds):
        for name, tuned in (("glibc defaults", False), ("keep_freed_memory", True)):
            out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), tuned=tuned, gib=args.gib)],
                                 capture_output=True, text=True, check=True).stdout
            print(f"{name:<22} {float(out):.3f}", flush=True)


if __name__ == "__main__":
    main()
