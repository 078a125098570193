"""In-process tests of the UFS receive buffers (dorafs/ufs/buffers.py)."""

from __future__ import annotations

from dorafs.ufs.buffers import BufferPool

MIB = 1 << 20


def test_a_buffer_comes_back_only_when_nothing_refers_to_it():
    pool = BufferPool(keep=4)
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
    pool = BufferPool(keep=2, max_bytes=5 * MIB)
    one = pool.take(2 * MIB)
    del one
    other = pool.take(3 * MIB)  # a free buffer of another size is not handed out
    assert pool.reused == 0 and len(other) == 3 * MIB
    del other
    assert len(pool.take(3 * MIB)) == 3 * MIB and pool.reused == 1
    small = pool.take(MIB // 2)  # below the pooled size: a plain bytearray
    assert len(small) == MIB // 2 and pool.made == 2
    held = [pool.take(4 * MIB) for _ in range(3)]  # beyond keep and max_bytes: not kept
    del held
    assert sum(len(b) for b in pool._lent) <= 5 * MIB and len(pool._lent) <= 2
