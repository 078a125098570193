"""FUSE passthrough: object versions wholly cached on this node, read by the kernel itself.

When a file is opened read-only and the worker that owns it runs on this machine and
holds every page of the pinned version, the worker hands over the version's one file
(worker/pagestore.py seals it); the mount checks every page of it against its checksum,
registers it with the kernel (`FUSE_DEV_IOC_BACKING_OPEN`, which answers a backing id)
and answers the open with FOPEN_PASSTHROUGH and that id. From then on the kernel serves
read, mmap and splice of that open file from the backing file: no READ reaches the mount.

Why this cannot return wrong bytes:
- the checksums are verified before the kernel gets the file, by this process, against
  the checksums the worker recorded when each page arrived; once per backing file (its
  device and inode number) per mount, since a sealed file never changes under a name
  and the file verified is the one registered (the same open descriptor);
- a sealed file is never rewritten, truncated or punched: eviction, `free`, a refresh
  that drops pages and a changed object only ever unlink it, and an unlinked file keeps
  its bytes for whoever holds it open (the kernel does); a new version is a new file;
- the mount holds a shared `flock` on every file it registered until the backing id is
  closed, which tells the worker to count the file's bytes while it is unlinked.

The kernel allows one backing file per inode: every open of the same inode and version
shares one backing id (a second registration would fail the open with EIO), and the id
is closed at the last release. While an inode has passthrough opens, the kernel fails
every open of it that is not passthrough with EIO (fs/fuse/iomode.c): so an open of
another version or for writing is then refused here with EBUSY (counted as `conflict`,
logged once), which is why passthrough is on by default only on read-only mounts. An
inode with opens that use the kernel's page cache gets no passthrough open.

Every open that could not be handed over is served by the usual read path; why is
counted (`dorafs_mount_passthrough_opens_total{result}`) and logged once per mount.

Getting there: when a handle that read its file to the end through the mount is
released, `prepare_soon` asks the worker (in the background) to seal the version into its
one file and verifies it, so the next open only registers it. A file loaded with
`dorafs-admin load` is sealed and verified at its first open.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass

import trio
import xxhash

from dorafs.fuse import protocol as p
from dorafs.fuse.metrics import PASSTHROUGH_FILES, PASSTHROUGH_OPENS
from dorafs.fuse.types import FUSEError

log = logging.getLogger(__name__)

# Why an open was not handed to the kernel (the label of the metric).
OFF = "off"  # -o passthrough=0
NOT_GRANTED = "not_granted"  # the kernel did not grant FUSE_PASSTHROUGH at INIT
NOT_PERMITTED = "not_permitted"  # registering failed with EPERM (not root)
WRITING = "writing"  # open for writing, or the file is staged
OTHER_VERSION = "other_version"  # another open of the inode reads another version
CACHED_OPEN = "cached_open"  # another open of the inode uses the kernel's page cache
NOT_CACHED = "not_cached"  # no worker on this machine holds all of the version
UNREADABLE = "unreadable"  # the worker's file cannot be opened here
CORRUPT = "corrupt"  # a page of it did not match its checksum
SMALL = "small"  # smaller than passthrough_min_size
CONFLICT = "conflict"  # refused: the inode is read through passthrough, this open could not be
FAILED = "failed"  # registering failed otherwise
GRANTED = "granted"
REASONS = (GRANTED, OFF, NOT_GRANTED, NOT_PERMITTED, WRITING, OTHER_VERSION, CACHED_OPEN, NOT_CACHED,
           UNREADABLE, CORRUPT, FAILED, SMALL, CONFLICT)
for _reason in REASONS:
    PASSTHROUGH_OPENS.labels(_reason)

_MESSAGES = {
    OFF: "passthrough=0",
    NOT_GRANTED: "the kernel did not grant FUSE passthrough (kernel before 6.9, or not asked: not root)",
    NOT_PERMITTED: "registering a backing file was refused (EPERM: the mount lacks CAP_SYS_ADMIN)",
    WRITING: "the file is open for writing or staged",
    OTHER_VERSION: "another open of the file reads another version",
    CACHED_OPEN: "another open of the file uses the kernel's page cache",
    NOT_CACHED: "the version is not wholly cached by a worker on this machine",
    UNREADABLE: "the worker's object file cannot be read by this mount",
    CORRUPT: "a page of the worker's object file did not match its checksum",
    FAILED: "registering the backing file failed",
    SMALL: "the file is smaller than passthrough_min_size",
}

VERIFY_THREADS = 2  # checksum passes over object files at once
PREPARING = 2  # files sealed and verified ahead of their next open, at once
VERIFIED_KEPT = 100_000  # object files remembered as verified (their device and inode)
_CHUNK = 8 << 20


class Fallback(Exception):
    """This open is served by the read path; `reason` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Backing:
    """One registered backing file: shared by the opens of one inode and version."""

    backing_id: int
    fd: int
    version: str
    size: int
    opens: int = 0


