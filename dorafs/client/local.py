"""Short-circuit reads: page files of a worker on this machine, read with pread.

A worker on loopback keeps its pages as files; asking it over HTTP for a page costs a
round trip and a 1 MiB body through two sockets, while reading the file costs one copy
from the kernel's page cache. So for a worker on this machine the client asks only where
the pages of a run are (`/v1/locate`: the worker fills them first if needed, and answers
their paths and checksums, no bodies) and reads the files itself, one after another
into one block, so that a read crossing from one page into the next needs no copy.

Why this cannot return wrong bytes: a page file's name holds the object version's id,
the page index and the page's checksum, and every page read here is checked against
that checksum before it is used. A file that is missing (evicted meanwhile), unreadable
(another user's cache) or corrupt is not used: the caller fetches the page over HTTP as
usual, where a corrupt page is verified and refetched by the worker.

Once a file has been read whole and matched its checksum, its descriptor is kept (an
LRU bounded by count and by bytes), and later reads of that page that miss the mount's
page buffer, the random reads above all, are a `pread` of just the bytes asked for.
Page files never change under a name (the checksum is in it), nor does the file of a
sealed object (worker/pagestore.py: eviction unlinks it whole), so a kept descriptor
reads the right bytes; but a kept descriptor of a file the worker has evicted (or
replaced, or dropped on an invalidation) would pin its disk space outside the worker's
byte bound. So a kept file whose link count fell to 0 is closed by a sweep every
`SWEEP_SECONDS` (not checked on each read: an fstat per read would cost more than
the space it frees sooner).

Reads of kept files try `preadv(RWF_NOWAIT)` on the event loop first (a page in the
kernel's page cache); one that would wait for the disk is read in a thread, from a
duplicate of the descriptor (the kept one may be closed meanwhile).

A page the kernel's page cache holds whole (a page a worker just wrote, above all) is
not read into the mount's memory at all: it is mapped (`map_page_file`), checked
through the mapping, and buffered as that mapping (client/buffer.py, `Block.mapping`).
Reading it into a block cost a copy and, for a fresh block, the kernel faulting in and
zeroing new memory 4 KiB at a time: together about ten times the hash
(bench/README.md). A mapping is made only of bytes that are all cached, so checking
them never waits for the disk on the event loop, and never touches a page that would
have to be read from it (an I/O error there would be a signal, not an errno); the
file's pages never change and the file is never shortened under a logged page
(worker/pagestore.py), so the mapped bytes stay the checked ones. A mapping pins its
file's disk space like a kept descriptor: the sweep that closes a kept file the worker
unlinked also has the buffer drop that page (`gone`), and a mapped page whose
descriptor is no longer kept pins it until the buffer lets go of it (at most the
buffer's size). Under memory pressure the kernel may drop a mapped page from its
cache while the buffer holds it; the reply that reads it then reads it back from the
disk, on the event loop, and an error there ends that read with EIO (the kernel's
answer to a reply it could not copy).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable

import trio
import xxhash


@functools.lru_cache(maxsize=256)
def is_loopback(address: str) -> bool:
    """Is "host:port" on this machine? Asked for every page fetched: parsed once per address."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Unreadable(Exception):
    """The file cannot be opened or read by this process (not merely corrupt)."""


class WouldBlock(Exception):
    """The file is not (wholly) in the kernel's page cache: reading it would wait for the disk."""


class NotMapped(Exception):
    """Bytes of a page file that are not mapped (not all in the kernel's page cache, or
    a file system that cannot map them): read them instead."""


# The least a mapping covers: each holds a descriptor of its own while it lives (CPython's
# mmap keeps a duplicate), so pages of a small page size are copied, which costs them
# little, and a buffer of 128 MiB holds at most 2,048 mappings.
MAP_MIN = 64 << 10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_RESIDENT = bytes(b & 1 for b in range(256))  # mincore's answer per page: the low bit says cached


