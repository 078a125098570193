"""The FUSE kernel protocol's structures, opcodes and flags (protocol 7.45).

Written from the kernel's `include/uapi/linux/fuse.h`. Every structure is little-endian,
packed to 64-bit boundaries, and described here as a `Layout`: an ordered list of fields
whose `struct.Struct` the session packs and unpacks; tests/test_fuse_protocol.py checks
sizes and offsets against the kernel's definitions. Nothing here does I/O.

Subtleties:
- `fuse_init_in` grew over time: a kernel before 7.36 sends only its first 16 bytes, and
  `flags2` (bits 32..63 of the flags) is valid only when FUSE_INIT_EXT is among its flags.
- The reply to INIT is as long as the minor version the kernel speaks allows; 7.23 and
  later take the full 64-byte `fuse_init_out`.
- A directory entry is padded to 8 bytes; READDIRPLUS entries carry a `fuse_entry_out`
  before it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
ROOT_ID = 1
MIN_READ_BUFFER = 8192


@dataclass(frozen=True)
class Layout:
    """One C structure: its fields in order, each with a `struct` format code."""

    name: str
    fields: tuple[tuple[str, str], ...]

    def __post_init__(self):
        object.__setattr__(self, "struct", struct.Struct("<" + "".join(f for _, f in self.fields)))

    @property
    def size(self) -> int:
        return self.struct.size

    def offset(self, field: str) -> int:
        """Byte offset of `field` (for tests and readers of the layout)."""
        fmt = "<"
        for name, code in self.fields:
            if name == field:
                return struct.calcsize(fmt)
            fmt += code
        raise KeyError(field)

    def names(self) -> list[str]:
        return [n for n, c in self.fields if not c.endswith("x")]


def _layout(name: str, *fields: str) -> Layout:
    """`_layout("x", "a:Q", "b:I", "pad:4x")`"""
    return Layout(name, tuple(tuple(f.split(":")) for f in fields))


IN_HEADER = _layout("fuse_in_header", "len:I", "opcode:I", "unique:Q", "nodeid:Q", "uid:I", "gid:I",
                    "pid:I", "total_extlen:H", "padding:2x")
OUT_HEADER = _layout("fuse_out_header", "len:I", "error:i", "unique:Q")
ATTR = _layout("fuse_attr", "ino:Q", "size:Q", "blocks:Q", "atime:Q", "mtime:Q", "ctime:Q",
               "atimensec:I", "mtimensec:I", "ctimensec:I", "mode:I", "nlink:I", "uid:I", "gid:I",
               "rdev:I", "blksize:I", "flags:I")
_ATTR_FIELDS = tuple((f"attr.{n}", c) for n, c in ATTR.fields)
ENTRY_OUT = Layout("fuse_entry_out", (("nodeid", "Q"), ("generation", "Q"), ("entry_valid", "Q"),
                                      ("attr_valid", "Q"), ("entry_valid_nsec", "I"),
                                      ("attr_valid_nsec", "I")) + _ATTR_FIELDS)
ATTR_OUT = Layout("fuse_attr_out", (("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("dummy", "4x"))
                  + _ATTR_FIELDS)
INIT_IN = _layout("fuse_init_in", "major:I", "minor:I", "max_readahead:I", "flags:I", "flags2:I",
                  "unused:44x")
INIT_IN_COMPAT_SIZE = 16  # what a kernel before 7.36 sends
INIT_OUT = _layout("fuse_init_out", "major:I", "minor:I", "max_readahead:I", "flags:I",
                   "max_background:H", "congestion_threshold:H", "max_write:I", "time_gran:I",
                   "max_pages:H", "map_alignment:H", "flags2:I", "max_stack_depth:I",
                   "request_timeout:H", "unused:22x")
INIT_OUT_COMPAT_SIZE = 8  # a kernel before 7.5 takes this much
INIT_OUT_COMPAT_22_SIZE = 24  # before 7.23
OPEN_IN = _layout("fuse_open_in", "flags:I", "open_flags:I")
OPEN_OUT = _layout("fuse_open_out", "fh:Q", "open_flags:I", "backing_id:i")
CREATE_IN = _layout("fuse_create_in", "flags:I", "mode:I", "umask:I", "open_flags:I")
MKNOD_IN = _layout("fuse_mknod_in", "mode:I", "rdev:I", "umask:I", "padding:4x")
MKDIR_IN = _layout("fuse_mkdir_in", "mode:I", "umask:I")
RENAME_IN = _layout("fuse_rename_in", "newdir:Q")
RENAME2_IN = _layout("fuse_rename2_in", "newdir:Q", "flags:I", "padding:4x")
LINK_IN = _layout("fuse_link_in", "oldnodeid:Q")
GETATTR_IN = _layout("fuse_getattr_in", "getattr_flags:I", "dummy:4x", "fh:Q")
SETATTR_IN = _layout("fuse_setattr_in", "valid:I", "padding:4x", "fh:Q", "size:Q", "lock_owner:Q",
                     "atime:Q", "mtime:Q", "ctime:Q", "atimensec:I", "mtimensec:I", "ctimensec:I",
                     "mode:I", "unused4:4x", "uid:I", "gid:I", "unused5:4x")
READ_IN = _layout("fuse_read_in", "fh:Q", "offset:Q", "size:I", "read_flags:I", "lock_owner:Q",
                  "flags:I", "padding:4x")
WRITE_IN = _layout("fuse_write_in", "fh:Q", "offset:Q", "size:I", "write_flags:I", "lock_owner:Q",
                   "flags:I", "padding:4x")
WRITE_IN_COMPAT_SIZE = 24
WRITE_OUT = _layout("fuse_write_out", "size:I", "padding:4x")
RELEASE_IN = _layout("fuse_release_in", "fh:Q", "flags:I", "release_flags:I", "lock_owner:Q")
FLUSH_IN = _layout("fuse_flush_in", "fh:Q", "unused:4x", "padding:4x", "lock_owner:Q")
FSYNC_IN = _layout("fuse_fsync_in", "fh:Q", "fsync_flags:I", "padding:4x")
FORGET_IN = _layout("fuse_forget_in", "nlookup:Q")
FORGET_ONE = _layout("fuse_forget_one", "nodeid:Q", "nlookup:Q")
BATCH_FORGET_IN = _layout("fuse_batch_forget_in", "count:I", "dummy:4x")
INTERRUPT_IN = _layout("fuse_interrupt_in", "unique:Q")
ACCESS_IN = _layout("fuse_access_in", "mask:I", "padding:4x")
SETXATTR_IN = _layout("fuse_setxattr_in", "size:I", "flags:I", "setxattr_flags:I", "padding:4x")
SETXATTR_IN_COMPAT_SIZE = 8  # what the kernel sends unless SETXATTR_EXT was granted
GETXATTR_IN = _layout("fuse_getxattr_in", "size:I", "padding:4x")
GETXATTR_OUT = _layout("fuse_getxattr_out", "size:I", "padding:4x")
KSTATFS = _layout("fuse_kstatfs", "blocks:Q", "bfree:Q", "bavail:Q", "files:Q", "ffree:Q", "bsize:I",
                  "namelen:I", "frsize:I", "padding:4x", "spare:24x")
STATFS_OUT = Layout("fuse_statfs_out", tuple((f"st.{n}", c) for n, c in KSTATFS.fields))
DIRENT = _layout("fuse_dirent", "ino:Q", "off:Q", "namelen:I", "type:I")
DIRENTPLUS = Layout("fuse_direntplus", tuple((f"entry_out.{n}", c) for n, c in ENTRY_OUT.fields)
                    + tuple((f"dirent.{n}", c) for n, c in DIRENT.fields))
NOTIFY_INVAL_INODE_OUT = _layout("fuse_notify_inval_inode_out", "ino:Q", "off:q", "len:q")
NOTIFY_INVAL_ENTRY_OUT = _layout("fuse_notify_inval_entry_out", "parent:Q", "namelen:I", "flags:I")
NOTIFY_DELETE_OUT = _layout("fuse_notify_delete_out", "parent:Q", "child:Q", "namelen:I", "padding:4x")
BACKING_MAP = _layout("fuse_backing_map", "fd:i", "flags:I", "padding:8x")

LAYOUTS = [v for v in dict(globals()).values() if isinstance(v, Layout)]


def dirent_size(namelen: int, plus: bool) -> int:
    """Bytes one directory entry takes in a READDIR(PLUS) reply, padded to 8."""
    base = DIRENTPLUS.size if plus else DIRENT.size
    return (base + namelen + 7) & ~7


# -- opcodes (enum fuse_opcode) -------------------------------------------------------

_names = set(globals()) | {"_names"}
LOOKUP = 1
FORGET = 2  # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42  # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
COPY_FILE_RANGE_64 = 53

OPCODE_NAMES = {globals()[k]: k for k in set(globals()) - _names}

# -- notification codes (enum fuse_notify_code), sent as the error of a unique-0 header --

NOTIFY_POLL = 1
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4
NOTIFY_RETRIEVE = 5
NOTIFY_DELETE = 6
NOTIFY_RESEND = 7
NOTIFY_INC_EPOCH = 8

# -- INIT flags: bits 0..31 in `flags`, 32..63 in `flags2` ------------------------------

_names = set(globals()) | {"_names"}
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

INIT_FLAG_NAMES = {globals()[k]: k for k in set(globals()) - _names}
del _names


def flag_names(flags: int) -> list[str]:
    return [INIT_FLAG_NAMES.get(1 << b, f"bit{b}") for b in range(64) if flags >> b & 1]


# -- other flags ----------------------------------------------------------------------

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags
RELEASE_FLUSH = 1 << 0  # fuse_release_in.release_flags
FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
WRITE_CACHE = 1 << 0  # fuse_write_in.write_flags
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags

UNIQUE_RESEND = 1 << 63  # set in a request's unique when the kernel resends it

# Device ioctls: _IOR(229, 0, uint32_t) and, for passthrough, _IOW(229, 1, fuse_backing_map)
# and _IOW(229, 2, uint32_t).
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (229 << 8) | number


DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)
