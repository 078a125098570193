"""The mount's page buffer: blocks of pages read together, reused without wrong bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dorafs.client.buffer import Block, Piece, PageBuffer, view


def fill_run(buffer: PageBuffer, first: int, count: int, page: int) -> list[Piece]:
    """What a local run read does: take a block, write pages into it, buffer the pieces."""
    block = buffer.block(count * page)
    pieces = []
    for i in range(count):
        block.data[i * page:(i + 1) * page] = content(first + i, page)
        pieces.append(Piece(block, i * page, (i + 1) * page))
    for i, piece in enumerate(pieces):
        buffer.put(("f", first + i), piece)
    return pieces


def content(index: int, page: int) -> bytes:
    """A page's bytes: keys carry the object's version, so one key always has one content."""
    return bytes([(index * 7 + 1) % 251]) * page


def test_pieces_of_one_block_read_as_one_slice_and_go_stale_when_it_is_reused():
    buffer = PageBuffer(capacity=8 * 16)
    first = fill_run(buffer, 0, 4, 16)
    assert first[1].follows(first[0]) and first[2].follows(first[1]) and not first[0].follows(first[1])
    assert buffer.used == 4 * 16
    block = first[0].block
    for i in range(4, 12, 4):  # two more runs push the first block out whole
        fill_run(buffer, i, 4, 16)
    assert ("f", 0) not in buffer and block.held == 0
    reused = fill_run(buffer, 12, 4, 16)
    assert reused[0].block is block  # taken from the free list, not allocated
    assert view(first[0]) is None  # a reader holding the old piece sees it is stale
    assert bytes(view(reused[0])) == content(12, 16)
    assert not reused[0].follows(first[3])


def test_a_block_whose_pages_were_all_read_is_reused_before_the_buffer_is_full():
    """A sequential reader discards the pages it has read: the next run takes their
    block at once, though the buffer has room for many more."""
    buffer = PageBuffer(capacity=64 * 16)
    first = fill_run(buffer, 0, 4, 16)
    for i in range(3):
        buffer.discard(("f", i))
    assert buffer.used == 4 * 16 and ("f", 3) in buffer  # one piece left: the block stays whole
    buffer.discard(("f", 3))
    buffer.discard(("f", 3))  # twice: no effect
    assert buffer.used == 0 and len(buffer) == 0
    assert fill_run(buffer, 4, 4, 16)[0].block is first[0].block
    assert view(first[0]) is None


def test_a_small_run_does_not_take_a_big_free_block():
    buffer = PageBuffer(capacity=4 * 16)
    big = fill_run(buffer, 0, 4, 16)[0].block
    fill_run(buffer, 4, 4, 16)  # pushes the first block out: it is free
    assert big in buffer._free
    small = fill_run(buffer, 8, 1, 16)[0].block
    assert small is not big and len(small.data) == 16 and big in buffer._free
    assert fill_run(buffer, 9, 3, 16)[0].block is big  # within twice the size: reused


def test_a_block_counts_whole_while_any_of_its_pieces_is_buffered():
    buffer = PageBuffer(capacity=6 * 16)
    pieces = fill_run(buffer, 0, 4, 16)
    assert buffer.get(("f", 3)) is pieces[3]  # now the most recent
    buffer.put(("g", 0), b"x" * 16)
    buffer.put(("g", 1), b"y" * 16)
    buffer.put(("g", 2), b"z" * 16)  # over capacity: the block's older pieces go first
    assert buffer.used <= buffer.capacity
    assert pieces[0].block.held == 0 and ("f", 3) not in buffer  # all its pieces had to go
    assert bytes(buffer.get(("g", 2))) == b"z" * 16


operations = st.lists(st.one_of(
    st.tuples(st.just("run"), st.integers(0, 20), st.integers(1, 4)),
    st.tuples(st.just("bytes"), st.integers(0, 20), st.just(1)),
    st.tuples(st.just("get"), st.integers(0, 20), st.just(1)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(3, 12))
def test_every_buffered_page_reads_back_its_own_bytes_through_block_reuse(ops, capacity_pages):
    page = 8
    buffer = PageBuffer(capacity=capacity_pages * page)
    expected: dict[int, bytes] = {}
    held_outside: list[tuple[Piece, bytes]] = []  # pieces a waiting reader could still hold
    for op, index, count in ops:
        if op == "run":
            pieces = fill_run(buffer, index, count, page)
            for i, piece in enumerate(pieces):
                expected[index + i] = content(index + i, page)
                held_outside.append((piece, expected[index + i]))
        elif op == "bytes":
            expected[index] = content(index, page)
            buffer.put(("f", index), bytearray(expected[index]))
        else:
            data = buffer.get(("f", index))
            if data is not None:
                assert bytes(view(data)) == expected[index]
        blocks = {id(p.block): p.block for p in buffer._pages.values() if isinstance(p, Piece)}
        assert buffer.used == sum(len(b.data) for b in blocks.values()) + sum(
            len(p) for p in buffer._pages.values() if not isinstance(p, Piece))
        assert buffer.used <= buffer.capacity
        assert all(b.held > 0 for b in blocks.values())
        assert all(b.held == 0 for b in buffer._free)
        for (_, i), data in buffer._pages.items():
            assert bytes(view(data)) == expected[i]
        for piece, was in held_outside:  # a stale piece is refused, a fresh one is exact
            current = view(piece)
            assert current is None or bytes(current) == was


def test_a_big_free_block_serves_a_small_run_while_the_buffer_is_mostly_empty():
    buffer = PageBuffer(capacity=64 * 16)
    big = fill_run(buffer, 0, 8, 16)[0].block
    for i in range(8):
        buffer.discard(("f", i))  # read to their end: the block is free, the buffer empty
    assert big in buffer._free and buffer.used == 0
    small = fill_run(buffer, 8, 1, 16)[0].block
    assert small is big  # no new memory for it
    assert bytes(view(buffer.get(("f", 8)))) == content(8, 16)


def test_a_block_never_used_holds_no_memory_and_is_not_kept():
    buffer = PageBuffer(capacity=64 * 16)
    block = buffer.block(8 * 16)
    assert block._data is None  # a readahead run over HTTP takes one before it knows
    buffer.filled(block)
    assert block not in buffer._free
    used = fill_run(buffer, 0, 2, 16)[0].block
    assert len(used.data) == 2 * 16


def test_more_blocks_freed_at_once_than_a_run_are_all_reused():
    buffer = PageBuffer(capacity=64 * 16)
    blocks = [fill_run(buffer, i, 1, 16)[0].block for i in range(20)]  # a run located page by page
    for i in range(20):
        buffer.discard(("f", i))
    again = [fill_run(buffer, 100 + i, 1, 16)[0].block for i in range(20)]
    assert {id(b) for b in again} == {id(b) for b in blocks}
    assert buffer.new_blocks == 20


def mapped_page(index: int, page: int) -> Piece:
    """A page as the mount holds one a local worker's page file gave: a mapping of it."""
    import mmap

    mapping = mmap.mmap(-1, page)
    mapping[:] = content(index, page)
    block = Block.mapping(mapping)
    return Piece(block, 0, page)


