"""In-process tests of the UFS receive buffers (dorafs/ufs/buffers.py)."""

from __future__ import annotations

import ctypes
import mmap
import resource
import socket

import pytest

from dorafs.ufs.buffers import BufferPool

MIB = 1 << 20


def test_a_buffer_comes_back_only_when_nothing_refers_to_it():
    pool = BufferPool(keep=4, least=MIB)
    first = pool.take(2 * MIB)
    first[:5] = b"first"
    view = memoryview(first)[:5]  # a page still being written or sent from it
    del first
    second = pool.take(2 * MIB)
    assert second is not view.obj and pool.reused == 0
    view.release()
    del view
    third = pool.take(2 * MIB)  # the first one, free now
    assert pool.reused == 1 and third[:5] == b"first" and len(third) == 2 * MIB
    assert third is not second


def test_only_the_same_size_is_reused_and_what_is_kept_is_bounded():
    pool = BufferPool(keep=2, max_bytes=5 * MIB, least=MIB)
    one = pool.take(2 * MIB)
    del one
    other = pool.take(3 * MIB)  # a free buffer of another size is not handed out
    assert pool.reused == 0 and len(other) == 4 * MIB  # the power of two at or above it
    del other
    assert len(pool.take(4 * MIB)) == 4 * MIB and pool.reused == 1  # any length of that size
    small = pool.take(MIB // 2)  # below the pooled size: a plain bytearray
    assert len(small) == MIB // 2 and pool.made == 2
    held = [pool.take(4 * MIB) for _ in range(3)]  # beyond keep and max_bytes: not kept
    del held
    assert sum(len(b) for b in pool._lent) <= 5 * MIB and len(pool._lent) <= 2


def test_a_new_buffer_the_pool_keeps_is_not_touched_until_bytes_arrive():
    """Taking one costs no page of it (the worker takes them on its event loop: a zeroed
    bytearray of 16 MiB held the interpreter for about 12 ms); the bytes come in through
    the buffer protocol, as a socket's `recv_into` delivers them."""
    pool = BufferPool(keep=2, max_bytes=32 * MIB, least=MIB)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = pool.take(16 * MIB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64  # 4,096 pages if zeroed
    assert len(buffer) == 16 * MIB and pool.made == 1
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"run bytes")
        got = right.recv_into(memoryview(buffer)[5 * MIB:], 9)
    assert got == 9 and buffer[5 * MIB:5 * MIB + 9] == b"run bytes"
    del buffer
    held = [pool.take(16 * MIB) for _ in range(2)]  # the first again, one more kept
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held.append(pool.take(16 * MIB))  # past what the pool keeps: still not touched
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 64
    assert pool.reused == 1 and pool.made == 3 and all(len(b) == 16 * MIB for b in held)
    assert sum(len(b) for b in pool._lent) == 32 * MIB


def test_free_buffers_of_other_sizes_make_room_for_the_size_asked_for():
    """A reader's first runs are short, the later ones long: the short ones' buffers,
    free, give their room to a long one (as many as it takes), which is then kept and
    reused; a busy one keeps its place."""
    pool = BufferPool(keep=3, max_bytes=5 * MIB, least=MIB)
    first = [pool.take(MIB) for _ in range(3)]
    del first
    long = pool.take(4 * MIB)  # two of the three free 1 MiB ones go
    assert sorted(len(b) for b in pool._lent) == [MIB, 4 * MIB]
    del long
    busy = pool.take(4 * MIB)
    assert pool.reused == 1 and pool.made == 4
    other = pool.take(4 * MIB)  # the kept one is busy, and the free 1 MiB one is not room enough
    assert len(other) == 4 * MIB and sorted(len(b) for b in pool._lent) == [MIB, 4 * MIB]
    del busy, other


def test_reads_of_different_lengths_share_the_power_of_two_above_them():
    """A Parquet reader's runs are 1 to 16 pages long: a run of 3 pages reuses the buffer
    a run of 4 left, and one of 5 takes the next size up."""
    pool = BufferPool(keep=4, max_bytes=64 * MIB, least=MIB)
    four = pool.take(4 * MIB)
    del four
    three = pool.take(3 * MIB + 5)
    assert len(three) == 4 * MIB and pool.reused == 1 and pool.made == 1
    five = pool.take(5 * MIB)
    assert len(five) == 8 * MIB and pool.made == 2


def test_runs_of_every_length_share_one_size_of_buffer():
    """A pool's buffers are all `least` bytes (the longest run of 1 MiB pages): a short
    run reuses the buffer a long one freed, and the other way round, instead of making
    a fresh one whose pages are faulted in again. Longer reads still get the power of
    two at or above them."""
    pool = BufferPool(keep=2)
    long = pool.take(16 * MIB)
    del long
    short = pool.take(2 * MIB)
    assert len(short) == 16 * MIB and (pool.reused, pool.made) == (1, 1)
    del short
    assert len(pool.take(9 * MIB)) == 16 * MIB and (pool.reused, pool.made) == (2, 1)
    assert len(pool.take(17 * MIB)) == 32 * MIB and pool.made == 2


def _vm_flags(buf) -> list[str]:
    """The VmFlags of the mapping that holds `buf` (/proc/self/smaps)."""
    anchor = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(anchor)
    del anchor
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError("the buffer's mapping is not in /proc/self/smaps")


def test_a_fresh_buffer_stays_in_small_pages():
    """A new pooled buffer is not advised into transparent huge pages (no `hg` in its
    VmFlags): on a machine that hands free memory back to its host, a fresh huge page
    costs its first toucher several times what small pages do (dorafs/ufs/buffers.py)."""
    pool = BufferPool(keep=2, least=4 * MIB)
    kept = pool.take(4 * MIB)
    beyond = [pool.take(4 * MIB) for _ in range(3)]  # past `keep`: plain mappings
    for buf in [kept, *beyond]:
        buf[0] = 1
        assert "hg" not in _vm_flags(buf)
