"""The mount's in-process page buffer: a byte-bounded LRU of recently fetched pages.

One fetch serves the kernel requests that follow it within the page; readahead also
lands here. Keys carry the object's version, so a changed object never hits an old page.

Pages read from a local worker's files come in runs, read one after another into one
block of memory (`Block`), each page a `Piece` of it: a read crossing from one page into
the next of the same block is one slice, no copy. Blocks are reused once none of their
pieces is buffered any more. Fresh memory is costly here: the kernel faults it in and
zeroes it 4 KiB at a time, which on the machines measured cost more than the copy that
fills it (bench/README.md). A block's `generation` changes when it is reused, so a
piece held past that (by a reader that waited on another's fetch) is seen to be stale
and never read: `view` answers None for it. A view returned to the FUSE session is copied into
the kernel before the event loop runs anything else, so a later reuse never changes
bytes already answered. A block a remote run is still streaming into is `filling`: its
first pages may be read and dropped before the last arrive, and it is not reused until
the run ends. A block may also be a mapping of a local worker's page file
(`Block.mapping`, client/local.py): no memory of its own, never reused, unmapped once
nothing refers to it; such pages are bounded apart from those in memory (`MAPPED_SHARE`).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Hashable

# Idle blocks kept for reuse, at most this many and at most the buffer's capacity in
# bytes (so the mount holds at most twice that, as with 8 free blocks of a 16-page run
# before): a cold sequential read asks its worker for the pages of a run as they land,
# most often one at a time, so a block per page read ahead (prefetch.MAX_PREFETCH) may
# be in use at once, and the number in use swings by more than a run's worth.
FREE_BLOCKS = 64
# Pages mapped from a local worker's files are bounded apart from the pages in the
# mount's memory, at this many times the buffer's capacity: they cost the mount no
# memory of its own (their bytes are the kernel's page cache, which it may reclaim), and
# within the memory's bound alone a cold pass of readers over a few hundred MiB let go
# of pages other readers read next, each read then copied again from the page file
# (bench/README.md, "What a page costs the cold Parquet pass, mapped pages kept
# apart"). Their bound keeps what the mount's resident size shows, and the descriptors
# the mappings hold, in proportion.
MAPPED_SHARE = 4


class Block:
    """Memory for the pages of one run. Its bytes are made at first use (`data`): a
    readahead run takes a block before it knows whether its pages come over HTTP into
    it or from a local worker's files into another one (client/prefetch.py), and a
    block never used costs nothing."""

    __slots__ = ("size", "_data", "generation", "held", "filling", "mapped")

    def __init__(self, size: int):
        self.size = size
        self._data: bytearray | mmap.mmap | None = None
        self.generation = 0
        self.held = 0  # pieces of this generation in the buffer
        self.filling = False  # a run is still receiving into it: never reused meanwhile
        self.mapped = False  # a mapping of a page file: read-only to dorafs, never reused

    @classmethod
    def mapping(cls, data: mmap.mmap) -> Block:
        block = cls(len(data))
        block._data = data
        block.mapped = True
        return block

    @property
    def data(self) -> bytearray | mmap.mmap:
        data = self._data
        if data is None:
            data = self._data = bytearray(self.size)
        return data


class Piece:
    """A page held as bytes [start, end) of a block, valid while the block's generation
    is the one it was read in."""

    __slots__ = ("block", "start", "end", "generation")

    def __init__(self, block: Block, start: int, end: int):
        self.block, self.start, self.end, self.generation = block, start, end, block.generation

    def __len__(self) -> int:
        return self.end - self.start

    def follows(self, other: Piece) -> bool:
        return self.block is other.block and self.generation == other.generation and self.start == other.end


Page = bytes | bytearray | Piece


def view(data: Page) -> memoryview | None:
    """The bytes of a page; None for a piece whose block has since been reused."""
    if isinstance(data, Piece):
        if data.generation != data.block.generation:
            return None
        return memoryview(data.block.data)[data.start:data.end]
    return memoryview(data)


class PageBuffer:
    """Buffered pages by key, each kind least recently read first: pages in the mount's
    memory (blocks and bytes) within `capacity` bytes, pages mapped from a local
    worker's files within `mapped_capacity` (MAPPED_SHARE times `capacity` unless
    given). A block counts whole while any of its pieces is buffered."""

    def __init__(self, capacity: int, mapped_capacity: int | None = None):
        self.capacity = capacity
        self.mapped_capacity = MAPPED_SHARE * capacity if mapped_capacity is None else mapped_capacity
        self.used = 0  # bytes of the mount's own memory the buffered pages hold
        self.mapped = 0  # bytes of page files' mappings the buffered pages hold
        self.hits = 0
        self.misses = 0
        self._pages: dict[Hashable, Page] = {}  # every buffered page
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # the pages in memory, least recently read first
        self._lru_mapped: OrderedDict[Hashable, None] = OrderedDict()  # the mapped pages, likewise
        self.contains = self._pages.__contains__  # `key in buffer` without a Python frame (hot paths)
        self._free: list[Block] = []
        self._free_bytes = 0  # sizes of the blocks in _free
        self.new_blocks = 0  # blocks made afresh (the others were reused)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def _order(self, data: Page) -> OrderedDict:
        return self._lru_mapped if type(data) is Piece and data.block.mapped else self._lru

    def get(self, key: Hashable) -> Page | None:
        data = self._pages.get(key)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        (self._lru_mapped if type(data) is Piece and data.block.mapped else self._lru).move_to_end(key)
        return data

    def put(self, key: Hashable, data: Page) -> None:
        mapped = type(data) is Piece and data.block.mapped
        bound = self.mapped_capacity if mapped else self.capacity
        if len(data) > bound or (isinstance(data, Piece) and data.block.size > bound):
            return
        self.discard(key)
        if isinstance(data, Piece):
            if data.generation != data.block.generation:
                return  # its block was reused meanwhile
            if data.block.held == 0:  # a block counts whole while any piece of it is here
                if mapped:
                    self.mapped += data.block.size
                else:
                    self.used += data.block.size
            data.block.held += 1
        else:
            self.used += len(data)
        self._pages[key] = data
        if mapped:
            self._lru_mapped[key] = None
            while self.mapped > self.mapped_capacity and self._lru_mapped:
                self._let_go(self._pages.pop(self._lru_mapped.popitem(last=False)[0]))
        else:
            self._lru[key] = None
            while self.used > self.capacity and self._lru:
                self._let_go(self._pages.pop(self._lru.popitem(last=False)[0]))

    def discard(self, key: Hashable) -> None:
        """Drop a page that will not be read again (its block is reused once all its pages are)."""
        data = self._pages.pop(key, None)
        if data is not None:
            del self._order(data)[key]
            self._let_go(data)

    def discard_mapped(self, key: Hashable) -> None:
        """Drop a page held as a mapping of a file (whose file is gone: the mapping
        would pin its disk space); a page held in memory stays."""
        data = self._pages.get(key)
        if isinstance(data, Piece) and data.block.mapped:
            self.discard(key)

    def _let_go(self, data: Page) -> None:
        if not isinstance(data, Piece):
            self.used -= len(data)
            return
        block = data.block
        block.held -= 1
        if block.held == 0:
            if block.mapped:
                self.mapped -= block.size
            else:
                self.used -= block.size
            self.give(block)

    def block(self, size: int) -> Block:
        """A block of at least `size` bytes for a run: a reused one (its earlier pieces
        now stale) or a new one. The smallest free block that is large enough is
        taken; one more than twice the size only while the buffer holds less than half
        its capacity: the buffer counts a block whole, so a small page in a big block
        would crowd out many others once it fills, while a new block costs its memory
        zeroed (and faulted in) again."""
        best = None
        for i, block in enumerate(self._free):
            if size <= block.size and (best is None or block.size < self._free[best].size):
                best = i
        if best is not None:
            block = self._free[best]
            if block.size <= 2 * size or self.used + block.size <= self.capacity // 2:
                del self._free[best]
                self._free_bytes -= block.size
                block.generation += 1
                return block
        self.new_blocks += 1
        return Block(size)

    def filled(self, block: Block) -> None:
        """A run streamed into `block` has ended: it may be reused once none of its
        pieces is buffered (its first pieces may have been read and dropped already)."""
        block.filling = False
        self.give(block)

    def give(self, block: Block) -> None:
        """Take back a block none of whose pieces is buffered (or that got none). Past
        the bounds of idle blocks (FREE_BLOCKS), the smallest are let go first: a large
        block serves any run while the buffer has room, a small one only small runs."""
        if block.held or block.filling or block.mapped or block._data is None or block in self._free:
            return  # (a block never used holds no memory: a new one costs as little)
        self._free.append(block)
        self._free_bytes += block.size
        while len(self._free) > FREE_BLOCKS or (self._free_bytes > self.capacity and len(self._free) > 1):
            smallest = min(range(len(self._free)), key=lambda i: (self._free[i].size, -i))  # the newest of those
            self._free_bytes -= self._free.pop(smallest).size

    def statistics(self) -> dict:
        return {"pages": len(self._pages), "bytes": self.used, "mapped_bytes": self.mapped, "hits": self.hits,
                "misses": self.misses, "new_blocks": self.new_blocks}
