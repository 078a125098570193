"""In-process tests of the worker's on-disk page store (worker/pagestore.py)."""

from __future__ import annotations

import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dorafs.pages import object_id
from tests.support import tmpfs
from worker.pagestore import PageStore, checksum


def key(n: int, index: int = 0) -> tuple[str, int]:
    return object_id(f"s3://bucket/object-{n}", "v1"), index


def page(size: int, fill: int = 0) -> bytes:
    return bytes((fill + i) % 251 for i in range(size))


def new_store(root: Path, capacity: int) -> PageStore:
    store = PageStore(root, capacity)
    store.load()
    return store


def page_files(root: Path) -> list[Path]:
    """Every file under pages/ except the temp dir."""
    pages = root / "pages"
    return [p for p in pages.rglob("*") if p.is_file() and p.parent != pages / "tmp"]


def disk_total(root: Path) -> int:
    return sum(p.stat().st_size for p in page_files(root))


async def put(store: PageStore, k, data: bytes):
    return await store.put(k, data, checksum(data))


def check_consistent(store: PageStore, root: Path) -> None:
    """The index and the disk agree, and neither exceeds the capacity."""
    assert store.used <= store.capacity
    assert disk_total(root) <= store.capacity
    entries = [store._index[k] for k in store._index]
    assert store.used == sum(e.size for e in entries)
    assert sorted(page_files(root)) == sorted(e.path for e in entries)
    for e in entries:
        assert e.path.stat().st_size == e.size


def test_put_and_lookup(tmp_path):
    store = new_store(tmp_path, 1 << 20)
    data = page(1000)

    async def main():
        entry = await put(store, key(1), data)
        assert entry is not None
        assert entry.size == 1000 and entry.checksum == checksum(data)
        assert entry.path.read_bytes() == data
        assert entry.path.name == f"{key(1)[0]}_0_{checksum(data)}"
        assert store.lookup(key(1)) == entry
        assert store.lookup(key(2)) is None
        assert store.used == 1000 and len(store) == 1
        assert store.pages_of(key(1)[0]) == {0}
        # A second put of the same page returns the cached entry.
        assert await put(store, key(1), data) == entry
        assert store.used == 1000

    trio.run(main)
    check_consistent(store, tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 4000),
    puts=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 3), st.integers(0, 5000)), max_size=25),
)
def test_capacity_never_exceeded(capacity, puts):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = new_store(root, capacity)

        async def main():
            for n, index, size in puts:
                k = key(n, index)
                had = store.lookup(k)
                entry = await put(store, k, page(size, n))
                if size > capacity and had is None:
                    assert entry is None
                else:
                    assert entry is not None and store.lookup(k) == entry
                check_consistent(store, root)
            assert store.write_errors == 0

        trio.run(main)


def test_lru_keeps_recently_looked_up_pages(tmp_path):
    store = new_store(tmp_path, 300)

    async def main():
        a = await put(store, key(1), page(100))
        b = await put(store, key(2), page(100))
        await put(store, key(3), page(100))
        assert store.lookup(key(1)) == a  # now key 2 is the least recently used
        await put(store, key(4), page(100))
        assert store.lookup(key(1)) == a
        assert store.lookup(key(2)) is None and not b.path.exists()
        assert store.evictions == 1
        # A page as big as the whole capacity evicts everything else.
        await put(store, key(5), page(300))
        assert len(store) == 1 and store.used == 300

    trio.run(main)
    check_consistent(store, tmp_path)


def test_page_bigger_than_capacity_is_not_cached(tmp_path):
    store = new_store(tmp_path, 100)

    async def main():
        kept = await put(store, key(1), page(50))
        assert await put(store, key(2), page(101)) is None
        assert store.lookup(key(2)) is None
        assert store.lookup(key(1)) == kept  # nothing was evicted for it
        assert store.used == 50 and store.evictions == 0 and store.write_errors == 0

    trio.run(main)
    check_consistent(store, tmp_path)


