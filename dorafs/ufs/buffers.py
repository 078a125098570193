"""Receive buffers for long UFS reads, handed out again once nothing refers to them.

Why: a worker's fill receives a run of pages (up to 16 MiB) into one bytearray. A fresh
bytearray is zeroed by Python, so each of its pages is faulted in and cleared before a
byte arrives; a profile of a cold sequential read put about a third of the worker's
CPU on that one line (bench/README.md, "Worker CPU per GiB read cold"). A buffer
that was used before is already mapped.

Subtleties:
- A buffer is free when only the pool refers to it: CPython counts references, and
  every holder of its bytes holds one (a memoryview of it, a page being written from
  it, an answer being sent from it, a read's thread that was abandoned but may still
  write into it). So a buffer is never handed out while anything can still read or
  write it, and no caller has to give one back.
- Buffers are `least` bytes (16 MiB: the longest run of 1 MiB pages), or the power of
  two at or above a longer read's length: a read uses the start of one. Runs of every
  length (a Parquet reader's groups of 1-16 pages) then share one size and find a free
  buffer to reuse: with the sizes in powers of two (1, 2, 4, 8, 16 MiB), free buffers
  of the wrong size made a third of a cold Parquet pass's runs take a fresh one, each
  page of it faulted in again (bench/README.md, "Long GETs over a kept socket"). Only
  the pages a read touched are memory; once every kept buffer served a long run, the
  pool holds `max_bytes`, as it did before. At most `keep` of them and `max_bytes` in
  all are tracked (what a worker holds on to when idle); others are plain new
  mappings. Free buffers of other sizes make room for the size asked for.
- A reused buffer still holds its previous read's bytes past what the new read has
  delivered. Callers only ever look at the bytes a read delivered (`Progress.done`).
- A buffer the pool keeps is a private anonymous mapping (`mmap`; a shared one is backed
  by shmem, whose pages cost more to fault in), not a bytearray: Python zeroes
  a bytearray while it holds the interpreter lock, and `take` runs on the worker's event
  loop, so a fresh 16 MiB run buffer stopped every thread for about 12 ms (a fifth of the
  loop's samples in a cold pass: bench/README.md, "Receive buffers that nobody zeroes").
  The kernel hands out a mapping's pages zeroed as they are first written, by the
  receiving thread's `recv_into`, which has let go of the lock. A mapping has what the
  callers use of a bytearray: the buffer protocol, slices, `len`. One the pool does not
  keep (more runs in flight than it keeps) is a mapping too: its pages go back to the
  kernel when it is freed, and the next one is faulted in again, but by the receiving
  thread. As a bytearray from the memory glibc keeps (dorafs/memory.py) it was zeroed on
  the loop: 50 ms of a cold Parquet pass's 3 s with the interpreter held (py-spy,
  bench/README.md "Pages told in fours").
- Small pages, not transparent huge pages (no MADV_HUGEPAGE). A huge page is a 2 MiB
  block of free memory, and on a virtual machine that hands its free memory back to
  the host (a balloon's free page reporting, as on these Firecracker machines, which
  report free blocks of 8 MiB and more) such blocks are the ones given back: the first
  touch of each makes the host supply it again. A fresh worker's first buffers cost
  about 10 ms of CPU per MiB in huge pages there against 1-2 in small ones, up to half
  of the worker's CPU in a cold sequential pass (bench/README.md, "Receive buffers in
  small pages"). Memory used before and freed is cheaper in huge pages, but a kept
  buffer is faulted in only once either way.
"""

from __future__ import annotations

import mmap
import sys
import threading

MIN_SIZE = 1 << 20  # smaller buffers cost little to make: not pooled
MAX_BYTES = 128 << 20  # at most this much kept for reuse (a cold sequential read keeps 4-8 runs of 16 MiB alive)
LEAST = 16 << 20  # the size of every pooled buffer up to it: the longest run of 1 MiB pages (worker.service.MAX_RUN)


class BufferPool:
    def __init__(self, keep: int = 8, min_size: int = MIN_SIZE, max_bytes: int = MAX_BYTES, least: int = LEAST):
        self.keep = keep
        self.min_size = min_size
        self.least = least
        self.max_bytes = max_bytes
        self._lent: list[mmap.mmap] = []  # every buffer tracked, free or not
        self._lock = threading.Lock()
        self.reused = 0  # statistics (tests read them)
        self.made = 0

    def take(self, size: int) -> bytearray | mmap.mmap:
        """A writable buffer of at least `size` bytes (their content undefined) that
        nobody else refers to: exactly `size` below `min_size`, else `least` or the
        power of two at or above `size`: a mapping, kept for reuse within the pool's
        bounds."""
        if size < self.min_size:
            return bytearray(size)
        size = max(self.least, 1 << (size - 1).bit_length())
        with self._lock:
            spares = []  # free buffers of other sizes: room for this size if need be
            for i in range(len(self._lent)):
                buf = self._lent[i]
                if sys.getrefcount(buf) == _FREE:
                    if len(buf) == size:
                        self.reused += 1
                        return buf
                    spares.append(i)
            self.made += 1
            held = sum(len(b) for b in self._lent)
            room = held - sum(len(self._lent[i]) for i in spares)  # what only busy ones hold
            if len(self._lent) - len(spares) < self.keep and room + size <= self.max_bytes:
                while len(self._lent) >= self.keep or held + size > self.max_bytes:
                    held -= len(self._lent.pop(spares.pop()))  # the last first: the indices before it stand
            fresh = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if len(self._lent) < self.keep and held + size <= self.max_bytes:
                self._lent.append(fresh)
            return fresh


# References to a tracked buffer that nobody else holds, as `take` counts them: the
# pool's list, the loop's variable `buf` and getrefcount's own argument.
_FREE = 3
