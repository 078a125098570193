"""The "native" system of bench/harness.py: the same bytes as files on the cache disk.

    python3 bench/native.py SRC MNT [--drop]

Bind-mounts SRC (a directory holding the dataset as plain files, on the disk the other
systems keep their caches on) read-only at MNT, so every workload reads the same paths as
through a mount, with no FUSE in between; with --drop the kernel's page cache of every
file under SRC is dropped first (POSIX_FADV_DONTNEED), so the reads come from the disk.
Exits once MNT is unmounted (bench/procs.py unmounts it with umount).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def drop(root: str) -> int:
    n = 0
    for base, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def main() -> None:
    src, mnt = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
    if "--drop" in sys.argv[3:]:
        print(f"dropped the page cache of {drop(src)} files", flush=True)
    subprocess.run(["mount", "--bind", "-o", "ro", src, mnt], check=True)
    while mounted(mnt):
        time.sleep(0.2)


if __name__ == "__main__":
    main()