def test_drop(tmp_path):
    store = new_store(tmp_path, 1000)

    async def main():
        a = await put(store, key(1, 0), page(100))
        await put(store, key(1, 1), page(100))
        store.drop(key(1, 0))
        assert store.lookup(key(1, 0)) is None and not a.path.exists()
        assert store.used == 100 and store.pages_of(key(1)[0]) == {1}
        store.drop(key(1, 0))  # dropping a missing page is a no-op
        store.drop(key(1, 1))
        assert store.used == 0 and store.pages_of(key(1)[0]) == set() and len(store) == 0

    trio.run(main)
    check_consistent(store, tmp_path)


def test_rebuild_from_disk(tmp_path):
    store = new_store(tmp_path, 10_000)
    contents = {key(n, i): page(100 * n + i, n) for n in range(1, 5) for i in range(3)}

    async def main():
        for k, data in contents.items():
            await put(store, k, data)

    trio.run(main)
    again = new_store(tmp_path, 10_000)
    assert len(again) == len(contents)
    assert again.used == store.used == sum(map(len, contents.values()))
    for k, data in contents.items():
        entry = again.lookup(k)
        assert entry is not None
        assert entry.size == len(data) and entry.checksum == checksum(data)
        assert entry.path.read_bytes() == data
    assert again.pages_of(key(1)[0]) == {0, 1, 2}
    check_consistent(again, tmp_path)


def test_load_removes_temp_and_unrecognised_files(tmp_path):
    store = new_store(tmp_path, 10_000)

    async def main():
        return await put(store, key(1), page(100))

    entry = trio.run(main)
    sub = entry.path.parent
    leftovers = [store.tmp / "0123456789abcdef.tmp", store.tmp / "other"]
    strays = [
        sub / "notes.txt",
        sub / f"{key(1)[0]}_0",  # too few fields
        sub / f"{key(1)[0]}_x_{'0' * 16}",  # index not a number
        sub / f"{key(1)[0][:31]}_0_{'0' * 16}",  # short object id
        sub / f"{key(1)[0]}_0_{'0' * 15}",  # short checksum
    ]
    for path in leftovers + strays:
        path.write_bytes(b"junk")

    again = new_store(tmp_path, 10_000)
    for path in leftovers + strays:
        assert not path.exists(), path
    assert list(again.tmp.iterdir()) == []
    assert again.lookup(key(1)) is not None and again.used == 100 and len(again) == 1
    check_consistent(again, tmp_path)


def test_smaller_capacity_on_restart_evicts(tmp_path):
    store = new_store(tmp_path, 1000)

    async def main():
        for n in range(10):
            await put(store, key(n), page(100, n))

    trio.run(main)
    assert store.used == 1000
    smaller = new_store(tmp_path, 350)
    assert smaller.used <= 350 and len(smaller) == 3
    assert smaller.evictions == 7
    check_consistent(smaller, tmp_path)


def test_file_and_directory_modes(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    store = new_store(root, 10_000)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    async def main():
        return await put(store, key(1), page(100))

    entry = trio.run(main)
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.path.parent.stat().st_mode) == 0o700


def test_write_failure_is_counted_and_not_cached(tmp_path):
    store = new_store(tmp_path, 10_000)
    good = key(1)
    bad = next(key(n) for n in range(2, 1000) if key(n)[0][:2] != good[0][:2])  # another subdir

    async def main():
        await put(store, good, page(100))
        (store.root / bad[0][:2]).write_bytes(b"")  # the page directory's path is a file
        assert await put(store, bad, page(200)) is None
        assert store.write_errors == 1
        assert store.used == 100 and len(store) == 1
        assert store.lookup(bad) is None
        assert list(store.tmp.iterdir()) == []  # the temp file was cleaned up
        # The store keeps working for other pages.
        assert await put(store, key(1, 1), page(100)) is not None
        assert store.used == 200

    trio.run(main)


def test_concurrent_puts_never_exceed_capacity(tmp_path):
    store = new_store(tmp_path, 100)
    peak = 0

    async def main():
        nonlocal peak
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, store, key(1), page(60))
            nursery.start_soon(put, store, key(2), page(60))
            await trio.testing.wait_all_tasks_blocked()
            peak = store.used  # both reservations are made, neither write has landed

    trio.run(main)
    assert peak <= store.capacity, f"{peak} bytes reserved of {store.capacity}"
    assert store.used <= store.capacity, f"{store.used} bytes cached of {store.capacity}"
    assert disk_total(tmp_path) <= store.capacity