def test_mapped_pages_are_bounded_apart_from_the_pages_in_memory():
    """Pages mapped from page files cost the mount no memory: pages in memory never push
    them out, nor they those; each kind goes least recently read first within its own
    bound."""
    page = 16
    buffer = PageBuffer(capacity=4 * page, mapped_capacity=6 * page)
    for i in range(6):
        buffer.put(("m", i), mapped_page(i, page))
    assert buffer.mapped == 6 * page and buffer.used == 0
    for i in range(8):  # twice the memory bound: only pages in memory go
        buffer.put(("b", i), bytearray(content(100 + i, page)))
    assert buffer.used == 4 * page and all(("m", i) in buffer for i in range(6))
    assert [("b", i) in buffer for i in range(8)] == [False] * 4 + [True] * 4
    assert buffer.get(("m", 0)) is not None  # now the most recent mapped page
    buffer.put(("m", 6), mapped_page(6, page))
    assert ("m", 1) not in buffer and ("m", 0) in buffer and buffer.mapped == 6 * page
    assert all(("b", i) in buffer for i in range(4, 8))
    buffer.discard(("m", 0))
    assert buffer.mapped == 5 * page and len(buffer) == 9
    assert bytes(view(buffer.get(("m", 6)))) == content(6, page)
    assert buffer.statistics()["mapped_bytes"] == 5 * page
