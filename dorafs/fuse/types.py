"""What the FUSE operations take and answer, free of protocol bytes.

The session (dorafs/fuse/session.py) decodes each kernel request into these and encodes
the operations' answers; the adapter (operations.py, writing.py) sees only them.
"""

from __future__ import annotations

from dataclasses import dataclass

ROOT_INODE = 1
RENAME_NOREPLACE = 1 << 0  # rename2 flags, as in <linux/fs.h>
RENAME_EXCHANGE = 1 << 1


class FUSEError(Exception):
    """Answer the kernel request with this errno. Raising it is the adapter's way to say
    "this errno, on purpose": the error boundary passes it on without logging."""

    def __init__(self, errno: int, counted: bool = True):
        super().__init__(errno)
        self.errno = errno
        self.counted = counted  # False: an answer to the kernel itself, not an error an application sees

    def __str__(self) -> str:
        import os
        return os.strerror(self.errno)


@dataclass(slots=True)
class EntryAttributes:
    """An inode's attributes, and how long the kernel may keep them and its name."""

    st_ino: int = 0
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    st_mode: int = 0
    st_nlink: int = 0
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blksize: int = 0
    st_blocks: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0


@dataclass(slots=True)
class FileInfo:
    """An open file handle and how the kernel should cache its pages."""

    fh: int = 0
    keep_cache: bool = False
    direct_io: bool = False
    nonseekable: bool = False
    backing_id: int = 0  # not 0: the kernel reads this open from that backing file (passthrough)


@dataclass(slots=True)
class SetattrFields:
    """Which attributes a setattr changes."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


@dataclass(slots=True)
class StatvfsData:
    f_bsize: int = 0
    f_frsize: int = 0
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_favail: int = 0
    f_namemax: int = 0


@dataclass(slots=True)
class RequestContext:
    """Who asked: the caller's ids (and umask, for create, mknod and mkdir)."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0
