"""Page math and page identity.

A page is a fixed-size, page-aligned slice of one version of one object. Its identity is
(hash(UFS URI, version), index): a changed object gets new page ids, so old and new bytes
can never be mixed in one read.
"""

from __future__ import annotations

import functools
import hashlib
from typing import NamedTuple


@functools.lru_cache(maxsize=4096)
def object_id(uri: str, version: str) -> str:
    """Stable 32-hex id of one version of one object. Remembered for the objects read
    lately: a worker asks it several times for every page it serves."""
    return hashlib.blake2b(f"{uri}\0{version}".encode(), digest_size=16).hexdigest()


class PageSpan(NamedTuple):
    """The part of page `index` that a read touches: [start, end) within the page.

    A tuple rather than a frozen dataclass: every read makes one, and a frozen
    dataclass costs several times as much to build."""

    index: int
    start: int
    end: int


def page_count(size: int, page_size: int) -> int:
    return (size + page_size - 1) // page_size


def page_length(index: int, size: int, page_size: int) -> int:
    """Bytes in page `index` of an object of `size` bytes (the last page may be short)."""
    return max(0, min(page_size, size - index * page_size))


def plan(offset: int, length: int, size: int, page_size: int) -> list[PageSpan]:
    """Pages and in-page ranges covering [offset, offset+length) clipped to the object."""
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    end = min(offset + length, size)
    index = offset // page_size
    page_start = index * page_size
    if end <= page_start + page_size:  # within one page: most reads
        return [PageSpan(index, offset - page_start, end - page_start)] if offset < end else []
    spans = []
    pos = offset
    while pos < end:
        index = pos // page_size
        page_start = index * page_size
        stop = min(end, page_start + page_size)
        spans.append(PageSpan(index, pos - page_start, stop - page_start))
        pos = stop
    return spans
