"""Short-circuit reads of a local worker's page files: checked, and never waiting on the disk on the loop."""

from __future__ import annotations

import os

import pytest
import xxhash

from dorafs.client import local
from dorafs.client.local import LocalPages, NotMapped, WouldBlock
from tests.support import disk_only, drop_from_page_cache


def page_file(tmp_path, data: bytes, name: str = "page") -> tuple[str, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), xxhash.xxh3_64_hexdigest(data)


def test_a_page_file_is_read_whole_and_checked(tmp_path):
    data = os.urandom(100_000)
    path, checksum = page_file(tmp_path, data)
    into = bytearray(len(data))
    fd = LocalPages.load_page_file(memoryview(into), path, checksum, wait=False)  # just written: cached
    assert fd is not None and into == data
    os.close(fd)

    assert LocalPages.load_page_file(memoryview(bytearray(len(data))), path, "0" * 16) is None  # corrupt
    assert LocalPages.load_page_file(memoryview(bytearray(len(data) + 1)), path, checksum) is None  # shorter
    assert LocalPages.load_page_file(memoryview(bytearray(10)), str(tmp_path / "gone"), checksum) is None  # evicted


def test_a_page_file_on_the_disk_only_is_left_to_a_waiting_read(tmp_path):
    data = os.urandom(1 << 20)
    path, checksum = page_file(tmp_path, data)
    into = bytearray(len(data))

    def load_without_waiting() -> None:
        fd = LocalPages.load_page_file(memoryview(into), path, checksum, wait=False)
        os.close(fd)
    disk_only(path, load_without_waiting)
    fd = LocalPages.load_page_file(memoryview(into), path, checksum)  # what the mount then does in a thread
    assert fd is not None and into == data
    os.close(fd)


@pytest.fixture(params=["cachestat", "mincore"])
def residency(request, tmp_path, monkeypatch) -> str:
    """Both ways the mount asks the page cache what it holds: cachestat(2), and mincore
    over the mapping where the kernel has no cachestat."""
    if request.param == "mincore":
        monkeypatch.setattr(local, "_cachestat_usable", False)
    else:
        with open(tmp_path / "probe", "wb") as f:
            if local.cached_in_range(f.fileno(), 0, 1) is None:
                pytest.skip("no cachestat in this kernel")
    return request.param


def test_a_cached_page_is_mapped_where_it_lies_and_a_short_or_missing_file_is_not(tmp_path, residency):
    data = os.urandom(300_000)
    path, _ = page_file(tmp_path, data, "object")
    fd, mapping, at = LocalPages.map_page_file(path, 100_000, 100_000)  # not at a multiple of the system's page
    try:
        assert mapping[at:at + 100_000] == data[100_000:200_000]
    finally:
        mapping.close()
        os.close(fd)
    assert LocalPages.map_page_file(path, 200_000, 100_001) is None  # the file ends before the page does
    with pytest.raises(NotMapped):  # a small page is copied: a mapping would cost a descriptor for little
        LocalPages.map_page_file(path, 0, 4096)
    assert LocalPages.map_page_file(str(tmp_path / "gone"), 0, 100_000) is None  # evicted


def test_a_page_on_the_disk_only_is_not_mapped(tmp_path, residency):
    """Checking it through a mapping would wait for the disk on the event loop (and an
    I/O error there would be a signal): it is read instead."""
    data = os.urandom(1 << 20)
    path, _ = page_file(tmp_path, data)
    if not drop_from_page_cache(path):
        pytest.skip("this file system keeps the file in memory (tmpfs): nothing to wait for")
    with pytest.raises(NotMapped):
        LocalPages.map_page_file(path, 0, len(data))


def test_a_page_partly_cached_is_not_mapped_and_its_cached_part_is(tmp_path, residency):
    """Mapped only when every system page of the bytes is cached, the last one too."""
    data = os.urandom(1 << 20)
    path, _ = page_file(tmp_path, data)
    if not drop_from_page_cache(path):
        pytest.skip("this file system keeps the file in memory (tmpfs): nothing to wait for")
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        assert len(os.pread(f.fileno(), 256 << 10, 0)) == 256 << 10
    fd, mapping, at = LocalPages.map_page_file(path, 0, 256 << 10)
    try:
        assert at == 0 and mapping[:256 << 10] == data[:256 << 10]
    finally:
        mapping.close()
        os.close(fd)
    with pytest.raises(NotMapped):  # one system page past what is cached
        LocalPages.map_page_file(path, 0, (256 << 10) + 1)
