"""FUSE passthrough: object versions wholly cached on this node, read by the kernel itself.

When a read-only open holds a verified object file (objectfiles.py: a version wholly
cached by a worker on this machine, checked page by page against its checksums), the
mount registers that file with the kernel (`FUSE_DEV_IOC_BACKING_OPEN`, which answers a
backing id) and answers the open with FOPEN_PASSTHROUGH and that id. From then on the
kernel serves read, mmap and splice of that open file from the backing file: no READ
reaches the mount. Why the bytes are right is in objectfiles.py: the file is verified
before the kernel gets it, and never changes while it is held.

The kernel allows one backing file per inode: every open of the same inode and version
shares one backing id (a second registration would fail the open with EIO), and the id
is closed at the last release. While an inode has passthrough opens, the kernel fails
every open of it that is not passthrough with EIO (fs/fuse/iomode.c): so an open of
another version or for writing gives the name a new inode (operations.py `_new_inode`:
counted as `new_inode`, logged once), and the passthrough opens read on from the old one,
as after an unlink. An inode with opens that use the kernel's page cache gets no
passthrough open.

Every open that could not be handed over is served by the mount (from its held object
file when it has one, else by the page path); why is counted
(`dorafs_mount_passthrough_opens_total{result}`) and logged once per mount.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct
from dataclasses import dataclass

from dorafs.fuse import protocol as p
from dorafs.fuse.metrics import PASSTHROUGH_FILES, PASSTHROUGH_OPENS
from dorafs.fuse.objectfiles import CORRUPT, NOT_CACHED, SMALL, TOO_MANY, UNREADABLE, Fallback, HeldFile

log = logging.getLogger(__name__)

# Why an open was not handed to the kernel (the label of the metric); objectfiles.py
# has those of files not held at all (NOT_CACHED, UNREADABLE, CORRUPT, SMALL, TOO_MANY).
OFF = "off"  # -o passthrough=0
NOT_GRANTED = "not_granted"  # the kernel did not grant FUSE_PASSTHROUGH at INIT
NOT_PERMITTED = "not_permitted"  # registering failed with EPERM (not root)
WRITING = "writing"  # open for writing, or the file is staged
OTHER_VERSION = "other_version"  # another open of the inode reads another version
CACHED_OPEN = "cached_open"  # another open of the inode uses the kernel's page cache
KERNEL_PAGES = "kernel_pages"  # the kernel holds this version's pages, and the file's readers read them
NEW_INODE = "new_inode"  # the inode is read through passthrough, this open could not be: a new inode
FAILED = "failed"  # registering failed otherwise
GRANTED = "granted"
REASONS = (GRANTED, OFF, NOT_GRANTED, NOT_PERMITTED, WRITING, OTHER_VERSION, CACHED_OPEN, KERNEL_PAGES, NOT_CACHED,
           UNREADABLE, CORRUPT, FAILED, SMALL, TOO_MANY, NEW_INODE)
for _reason in REASONS:
    PASSTHROUGH_OPENS.labels(_reason)

_MESSAGES = {
    OFF: "passthrough=0",
    NOT_GRANTED: "the kernel did not grant FUSE passthrough (kernel before 6.9, or not asked: not root)",
    NOT_PERMITTED: "registering a backing file was refused (EPERM: the mount lacks CAP_SYS_ADMIN)",
    WRITING: "the file is open for writing or staged",
    OTHER_VERSION: "another open of the file reads another version",
    CACHED_OPEN: "another open of the file uses the kernel's page cache",
    KERNEL_PAGES: "the kernel's page cache holds the version, and the file's readers read it there "
                  "(footer first, or in small pieces)",
    NOT_CACHED: "the version is not wholly cached by a worker on this machine",
    UNREADABLE: "the worker's object file cannot be read by this mount",
    CORRUPT: "a page of the worker's object file did not match its checksum",
    FAILED: "registering the backing file failed",
    SMALL: "the file is smaller than passthrough_min_size",
    TOO_MANY: "as many object files are open as the mount's descriptor budget allows",
}

@dataclass
class Backing:
    """One registered backing file: shared by the opens of one inode and version."""

    backing_id: int
    version: str
    opens: int = 0


class Passthrough:
    """The backing files this mount registered, by inode, and the decision per open."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.device: int | None = None  # the /dev/fuse descriptor, once the session runs
        self.granted = False
        self.by_inode: dict[int, Backing] = {}
        self._logged: set[str] = set()
        self._permitted = True
        PASSTHROUGH_FILES.set_function(lambda: len(self.by_inode))

    def started(self, device: int, negotiated) -> None:
        """The session is up: may the kernel take backing files?"""
        self.device = device
        self.granted = bool(negotiated is not None and negotiated.granted(p.PASSTHROUGH)
                            and negotiated.max_stack_depth > 0)
        if self.enabled:
            log.info("passthrough of wholly cached files: %s", "granted by the kernel" if self.granted
                     else "not granted; every read goes through the mount")

    def fallback(self, reason: str, detail: str = "") -> None:
        """Count an open served by the mount; log its reason once per mount."""
        PASSTHROUGH_OPENS.labels(reason).inc()
        if reason not in self._logged and reason != OFF:
            self._logged.add(reason)
            log.info("an open is served without passthrough: %s%s (logged once per mount)",
                     _MESSAGES.get(reason, reason), f" ({detail})" if detail else "")

    def new_inode(self, what: str) -> None:
        """Count an open (for `what`) the kernel cannot take beside an inode's passthrough
        opens, which gives the name a new inode; log the first."""
        PASSTHROUGH_OPENS.labels(NEW_INODE).inc()
        if NEW_INODE not in self._logged:
            self._logged.add(NEW_INODE)
            log.info("an open for %s of a file the kernel reads through passthrough gets a new inode; "
                     "the passthrough opens read on from the old one (logged once per mount)", what)

    def holds(self, inode: int) -> bool:
        return inode in self.by_inode

    def unavailable(self) -> str | None:
        """Why this mount hands no file to the kernel at all, if it does not."""
        if not self.enabled:
            return OFF
        if not self.granted:
            return NOT_GRANTED
        if not self._permitted:
            return NOT_PERMITTED
        return None

    def register(self, inode: int, held: HeldFile) -> int:
        """The backing id for a read-only open of `inode` whose version is the verified
        object file `held`: registered now or shared; raises Fallback."""
        reason = self.unavailable()
        if reason is not None:
            raise Fallback(reason)
        version = held.key[1]
        backing = self.by_inode.get(inode)
        if backing is None:
            arg = bytearray(p.BACKING_MAP.struct.pack(held.fd, 0))
            try:
                backing_id = fcntl.ioctl(self.device, p.DEV_IOC_BACKING_OPEN, arg, True)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    self._permitted = False
                    raise Fallback(NOT_PERMITTED) from None
                raise Fallback(FAILED, f"{exc.strerror or exc}") from None
            if backing_id <= 0:
                raise Fallback(FAILED, f"backing id {backing_id}")
            backing = self.by_inode[inode] = Backing(backing_id, version)
        elif backing.version != version:
            raise Fallback(OTHER_VERSION)
        backing.opens += 1
        PASSTHROUGH_OPENS.labels(GRANTED).inc()
        return backing.backing_id

    def release(self, inode: int) -> None:
        """One passthrough open of `inode` ended; the last one closes the backing id."""
        backing = self.by_inode.get(inode)
        if backing is None:
            return
        backing.opens -= 1
        if backing.opens > 0:
            return
        del self.by_inode[inode]
        self._close_id(backing.backing_id)

    def _close_id(self, backing_id: int) -> None:
        if self.device is None:
            return
        try:
            fcntl.ioctl(self.device, p.DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))
        except OSError as exc:  # unmounted meanwhile: the kernel dropped it already
            log.debug("closing backing id %d: %s", backing_id, exc)

    def close(self) -> None:
        for inode in list(self.by_inode):
            self._close_id(self.by_inode.pop(inode).backing_id)