def page_cache_residency(mapping: mmap.mmap) -> bytes | None:
    """For each system page of a writable mapping of a file, 1 if the kernel's page
    cache holds it, else 0 (mincore); None if the kernel would not say."""
    answer = (ctypes.c_ubyte * -(-len(mapping) // mmap.PAGESIZE))()
    anchor = ctypes.c_char.from_buffer(mapping)  # only for the mapping's address
    try:
        if _libc.mincore(ctypes.addressof(anchor), len(mapping), answer) != 0:
            return None
    finally:
        del anchor
    return bytes(answer).translate(_RESIDENT)


def _all_cached(mapping: mmap.mmap) -> bool:
    """Are all the pages of a file's mapping in the kernel's page cache?"""
    residency = page_cache_residency(mapping)
    return residency is not None and 0 not in residency


# cachestat(2) (Linux 6.5): how many pages of a file's range the page cache holds, asked
# of the descriptor, no mapping and no page tables walked: 2.8 us here against 23 for
# mincore over a mapping of 1 MiB through ctypes, for every page a run brings
# (bench/pagemap.py; bench/README.md, "The page cache asked once per page file"). The
# same number on every architecture (the generic system call table). Where the kernel
# lacks it (ENOSYS) or a seccomp filter refuses it (EPERM), mincore answers, from then on.
_CACHESTAT = 451
_cachestat_usable = True


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_libc.syscall.restype = ctypes.c_long


def cached_in_range(fd: int, offset: int, length: int) -> int | None:
    """How many system pages of bytes [offset, offset+length) of the open file the
    kernel's page cache holds (a partial last page counts); None if cachestat is not
    available here (ask `page_cache_residency` instead)."""
    global _cachestat_usable
    if not _cachestat_usable:
        return None
    span, stat = _Range(offset, length), _CacheStat()
    if _libc.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_long(fd), ctypes.byref(span), ctypes.byref(stat),
                     ctypes.c_long(0)) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _cachestat_usable = False
        return None
    return stat.nr_cache


def all_cached(fd: int, offset: int, length: int) -> bool | None:
    """Does the kernel's page cache hold every system page of bytes [offset,
    offset+length) of the open file? None if cachestat is not available here."""
    first = offset - offset % mmap.PAGESIZE
    cached = cached_in_range(fd, first, offset + length - first)
    return None if cached is None else cached == -(-(offset + length - first) // mmap.PAGESIZE)


def descriptor_budget() -> int:
    """How many page files to keep open: a quarter of the descriptor limit, raised to
    its hard maximum first (a random reader of a 4 GiB file touches 4,096 pages)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    return max(64, min(16384, soft // 4))


SWEEP_SECONDS = 2.0  # how long an evicted page file may stay pinned by a kept descriptor
SWEEP_BATCH = 512  # kept files checked between two checkpoints of the sweep
# Bytes of page files kept open: a random reader of a 4 GiB file keeps its pages; past
# that, the least recently read are closed (the worker's own cache still has them).
KEPT_BYTES = 4 << 30
READ_THREADS = 4  # reads of kept files that must wait for the disk, at once
# Pages remembered as checked, by the file (device, inode) and offset they were read at:
# an object file whose every page is among them needs no checking pass (fuse/objectfiles.py).
CHECKED_KEPT = 65536


def _pread_and_close(fd: int, length: int, offset: int) -> bytes:
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


class LocalPages:
    """Verified page files of local workers, by page key, with their descriptors kept."""

    def __init__(self, max_open: int | None = None, max_bytes: int = KEPT_BYTES,
                 gone: Callable[[Hashable], None] | None = None):
        self.gone = gone  # told of each page whose kept file the sweep found unlinked
        self.max_open = descriptor_budget() if max_open is None else max_open
        self.max_bytes = max_bytes
        self.bytes = 0  # sizes of the kept files
        self.dropped = 0  # kept files closed because their page was evicted or replaced
        self._open: OrderedDict[Hashable, tuple[int, int, int]] = OrderedDict()  # key -> (fd, size, base)
        self.contains = self._open.__contains__  # `key in local` without a Python frame (hot paths)
        self._threads = trio.CapacityLimiter(READ_THREADS)
        self._checked: OrderedDict[tuple[int, int], dict[int, str]] = OrderedDict()  # file -> offset -> checksum
        self._checked_count = 0

    def __len__(self) -> int:
        return len(self._open)

    @staticmethod
    def load_page_file(into: memoryview, path: str, checksum: str, *, wait: bool = True, offset: int = 0) -> int | None:
        """Read a page (path, checksum) at `offset` of its file (a page file, or the
        whole file of a sealed object) into `into`, which is exactly its size.

        Returns the open descriptor when its bytes matched the checksum; None when the
        file is missing (evicted since the worker answered), shorter or corrupt. Raises
        Unreadable when it cannot be read at all (another user's cache). With `wait`
        false the read takes only what the kernel's page cache holds (RWF_NOWAIT) and
        raises WouldBlock for a file that would have to come from the disk.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from None
        try:
            got = os.preadv(fd, [into], offset, 0 if wait else os.RWF_NOWAIT) if len(into) else 0
        except BlockingIOError:
            os.close(fd)
            raise WouldBlock(path) from None
        except OSError as exc:
            os.close(fd)
            if not wait and exc.errno == errno.EOPNOTSUPP:  # a file system without RWF_NOWAIT
                raise WouldBlock(path) from None
            raise Unreadable(f"{path}: {exc.strerror}") from None
        if not wait and got != len(into):  # partly cached, or shorter: a waiting read decides
            os.close(fd)
            raise WouldBlock(path)
        if got != len(into) or xxhash.xxh3_64_hexdigest(into) != checksum:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def map_page_file(path: str, offset: int, length: int) -> tuple[int, mmap.mmap, int] | None:
        """Map bytes [offset, offset+length) of a page file (a page file, or the file
        of an object), all of which the kernel's page cache holds: its open descriptor,
        the mapping (private: what dorafs never writes, it shares with the cache) and
        where the bytes start in it. None when the file is missing or shorter. Raises
        Unreadable when it cannot be opened, NotMapped when some of the bytes are not
        cached, when they are fewer than MAP_MIN, or when the file system or the
        descriptors left map none."""
        if length < MAP_MIN:  # (and a length of 0 would map the whole file)
            raise NotMapped(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors, not refused
                raise NotMapped(path) from None
            raise Unreadable(f"{path}: {exc.strerror}") from None
        start = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, start + length, access=mmap.ACCESS_COPY, offset=offset - start)
        except ValueError:  # the file ends before the bytes do
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise NotMapped(path) from None
        whole = all_cached(fd, offset - start, start + length)
        if not (_all_cached(mapping) if whole is None else whole):
            mapping.close()
            os.close(fd)
            raise NotMapped(path)
        return fd, mapping, start

    def keep(self, key: Hashable, fd: int, size: int, base: int = 0, checksum: str | None = None,
             file: tuple[int, int] | None = None) -> None:
        """Keep the descriptor of a verified page of `size` bytes at `base` of its file
        (closing the least recently read past the budgets); with its `checksum`, the
        page is remembered as checked in that file (`checked`), which `file` (its
        device and inode) names when the caller knows them already."""
        if checksum is not None:
            if file is None:
                st = os.fstat(fd)
                file = (st.st_dev, st.st_ino)
            self._remember(file, base, checksum)
        self._drop(key)
        self._open[key] = (fd, size, base)
        self.bytes += size
        while self._open and (len(self._open) > self.max_open or self.bytes > self.max_bytes):
            self._drop(next(iter(self._open)))

    def _remember(self, file: tuple[int, int], base: int, checksum: str) -> None:
        pages = self._checked.pop(file, None) or {}
        self._checked_count += base not in pages
        pages[base] = checksum
        self._checked[file] = pages
        while self._checked_count > CHECKED_KEPT and len(self._checked) > 1:
            self._checked_count -= len(self._checked.popitem(last=False)[1])

    def checked(self, st: os.stat_result, page_size: int, checksums: list[str]) -> set[int]:
        """The pages of the object file `st` (pages of `page_size` with these checksums)
        read and checked here, from that very file. Its bytes at those offsets are what
        was checked: an object file's pages are written once, never changed
        (worker/pagestore.py)."""
        pages = self._checked.get((st.st_dev, st.st_ino))
        if pages is None:
            return set()
        return {index for index, digest in enumerate(checksums) if pages.get(index * page_size) == digest}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._open

    def _live(self, key: Hashable) -> tuple[int, int] | None:
        """The kept descriptor of `key` and where the page starts in its file, most
        recently used now.

        Whether the worker has evicted or replaced its file since is left to the sweep:
        an unlinked page file (or sealed object file) still holds the verified bytes
        of its page version, so
        reading it is right, and an `fstat` on every read would cost a cached 4 KiB read
        a tenth of its time. Only the disk space waits, for at most SWEEP_SECONDS."""
        kept = self._open.get(key)
        if kept is None:
            return None
        self._open.move_to_end(key)
        return kept[0], kept[2]

    def readinto(self, key: Hashable, view: memoryview, offset: int) -> bool:
        """Fill `view` from a verified page at `offset` if the kernel has those bytes
        cached; False if its descriptor is not kept. Raises WouldBlock for bytes that
        would come from the disk (then `pread`, which waits in a thread)."""
        live = self._live(key)
        if live is None:
            return False
        if not len(view):
            return True
        fd, base = live
        try:
            got = os.preadv(fd, [view], base + offset, os.RWF_NOWAIT)
        except BlockingIOError:
            raise WouldBlock(key) from None
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                raise WouldBlock(key) from None
            raise
        if got != len(view):  # partly cached (a page file never shrinks under its name)
            raise WouldBlock(key)
        return True

    async def pread(self, key: Hashable, length: int, offset: int) -> bytearray | bytes | None:
        """Bytes of a verified page, or None if its descriptor is not kept: from the
        kernel's page cache on the loop, else in a thread."""
        out = bytearray(length)
        try:
            if not self.readinto(key, memoryview(out), offset):
                return None
            return out
        except WouldBlock:
            pass
        live = self._live(key)
        if live is None:
            return None
        fd, base = live
        return await trio.to_thread.run_sync(_pread_and_close, os.dup(fd), length, base + offset,
                                             limiter=self._threads)

    async def sweep(self) -> None:
        """Close kept files whose page the worker evicted or replaced, every SWEEP_SECONDS."""
        while True:
            await trio.sleep(SWEEP_SECONDS)
            keys = list(self._open)
            for start in range(0, len(keys), SWEEP_BATCH):
                self.check(keys[start:start + SWEEP_BATCH])
                await trio.lowlevel.checkpoint()

    def check(self, keys=None) -> None:
        """Close those of `keys` (default: all) whose file has been unlinked (st_nlink 0)."""
        for key in list(self._open) if keys is None else keys:
            kept = self._open.get(key)
            if kept is not None and os.fstat(kept[0]).st_nlink == 0:
                self.dropped += 1
                self._drop(key)
                if self.gone is not None:
                    self.gone(key)

    def _drop(self, key: Hashable) -> None:
        kept = self._open.pop(key, None)
        if kept is not None:
            os.close(kept[0])
            self.bytes -= kept[1]

    def close(self) -> None:
        while self._open:
            self._drop(next(iter(self._open)))