def verify(fd: int, size: int, page_size: int, checksums: list[str]) -> int | None:
    """Check every page of an object file; the index of the first bad page, or None."""
    if os.fstat(fd).st_size != size:
        return 0
    buf = bytearray(max(page_size, 1))
    view = memoryview(buf)
    for index, expected in enumerate(checksums):
        length = min(page_size, size - index * page_size)
        part = view[:length]
        got = os.preadv(fd, [part], index * page_size)
        if got != length or xxhash.xxh3_64_hexdigest(part) != expected:
            return index
    return None


class Passthrough:
    """The backing files this mount registered, by inode, and the decision per open."""

    def __init__(self, client, enabled: bool, min_size: int = 0):
        self.client = client
        self.enabled = enabled
        self.min_size = min_size
        self.device: int | None = None  # the /dev/fuse descriptor, once the session runs
        self.granted = False
        self.by_inode: dict[int, Backing] = {}
        self._verified: OrderedDict[tuple[int, int], str] = OrderedDict()  # (st_dev, st_ino) -> version
        self._preparing: set[tuple[str, str]] = set()
        self._prepare_limiter = trio.CapacityLimiter(PREPARING)
        self._nursery: trio.Nursery | None = None
        self._logged: set[str] = set()
        self._permitted = True
        self._limiter = trio.CapacityLimiter(VERIFY_THREADS)
        PASSTHROUGH_FILES.set_function(lambda: len(self.by_inode))

    def started(self, device: int, negotiated, nursery: trio.Nursery | None = None) -> None:
        """The session is up: may the kernel take backing files? (`nursery` runs the
        preparation of files read to their end.)"""
        self.device = device
        self._nursery = nursery
        self.granted = bool(negotiated is not None and negotiated.granted(p.PASSTHROUGH)
                            and negotiated.max_stack_depth > 0)
        if self.enabled:
            log.info("passthrough of wholly cached files: %s", "granted by the kernel" if self.granted
                     else "not granted; every read goes through the mount")

    def fallback(self, reason: str, detail: str = "") -> None:
        """Count an open served by the read path; log its reason once per mount."""
        PASSTHROUGH_OPENS.labels(reason).inc()
        if reason not in self._logged and reason != OFF:
            self._logged.add(reason)
            log.info("an open is served without passthrough: %s%s (logged once per mount)",
                     _MESSAGES.get(reason, reason), f" ({detail})" if detail else "")

    def conflict(self, what: str) -> None:
        """Refuse an open (EBUSY) the kernel cannot take beside the inode's passthrough
        opens: it fails every open of such an inode that is not passthrough with EIO."""
        PASSTHROUGH_OPENS.labels(CONFLICT).inc()
        if CONFLICT not in self._logged:
            self._logged.add(CONFLICT)
            log.warning("an open for %s of a file the kernel reads through passthrough is refused "
                        "with EBUSY until its passthrough opens are closed (logged once per mount)", what)
        raise FUSEError(errno.EBUSY)

    def holds(self, inode: int) -> bool:
        return inode in self.by_inode

    async def open(self, inode: int, f) -> int:
        """The backing id for a read-only open of pinned version `f` of `inode`, registered
        now or shared; raises Fallback."""
        if not self.enabled:
            raise Fallback(OFF)
        if not self.granted:
            raise Fallback(NOT_GRANTED)
        if not self._permitted:
            raise Fallback(NOT_PERMITTED)
        if f.status.size < self.min_size:
            raise Fallback(SMALL)
        version = f.status.version
        held = self.by_inode.get(inode)
        if held is not None:
            if held.version != version:
                raise Fallback(OTHER_VERSION)
            held.opens += 1
            PASSTHROUGH_OPENS.labels(GRANTED).inc()
            return held.backing_id
        whole = await self.client.whole_file(f)
        if whole is None or whole.get("size") != f.status.size:
            raise Fallback(NOT_CACHED)
        try:
            fd = os.open(whole["path"], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Fallback(NOT_CACHED, "evicted meanwhile") from None
        except OSError as exc:
            raise Fallback(UNREADABLE, f"{whole['path']}: {exc.strerror}") from None
        try:
            backing_id = await self._register(fd, whole, version)
        except BaseException:
            os.close(fd)
            raise
        held = self.by_inode.get(inode)
        if held is not None:  # another open of it registered meanwhile
            self._close_id(backing_id)
            os.close(fd)
            if held.version != version:
                raise Fallback(OTHER_VERSION)
            held.opens += 1
            PASSTHROUGH_OPENS.labels(GRANTED).inc()
            return held.backing_id
        self.by_inode[inode] = Backing(backing_id, fd, version, f.status.size, 1)
        PASSTHROUGH_OPENS.labels(GRANTED).inc()
        return backing_id

    async def _register(self, fd: int, whole: dict, version: str) -> int:
        fcntl.flock(fd, fcntl.LOCK_SH)  # never waits long: the worker only tries LOCK_EX|LOCK_NB
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise Fallback(NOT_CACHED, "evicted meanwhile")
        bad = await self._verify(fd, st, whole, version)
        if bad is not None:
            raise Fallback(CORRUPT, f"page {bad} of {whole['path']}")
        arg = bytearray(p.BACKING_MAP.struct.pack(fd, 0))
        try:
            backing_id = fcntl.ioctl(self.device, p.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self._permitted = False
                raise Fallback(NOT_PERMITTED) from None
            raise Fallback(FAILED, os.strerror(exc.errno or errno.EIO)) from None
        if backing_id <= 0:
            raise Fallback(FAILED, f"backing id {backing_id}")
        return backing_id

    async def _verify(self, fd: int, st: os.stat_result, whole: dict, version: str) -> int | None:
        """Check the object file open at `fd` once per file: the first bad page, or None."""
        key = (st.st_dev, st.st_ino)
        if self._verified.get(key) == version:
            self._verified.move_to_end(key)
            return None
        bad = await trio.to_thread.run_sync(verify, fd, int(whole["size"]), int(whole["page_size"]),
                                            list(whole["checksums"]), limiter=self._limiter)
        if bad is None:
            self._verified[key] = version
            while len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
        return bad

    def prepare_soon(self, f) -> None:
        """In the background: have the worker seal pinned version `f` (read to its end
        through the mount) into one file, and verify it, so its next open is handed over
        at once."""
        key = (f.uri, f.status.version)
        if (not self.enabled or not self.granted or not self._permitted or self._nursery is None
                or f.status.size < self.min_size or key in self._preparing):
            return
        self._preparing.add(key)
        self._nursery.start_soon(self._prepare, f, key)

    async def _prepare(self, f, key) -> None:
        try:
            async with self._prepare_limiter:
                whole = await self.client.whole_file(f)
                if whole is None or whole.get("size") != f.status.size:
                    return
                try:
                    fd = os.open(whole["path"], os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return
                try:
                    await self._verify(fd, os.fstat(fd), whole, f.status.version)
                finally:
                    os.close(fd)
        except Exception as exc:  # the next open tries again, and says why it could not
            log.debug("preparing %s for passthrough: %s", f.uri, exc)
        finally:
            self._preparing.discard(key)

    def release(self, inode: int) -> None:
        """One passthrough open of `inode` ended; the last one closes the backing id."""
        held = self.by_inode.get(inode)
        if held is None:
            return
        held.opens -= 1
        if held.opens > 0:
            return
        del self.by_inode[inode]
        self._close_id(held.backing_id)
        os.close(held.fd)  # lets go of the flock: the worker may give the bytes back

    def _close_id(self, backing_id: int) -> None:
        if self.device is None:
            return
        try:
            fcntl.ioctl(self.device, p.DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))
        except OSError as exc:  # unmounted meanwhile: the kernel dropped it already
            log.debug("closing backing id %d: %s", backing_id, exc)

    def close(self) -> None:
        for inode in list(self.by_inode):
            held = self.by_inode.pop(inode)
            self._close_id(held.backing_id)
            os.close(held.fd)
