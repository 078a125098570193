"""In-process tests of page math and page identity (dorafs/pages.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dorafs.pages import PageSpan, object_id, page_count, page_length, plan

page_sizes = st.one_of(st.integers(1, 64), st.sampled_from([4096, 1 << 20]))
sizes = st.integers(0, 5_000_000)
offsets = st.integers(0, 6_000_000)
lengths = st.integers(0, 6_000_000)


@settings(max_examples=500)
@given(offset=offsets, length=lengths, size=sizes, page_size=page_sizes)
def test_plan_covers_exactly_the_clipped_range(offset, length, size, page_size):
    # Keep the number of spans small enough to walk (tiny pages x huge ranges).
    assume(min(offset + length, size) - offset <= 200 * page_size)
    spans = plan(offset, length, size, page_size)
    end = min(offset + length, size)
    if offset >= end:
        assert spans == []
        return
    absolute = [(s.index * page_size + s.start, s.index * page_size + s.end) for s in spans]
    assert absolute[0][0] == offset
    assert absolute[-1][1] == end
    for (_, stop), (start, _) in zip(absolute, absolute[1:]):
        assert stop == start  # contiguous
    for span in spans:
        assert 0 <= span.start < span.end <= page_size  # non-empty, within one page
        assert span.end <= page_length(span.index, size, page_size)
    indexes = [s.index for s in spans]
    assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))  # increasing by one
    assert indexes[-1] < page_count(size, page_size)


def test_plan_examples():
    assert plan(0, 10, 10, 4) == [PageSpan(0, 0, 4), PageSpan(1, 0, 4), PageSpan(2, 0, 2)]
    assert plan(5, 100, 10, 4) == [PageSpan(1, 1, 4), PageSpan(2, 0, 2)]
    assert plan(3, 2, 10, 4) == [PageSpan(0, 3, 4), PageSpan(1, 0, 1)]
    assert plan(10, 5, 10, 4) == []  # at EOF
    assert plan(50, 5, 10, 4) == []  # past EOF
    assert plan(0, 0, 10, 4) == []
    assert plan(0, 10, 0, 4) == []


@pytest.mark.parametrize("offset,length", [(-1, 10), (0, -1), (-5, -5)])
def test_plan_rejects_negative(offset, length):
    with pytest.raises(ValueError):
        plan(offset, length, 100, 10)


@given(size=sizes, page_size=page_sizes)
def test_page_count_and_length_agree(size, page_size):
    count = page_count(size, page_size)
    assert count == -(-size // page_size)
    if count <= 10_000:
        assert sum(page_length(i, size, page_size) for i in range(count)) == size
    if count:
        assert 0 < page_length(count - 1, size, page_size) <= page_size
    assert page_length(count, size, page_size) == 0


def test_page_length_examples():
    assert page_count(0, 4) == 0
    assert page_count(1, 4) == 1 and page_count(4, 4) == 1 and page_count(5, 4) == 2
    assert page_length(0, 10, 4) == 4
    assert page_length(2, 10, 4) == 2
    assert page_length(3, 10, 4) == 0


# Versions are ETags, S3 version ids or "<mtime_ns>-<size>": never NUL. (With a NUL in the
# version, uri="a\0b", version="c" and uri="a", version="b\0c" would share an id.)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
versions = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)


@given(uri=text, version=versions, uri2=text, version2=versions)
def test_object_id_identity(uri, version, uri2, version2):
    oid = object_id(uri, version)
    assert re.fullmatch(r"[0-9a-f]{32}", oid)
    assert object_id(uri, version) == oid  # stable
    if (uri, version) != (uri2, version2):
        assert object_id(uri2, version2) != oid


def test_object_id_changes_with_uri_or_version():
    base = object_id("s3://b/k", '"etag1"')
    assert object_id("s3://b/k", '"etag2"') != base
    assert object_id("s3://b/k2", '"etag1"') != base
    assert object_id("s3://b/k", "") != object_id("s3://b/k\0", "")
    # A known value pins the format across releases (the cache on disk is keyed by it).
    assert base == object_id("s3://b/k", '"etag1"')