def test_evicted_page_put_again_before_the_victim_is_unlinked(tmp_path):
    store = new_store(tmp_path, 120)
    gate = threading.Event()
    real_unlink = store._unlink

    def slow_unlink(entry):  # the evicting thread is slow to get to its victims
        if entry.path.name.startswith(key(1)[0]):
            gate.wait(10)
        real_unlink(entry)

    async def main():
        await put(store, key(0), page(60, 0))
        await put(store, key(1), page(60, 1))
        store.lookup(key(0))  # key 1 is now the least recently used
        store._unlink = slow_unlink
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, store, key(2), page(60, 2))  # evicts key 1
            try:
                await trio.testing.wait_all_tasks_blocked()
                assert store.lookup(key(1)) is None
                again = await put(store, key(1), page(60, 1))  # a reader fills it again
                assert again is not None and again.path.exists()
            finally:
                gate.set()
        entry = store.lookup(key(1))
        assert entry is not None
        assert entry.path.exists(), "indexed page file was deleted by the earlier eviction"

    trio.run(main)


def test_full_disk_lowers_the_limit_and_caching_goes_on(tmp_path):
    """ENOSPC on a real 64 KiB tmpfs: the page is served uncached, the limit drops to what
    the disk holds, and later pages evict older ones instead of failing; health() says so."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        store = new_store(disk, 1 << 20)  # a capacity the disk cannot hold
        size = 4096  # one tmpfs block per page

        async def main():
            n = 0
            while await put(store, key(n), page(size, n)) is not None:
                n += 1
                assert n < 64, "the 64 KiB disk never filled"
            assert n >= 4 and store.write_errors == 1
            assert store.limit == store.used == n * size
            assert "full" in store.health()
            assert await put(store, key(100), page(size)) is not None  # evicts the oldest to fit
            assert store.used == n * size and store.lookup(key(0)) is None and store.evictions == 1
            assert store.write_errors == 1
            check_consistent(store, disk)

        trio.run(main)


def test_failing_disk_serves_uncached_then_recovers(tmp_path, monkeypatch):
    """A disk that refuses writes (the tmpfs remounted read-only: EROFS) stops the attempts
    for FAULT_RETRY_SECONDS; after that one write is tried again and ends the fault."""
    from worker import pagestore

    monkeypatch.setattr(pagestore, "FAULT_RETRY_SECONDS", 0.3)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        store = new_store(disk, 10_000)

        def remount(mode: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)

        async def main():
            assert await put(store, key(0), page(100)) is not None
            remount("ro")
            assert await put(store, key(1), page(100)) is None
            assert "Read-only file system" in store.health() and store.write_errors == 1
            assert await put(store, key(2), page(100)) is None  # within the retry pause: no attempt
            assert store.write_errors == 1
            remount("rw")
            await trio.sleep(0.35)
            assert await put(store, key(3), page(100)) is not None
            assert store.health() is None and store.write_errors == 1

        trio.run(main)


# -- whole objects ---------------------------------------------------------------------

async def put_object(store: PageStore, n: int, size: int, page_size: int) -> bytes:
    data = page(size, n)
    for i in range(0, -(-size // page_size)):
        await put(store, key(n, i), data[i * page_size:(i + 1) * page_size])
    assert await store.seal(key(n)[0], size, page_size) is not None
    return data


def test_complete_object_is_sealed_into_one_file_at_page_offsets(tmp_path):
    store = new_store(tmp_path, 1 << 20)

    async def main():
        data = await put_object(store, 1, 2500, 1000)
        oid = key(1)[0]
        whole = store.whole(oid)
        assert whole is not None and whole.size == 2500 and len(whole.checksums) == 3
        assert whole.path.read_bytes() == data
        for i in range(3):
            entry = store.lookup(key(1, i))
            assert entry.path == whole.path and entry.offset == i * 1000 and entry.in_object
            with open(entry.path, "rb") as f:
                f.seek(entry.offset)
                assert checksum(f.read(entry.size)) == entry.checksum
        assert page_files(tmp_path) == []  # the page files are gone
        assert store.used == 2500

    trio.run(main)
    again = new_store(tmp_path, 1 << 20)  # survives a restart
    assert again.whole(key(1)[0]) is not None and again.used == 2500 and len(again) == 3


def test_partial_object_is_not_sealed(tmp_path):
    store = new_store(tmp_path, 1 << 20)

    async def main():
        data = page(2500)
        await put(store, key(1, 0), data[:1000])
        await put(store, key(1, 2), data[2000:])
        assert await store.seal(key(1)[0], 2500, 1000) is None
        assert store.whole(key(1)[0]) is None
        assert len(page_files(tmp_path)) == 2

    trio.run(main)


def test_crash_leftovers_of_sealing_are_cleaned_up(tmp_path):
    store = new_store(tmp_path, 1 << 20)
    trio.run(put_object, store, 1, 2500, 1000)
    whole = store.whole(key(1)[0])
    objects = whole.path.parent
    (objects / f"{whole.path.name}.1234abcd.tmp").write_bytes(b"half an object")  # a sealing cut short
    orphan = objects / ("f" * 32)  # an object file whose sums never landed
    orphan.write_bytes(b"x" * 10)
    page_file = tmp_path / "pages" / whole.path.name[:2] / f"{whole.path.name}_0_{whole.checksums[0]}"
    page_file.write_bytes(page(1000, 1))  # a page file the crash left beside its sealed object
    again = new_store(tmp_path, 1 << 20)
    assert sorted(p.name for p in objects.iterdir()) == sorted([whole.path.name, f"{whole.path.name}.sums"])
    assert not page_file.exists()
    assert again.used == 2500


def test_evicting_a_page_of_a_sealed_object_unlinks_the_whole_file(tmp_path):
    store = new_store(tmp_path, 5000)  # sealing needs room for a copy of the object

    async def main():
        await put_object(store, 1, 2500, 1000)
        path = store.whole(key(1)[0]).path
        await put(store, key(2), page(1000))
        await put(store, key(3), page(1000))
        store.lookup(key(1, 0))
        await put(store, key(4), page(1000))  # room for it evicts object 1 (its other pages are older)
        assert not path.exists() and store.whole(key(1)[0]) is None
        assert store.pages_of(key(1)[0]) == set() and store.used == 3000

    trio.run(main)


def test_a_held_object_file_is_counted_until_its_holder_lets_go(tmp_path, monkeypatch):
    import fcntl
    import os

    import worker.pagestore as pagestore
    monkeypatch.setattr(pagestore, "HELD_RECHECK_SECONDS", 0.0)
    store = new_store(tmp_path, 5000)

    async def main():
        data = await put_object(store, 1, 2500, 1000)
        path = store.whole(key(1)[0]).path
        holder = os.open(path, os.O_RDONLY)
        fcntl.flock(holder, fcntl.LOCK_SH)  # what a mount does while the kernel reads it
        store.drop(key(1, 1))
        assert not path.exists()
        assert store.held == 2500 and store.used == 2500  # still on the disk, still counted
        assert await put(store, key(2), page(2000)) is not None
        assert store.used == 4500
        assert await put(store, key(3), page(3000)) is None  # no room while it is held
        assert os.pread(holder, 2500, 0) == data  # the holder's bytes never changed
        os.close(holder)
        assert await put(store, key(3), page(3000)) is not None
        assert store.held == 0 and store.used == 5000

    trio.run(main)


def test_sealing_finds_and_drops_a_corrupt_page(tmp_path):
    store = new_store(tmp_path, 1 << 20)

    async def main():
        data = page(2500)
        for i in range(3):
            await put(store, key(1, i), data[i * 1000:(i + 1) * 1000])
        victim = store.peek(key(1, 1)).path
        victim.write_bytes(b"\0" * 1000)  # the disk corrupted it
        assert await store.seal(key(1)[0], 2500, 1000) is None
        assert store.pages_of(key(1)[0]) == {0, 2} and not victim.exists()
        assert store.corrupt == 1

    trio.run(main)


def test_sealing_needs_room_for_a_copy(tmp_path):
    store = new_store(tmp_path, 3000)

    async def main():
        data = page(2500)
        for i in range(3):
            await put(store, key(1, i), data[i * 1000:(i + 1) * 1000])
        assert await store.seal(key(1)[0], 2500, 1000) is None  # it would evict its own pages
        assert store.pages_of(key(1)[0]) == {0, 1, 2}

    trio.run(main)


def test_concurrent_seals_of_one_object_make_one_file(tmp_path):
    store = new_store(tmp_path, 1 << 20)

    async def main():
        data = page(2500)
        for i in range(3):
            await put(store, key(1, i), data[i * 1000:(i + 1) * 1000])
        results = []

        async def seal():
            results.append(await store.seal(key(1)[0], 2500, 1000))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(seal)
        assert len(results) == 3 and all(r is not None and r is results[0] for r in results)
        assert store.sealed == 1 and store.used == 2500
        assert results[0].path.read_bytes() == data

    trio.run(main)


# -- versions that grow in their object file -------------------------------------------

def test_a_growing_version_is_whole_when_its_last_page_lands_with_no_copy(tmp_path):
    """Pages of a growing version go into its object file at their offsets, in any order
    and several runs at once; the last one makes it whole (sums beside it, log gone),
    with no page file written and no copy made (the file is the one written to)."""
    store = new_store(tmp_path, 1 << 20)
    data = page(4500, 3)
    oid = key(1)[0]

    async def main():
        assert store.grow(oid, 4500, 1000)
        await store.put_many([(key(1, i), data[i * 1000:(i + 1) * 1000], checksum(data[i * 1000:(i + 1) * 1000]))
                              for i in (3, 4)])
        first_inode = store.peek(key(1, 3)).path.stat().st_ino
        assert store.whole(oid) is None and store.is_growing(oid)
        async with trio.open_nursery() as nursery:  # two runs at once
            nursery.start_soon(put, store, key(1, 0), data[:1000])
            nursery.start_soon(put, store, key(1, 2), data[2000:3000])
        assert store.whole(oid) is None and (await store.seal(oid, 4500, 1000)) is None  # page 1 missing
        await put(store, key(1, 1), data[1000:2000])
        whole = store.whole(oid)
        assert whole is not None and not store.is_growing(oid)
        assert whole.path.read_bytes() == data and whole.path.stat().st_ino == first_inode
        assert Path(f"{whole.path}.sums").exists() and not Path(f"{whole.path}.log").exists()
        assert await store.seal(oid, 4500, 1000) is whole and store.sealed == 1
        for i in range(5):
            entry = store.peek(key(1, i))
            assert entry.in_object and entry.path == whole.path and entry.offset == i * 1000
        assert page_files(tmp_path) == [] and store.used == 4500

    trio.run(main)
    again = new_store(tmp_path, 1 << 20)
    assert again.whole(oid) is not None and again.used == 4500 and len(again) == 5


def test_a_growing_version_keeps_its_pages_over_a_restart_and_never_a_torn_one(tmp_path):
    """A partly filled object file is reloaded from its log: a line cut short by a crash
    and a page whose bytes the file does not reach are not pages; the rest are, and the
    version goes on growing after the restart until it is whole."""
    store = new_store(tmp_path, 1 << 20)
    data = page(3500, 5)
    oid = key(2)[0]

    async def main():
        assert store.grow(oid, 3500, 1000)
        for i in (0, 2):
            await put(store, key(2, i), data[i * 1000:(i + 1) * 1000])

    trio.run(main)
    path = store.peek(key(2, 0)).path
    with open(f"{path}.log", "ab") as f:  # a crash while the lines of pages 1 and 3 were written
        f.write(f"3 3500 1000 {checksum(data[3000:])}\n".encode())  # its bytes never reached the file
        f.write(b"1 3500 1000 0123")
    again = new_store(tmp_path, 1 << 20)
    assert again.pages_of(oid) == {0, 2} and again.is_growing(oid) and again.used == 2000

    async def rest():
        await put(again, key(2, 1), data[1000:2000])
        await put(again, key(2, 3), data[3000:])

    trio.run(rest)
    assert again.whole(oid) is not None and path.read_bytes() == data


def test_evicting_a_page_of_a_growing_version_removes_its_file(tmp_path):
    store = new_store(tmp_path, 4000)
    oid = key(1)[0]

    async def main():
        assert store.grow(oid, 1000 * 1000, 1000) is False  # more than a quarter of the store
        assert store.grow(oid, 1000, 1000)
        await put(store, key(1, 0), page(1000))
        assert store.whole(oid) is not None  # one page: whole at once
        other = key(2)[0]
        assert store.grow(other, 2500, 1000) is False  # more than a quarter of the store
        await put(store, key(3, 0), page(1000))
        assert store.grow(key(3)[0], 1000, 1000) is False  # it has a page file: sealing copies those
        path = store.peek(key(1, 0)).path
        for n in (4, 5, 6):
            await put(store, key(n), page(1000))
        assert not path.exists() and store.whole(oid) is None and store.pages_of(oid) == set()
        assert store.used == 4000

    trio.run(main)


def test_a_full_disk_frees_what_a_failed_page_left_in_an_object_file(tmp_path):
    """A write into an object file that the disk cannot hold leaves no bytes behind: the
    page is served uncached, the version's other pages stay."""
    with tmpfs(tmp_path / "disk", "64k") as root:
        store = new_store(root, 1 << 20)
        oid = key(1)[0]
        data = page(200 * 1024, 7)

        async def main():
            assert store.grow(oid, len(data), 32 * 1024)
            got = await store.put_many([(key(1, i), data[i * 32768:(i + 1) * 32768],
                                         checksum(data[i * 32768:(i + 1) * 32768])) for i in range(6)])
            kept = [i for i, entry in enumerate(got) if entry is not None]
            assert 0 < len(kept) < 6 and kept == list(range(len(kept))) and store.write_errors == 1
            path = store.peek(key(1, 0)).path
            assert path.stat().st_blocks * 512 <= len(kept) * 32768 + 4096  # nothing of the failed page
            for i in kept:
                with open(path, "rb") as f:
                    f.seek(i * 32768)
                    assert f.read(32768) == data[i * 32768:(i + 1) * 32768]

        trio.run(main)


