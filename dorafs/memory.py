"""The process's allocator: freed memory kept for the next large buffers.

Why: the mount's page buffer (dorafs/client/buffer.py) takes a new bytearray of one to
16 MiB for most runs of pages, of as many sizes as runs have pages, and a read across
pages of different runs one of its own. By default glibc maps a block over its mmap
threshold afresh and unmaps it when freed (the threshold rises only to the largest
block freed so far), and gives a freed heap top over twice that back to the kernel:
those buffers are then faulted in and zeroed 4 KiB at a time again. With the thresholds
fixed high, freed buffers stay in the heap, already faulted in, for the next ones: a
cold Parquet pass faulted in 46,000-55,000 pages of the mount instead of 72,000-80,000
(bench/README.md, "Positioned reads on Parquet files, cold").

Subtleties:
- The cost is memory held after a burst: up to `KEEP_FREED` bytes at the heap's top stay
  in the process (the page buffer itself is bounded by `buffer_size`).
- Process-wide: the mount and the worker call it at start, never the fsspec client,
  which lives in a user's process. The worker's run buffers beyond its pool
  (dorafs/ufs/buffers.py) are such buffers too: its page faults per cold Parquet pass
  fell from 32,000 to 26,000, and its CPU per GiB of a cold sequential read by about
  7% (bench/README.md, "Object files grown as their pages arrive").
- `python3 bench/allocations.py` measures the setting alone: about 0.37 CPU-s per GiB
  of 1-16 MiB buffers made and freed with glibc's defaults, 0.08 with it.
"""

from __future__ import annotations

import ctypes
import gc

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


GC_YOUNG = 20_000  # allocations between young collections (Python's default: 700)


def quiet_collector() -> None:
    """Keep the cyclic garbage collector off what lives as long as the daemon (the
    mount's, a worker).

    Each FUSE read, request and page fetched allocates short-lived objects (trio's
    tasks, scopes and outcomes, the HTTP layers', botocore's); with Python's defaults a
    young collection ran every 700 of them, and the older ones walked every object
    loaded at start (modules, boto3's models): about a tenth of the worker's CPU in a
    cold sequential read (perf, bench/README.md). What exists once the daemon is wired
    is moved out of the collector's sight (`gc.freeze`), and young collections run less
    often; cycles are still collected. Daemons only: never in a user's process (the
    fsspec client)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)
