"""The process's allocator: freed memory kept for the next large buffers.

Why: the mount's page buffer (dorafs/client/buffer.py) and a worker's run buffers
(dorafs/ufs/buffers.py) take a new bytearray of one to 16 MiB for most runs of pages,
of as many sizes as runs have pages. By default glibc maps a block over 128 KiB afresh
and unmaps it when freed (its threshold rises only to the largest block freed so far),
and gives a freed heap top of over twice that back to the kernel: each new buffer is
then faulted in and zeroed 4 KiB at a time, which a profile of a cold Parquet read put
at a third of the mount's CPU and a sixth of its worker's (bench/README.md, "Positioned
reads on Parquet files, cold"). With the thresholds fixed high, freed buffers stay in
the heap, already faulted in, for the next ones.

Subtleties:
- The cost is memory held after a burst: up to `KEEP_FREED` bytes at the heap's top stay
  in the process (the page buffer itself is bounded by `buffer_size`).
- Process-wide: the mount and the worker call it at start (`dorafs mount`,
  `dorafs-worker`), never the fsspec client, which lives in a user's process.
"""

from __future__ import annotations

import ctypes

KEEP_FREED = 256 << 20  # freed memory at the heap's top kept for the next buffers
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit; above the largest run (16 pages of 1 MiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next buffers; False where this is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED))