def test_a_reads_pages_are_written_by_its_receiving_thread_as_their_bytes_come(tmp_path):
    """RunWriter: each page of a read is checksummed and written by the thread that
    delivers its last bytes, as soon as they are in (the loop indexes it while the read
    goes on), the room of the pages whose bytes never came is given back, and nothing
    keeps the read's buffer once it is closed (no cycle for the collector to find)."""
    import gc
    import sys

    from dorafs.ufs.retry import Progress
    from worker.pagestore import RunWriter

    store = new_store(tmp_path, 1 << 20)
    size = 4096
    data = page(4 * size, 3)
    received = int(2.5 * size)  # the read breaks off in its third page
    writers: list[int] = []
    write = store.write

    def recording_write(pages, files=None):
        writers.append(threading.get_ident())
        return write(pages, files)

    store.write = recording_write
    first_indexed = threading.Event()
    landed: dict[int, object] = {}

    async def main():
        keys = [key(1, i) for i in range(4)]
        progress = Progress()
        progress.buffer = bytearray(4 * size)
        writer = RunWriter(store, keys, [size] * 4, progress)
        progress.sink = writer.take
        assert store.reserved == 4 * size

        def receive() -> int:
            ticket = progress.begin()
            for at in range(0, received, 1000):
                def put(done, n=min(1000, received - at)):
                    progress.buffer[done:done + n] = data[done:done + n]
                    return n
                progress.deliver(ticket, put)
                if progress.done >= size + 1000:
                    assert first_indexed.wait(10), "the first page was not indexed while the read went on"
            return threading.get_ident()

        async def consume():
            async for at, entry in writer.pages():
                landed[at] = entry
                if at == 0:
                    first_indexed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            reader = await trio.to_thread.run_sync(receive)
            progress.finish()
            await trio.to_thread.run_sync(writer.close, None)
        assert writers and set(writers) == {reader}
        assert writer.digests == [checksum(data[:size]), checksum(data[size:2 * size]), None, None]
        writer = None  # (the closures share this name: nothing here holds the writer now)
        return progress

    gc.disable()
    try:
        progress = trio.run(main)
        references = sys.getrefcount(progress.buffer)
        assert references == 2  # the attribute, and getrefcount's argument
    finally:
        gc.enable()
    assert sorted(landed) == [0, 1, 2, 3] and landed[2] is None and landed[3] is None
    for i in (0, 1):
        assert landed[i] is store.peek(key(1, i)) and landed[i].path.read_bytes() == data[i * size:(i + 1) * size]
    assert store.reserved == 0 and store.used == 2 * size
    check_consistent(store, tmp_path)


# -- a worker seals a version when its last page lands (worker/service.py) ---------------

def test_a_worker_seals_a_version_when_its_last_page_lands(procs, s3_server, bucket):
    """No mount and no load job asks for the object file: the worker makes it once every
    page of a version that a mount on this machine reads from its files (/v1/locate) is
    cached, its bytes exactly the object's. Not for a version read only over HTTP (a
    remote mount cannot hold the file), nor with seal_min_size 0, nor for a version
    smaller than a page."""
    import os

    import httpx

    from tests.support import wait_for

    mib = 1 << 20
    s3 = s3_server.client()
    objects = {name: os.urandom(size) for name, size in (("here.bin", 3 * mib + 5), ("remote.bin", 2 * mib + 9),
                                                         ("small.bin", 5000))}
    etags = {name: s3.put_object(Bucket=bucket, Key=f"seal/{name}", Body=data)["ETag"]
             for name, data in objects.items()}
    sealing = procs.worker()
    pages_only = procs.worker(extra=["--seal-min-size", "0"])

    def params(name: str, index: int, **more) -> dict:
        return {"uri": f"s3://{bucket}/seal/{name}", "version": etags[name], "size": len(objects[name]),
                "index": index, "page_size": mib, **more}

    def page(worker, name: str, index: int, run: int = 1) -> None:
        r = httpx.get(f"http://{worker.address}/v1/page", params=params(name, index, run=run), timeout=30)
        assert r.status_code == 200 and r.content == objects[name][index * mib:(index + 1) * mib]

    def locate(worker, name: str, index: int, count: int) -> list[int]:
        r = httpx.get(f"http://{worker.address}/v1/locate", params=params(name, index, count=count), timeout=30)
        assert r.status_code == 200
        for p in r.json()["pages"]:
            with open(p["path"], "rb") as f:
                f.seek(p["offset"])
                assert f.read(p["size"]) == objects[name][p["index"] * mib:p["index"] * mib + p["size"]]
        return [p["index"] for p in r.json()["pages"]]

    for worker in (sealing, pages_only):
        assert locate(worker, "here.bin", 0, 1) == [0]
        got = locate(worker, "here.bin", 1, 3)  # page 1, and the pages of its run cached by then
        assert got == list(range(1, 1 + len(got))) and got
        wait_for(lambda: locate(worker, "here.bin", 1, 3) == [1, 2, 3], what="the run's pages")
        assert locate(worker, "small.bin", 0, 1) == [0]
        page(worker, "remote.bin", 0, run=3)
        page(worker, "remote.bin", 1)
        page(worker, "remote.bin", 2)
    wait_for(lambda: sealing.metrics()["dorafs_worker_whole_objects"] == 1, what="the version sealed")
    sealed = [p for p in (sealing.cache_dir / "objects").glob("??/*") if p.is_file() and "." not in p.name]
    assert len(sealed) == 1 and sealed[0].read_bytes() == objects["here.bin"]
    wait_for(lambda: len(sealing.page_files()) == 4, what="its page files unlinked")  # remote.bin's 3, small.bin's 1
    for i in range(4):  # served from the object file now
        page(sealing, "here.bin", i)
    assert locate(sealing, "here.bin", 0, 4) == [0, 1, 2, 3]
    assert sealing.counter("dorafs_worker_ufs_requests_total") == 4  # two reads of here.bin, one of each other
    assert pages_only.metrics()["dorafs_worker_whole_objects"] == 0 and len(pages_only.page_files()) == 8
