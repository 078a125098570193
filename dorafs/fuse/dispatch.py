"""Decoding each kernel request into a call of the adapter, and encoding its answer.

`Dispatcher.handlers` maps an opcode to a coroutine taking the request's header fields
and argument bytes and returning the reply's payload (a buffer, a tuple of buffers, or
None for an empty reply); the session writes it after an out header. The adapter's
methods keep the shape of the operations they serve (`lookup(parent_inode, name, ctx)`,
`read(fh, off, size)`...), take and return the plain types of dorafs/fuse/types.py, and
raise `FUSEError` (their error boundary, dorafs/fuse/errors.py, makes sure of that). A
method the adapter lacks answers ENOSYS, which tells the kernel not to ask again where
the protocol allows it (xattrs, access, locks...).

Subtleties:
- Names arrive NUL-terminated; RENAME carries two, one after the other.
- A read's payload is whatever buffer the adapter returned (a memoryview of the page
  buffer, usually): it is written by the session before anything else runs, so it may
  be a view of memory that is reused later.
- READDIRPLUS entries each take a lookup reference on their inode (the kernel will
  FORGET them); plain READDIR entries take none. `DirectoryReply.plus` says which.
"""

from __future__ import annotations

import errno
import stat

from dorafs.fuse import protocol as p
from dorafs.fuse.types import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields

_NS = 1_000_000_000
_unpack_read = p.READ_IN.struct.unpack_from
_unpack_write = p.WRITE_IN.struct.unpack_from
_pack_entry = p.ENTRY_OUT.struct.pack
_pack_entry_into = p.ENTRY_OUT.struct.pack_into
_pack_attr_out = p.ATTR_OUT.struct.pack
_pack_open = p.OPEN_OUT.struct.pack
_pack_dirent_into = p.DIRENT.struct.pack_into


def _seconds(timeout: float) -> tuple[int, int]:
    if timeout <= 0:
        return 0, 0
    whole = int(timeout)
    return whole, int((timeout - whole) * _NS)


def _attr_fields(a: EntryAttributes) -> tuple:
    at, mt, ct = a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns
    return (a.st_ino, a.st_size, a.st_blocks, at // _NS, mt // _NS, ct // _NS, at % _NS, mt % _NS,
            ct % _NS, a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_blksize, 0)


def entry_out(a: EntryAttributes) -> bytes:
    """A `fuse_entry_out`; st_ino 0 is a negative entry the kernel keeps for entry_timeout."""
    es, ens = _seconds(a.entry_timeout)
    if not a.st_ino:
        return _pack_entry(0, 0, es, 0, ens, 0, *([0] * 16))
    as_, ans = _seconds(a.attr_timeout)
    return _pack_entry(a.st_ino, a.generation, es, as_, ens, ans, *_attr_fields(a))


def attr_out(a: EntryAttributes) -> bytes:
    as_, ans = _seconds(a.attr_timeout)
    return _pack_attr_out(as_, ans, *_attr_fields(a))


def open_out(info: FileInfo | int) -> bytes:
    if isinstance(info, int):  # opendir answers a bare handle
        return _pack_open(info, 0, 0)
    if info.backing_id:  # never with KEEP_CACHE (the kernel fails such an open with EIO)
        return _pack_open(info.fh, p.FOPEN_PASSTHROUGH | (p.FOPEN_NONSEEKABLE if info.nonseekable else 0),
                          info.backing_id)
    flags = ((p.FOPEN_DIRECT_IO if info.direct_io else 0) | (p.FOPEN_KEEP_CACHE if info.keep_cache else 0)
             | (p.FOPEN_NONSEEKABLE if info.nonseekable else 0))
    return _pack_open(info.fh, flags, 0)


class DirectoryReply:
    """The entries of one READDIR(PLUS) reply, packed as the adapter adds them."""

    __slots__ = ("plus", "size", "buf", "used")

    def __init__(self, size: int, plus: bool):
        self.plus = plus
        self.size = size
        self.buf = bytearray(size)
        self.used = 0

    def add(self, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
        """Add one entry; False (and nothing added) when the reply is full. `next_id` is
        the offset the kernel passes back to continue after this entry."""
        need = p.dirent_size(len(name), self.plus)
        if self.used + need > self.size:
            return False
        at = self.used
        if self.plus:
            self.buf[at:at + p.ENTRY_OUT.size] = entry_out(attr)
            at += p.ENTRY_OUT.size
        _pack_dirent_into(self.buf, at, attr.st_ino, next_id, len(name), stat.S_IFMT(attr.st_mode) >> 12)
        at += p.DIRENT.size
        self.buf[at:at + len(name)] = name
        self.used += need
        return True

    def payload(self) -> memoryview:
        return memoryview(self.buf)[:self.used]


def _name(body: memoryview, start: int = 0) -> bytes:
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _two_names(body: memoryview, start: int) -> tuple[bytes, bytes]:
    raw = bytes(body[start:])
    first, _, rest = raw.partition(b"\0")
    return first, rest.partition(b"\0")[0]


def _ctx(h: tuple, umask: int = 0) -> RequestContext:
    return RequestContext(h[4], h[5], h[6], umask)


class Dispatcher:
    """Requests of one session to the methods of one adapter."""

    def __init__(self, operations):
        self.ops = operations
        table = {  # opcode -> coroutine(header fields, argument bytes) -> payload
            p.LOOKUP: self._lookup, p.GETATTR: self._getattr, p.SETATTR: self._setattr,
            p.MKNOD: self._mknod, p.MKDIR: self._mkdir, p.UNLINK: self._unlink, p.RMDIR: self._rmdir,
            p.SYMLINK: self._symlink, p.RENAME: self._rename, p.RENAME2: self._rename2, p.LINK: self._link,
            p.OPEN: self._open, p.READ: self._read, p.WRITE: self._write, p.STATFS: self._statfs,
            p.RELEASE: self._release, p.FSYNC: self._fsync, p.FLUSH: self._flush,
            p.OPENDIR: self._opendir, p.READDIR: self._readdir, p.READDIRPLUS: self._readdirplus,
            p.RELEASEDIR: self._releasedir, p.FSYNCDIR: self._fsyncdir, p.CREATE: self._create,
            p.SETXATTR: self._setxattr, p.GETXATTR: self._getxattr, p.LISTXATTR: self._listxattr,
            p.REMOVEXATTR: self._removexattr, p.ACCESS: self._access, p.READLINK: self._readlink,
        }
        self.handlers = table

    def _method(self, name: str):
        fn = getattr(self.ops, name, None)
        if fn is None:
            raise FUSEError(errno.ENOSYS)
        return fn

    async def forget(self, items: list[tuple[int, int]]) -> None:
        fn = getattr(self.ops, "forget", None)
        if fn is not None:
            await fn(items)

    # -- namespace --------------------------------------------------------------------

    async def _lookup(self, h, body):
        return entry_out(await self._method("lookup")(h[3], _name(body), _ctx(h)))

    async def _getattr(self, h, body):
        return attr_out(await self._method("getattr")(h[3], _ctx(h)))

    async def _setattr(self, h, body):
        (valid, fh, size, _owner, atime, mtime, ctime, atimens, mtimens, ctimens, mode, uid,
         gid) = p.SETATTR_IN.struct.unpack_from(body)
        attr = EntryAttributes(st_size=size, st_mode=mode, st_uid=uid, st_gid=gid,
                               st_atime_ns=atime * _NS + atimens, st_mtime_ns=mtime * _NS + mtimens,
                               st_ctime_ns=ctime * _NS + ctimens)
        fields = SetattrFields(
            update_mode=bool(valid & p.FATTR_MODE), update_uid=bool(valid & p.FATTR_UID),
            update_gid=bool(valid & p.FATTR_GID), update_size=bool(valid & p.FATTR_SIZE),
            update_atime=bool(valid & (p.FATTR_ATIME | p.FATTR_ATIME_NOW)),
            update_mtime=bool(valid & (p.FATTR_MTIME | p.FATTR_MTIME_NOW)),
            update_ctime=bool(valid & p.FATTR_CTIME))
        handle = fh if valid & p.FATTR_FH else None
        return attr_out(await self._method("setattr")(h[3], attr, fields, handle, _ctx(h)))

    async def _mknod(self, h, body):
        mode, rdev, umask = p.MKNOD_IN.struct.unpack_from(body)
        name = _name(body, p.MKNOD_IN.size)
        return entry_out(await self._method("mknod")(h[3], name, mode, rdev, _ctx(h, umask)))

    async def _mkdir(self, h, body):
        mode, umask = p.MKDIR_IN.struct.unpack_from(body)
        name = _name(body, p.MKDIR_IN.size)
        return entry_out(await self._method("mkdir")(h[3], name, mode | stat.S_IFDIR, _ctx(h, umask)))

    async def _unlink(self, h, body):
        await self._method("unlink")(h[3], _name(body), _ctx(h))

    async def _rmdir(self, h, body):
        await self._method("rmdir")(h[3], _name(body), _ctx(h))

    async def _symlink(self, h, body):
        name, target = _two_names(body, 0)
        return entry_out(await self._method("symlink")(h[3], name, target, _ctx(h)))

    async def _rename(self, h, body):
        (newdir,) = p.RENAME_IN.struct.unpack_from(body)
        old, new = _two_names(body, p.RENAME_IN.size)
        await self._method("rename")(h[3], old, newdir, new, 0, _ctx(h))

    async def _rename2(self, h, body):
        newdir, flags = p.RENAME2_IN.struct.unpack_from(body)
        old, new = _two_names(body, p.RENAME2_IN.size)
        await self._method("rename")(h[3], old, newdir, new, flags, _ctx(h))

    async def _link(self, h, body):
        (old,) = p.LINK_IN.struct.unpack_from(body)
        return entry_out(await self._method("link")(old, h[3], _name(body, p.LINK_IN.size), _ctx(h)))

    async def _readlink(self, h, body):
        return await self._method("readlink")(h[3], _ctx(h))

    async def _statfs(self, h, body):
        s = await self._method("statfs")(_ctx(h))
        return p.STATFS_OUT.struct.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                        s.f_bsize, s.f_namemax, s.f_frsize)

    async def _access(self, h, body):
        (mask,) = p.ACCESS_IN.struct.unpack_from(body)
        await self._method("access")(h[3], mask, _ctx(h))

    # -- files ------------------------------------------------------------------------

    async def _open(self, h, body):
        flags, _ = p.OPEN_IN.struct.unpack_from(body)
        return open_out(await self._method("open")(h[3], flags, _ctx(h)))

    async def _create(self, h, body):
        flags, mode, umask, _ = p.CREATE_IN.struct.unpack_from(body)
        name = _name(body, p.CREATE_IN.size)
        info, attr = await self._method("create")(h[3], name, mode, flags, _ctx(h, umask))
        return entry_out(attr), open_out(info)

    async def _read(self, h, body):
        fh, offset, size, _, _, _ = _unpack_read(body)
        return await self.ops.read(fh, offset, size)

    async def _write(self, h, body):
        fh, offset, size, _, _, _ = _unpack_write(body)
        data = body[p.WRITE_IN.size:p.WRITE_IN.size + size]
        written = await self.ops.write(fh, offset, data)
        return p.WRITE_OUT.struct.pack(written)

    async def _release(self, h, body):
        fh, _, _, _ = p.RELEASE_IN.struct.unpack_from(body)
        await self._method("release")(fh)

    async def _flush(self, h, body):
        fh, _ = p.FLUSH_IN.struct.unpack_from(body)
        await self._method("flush")(fh)

    async def _fsync(self, h, body):
        fh, flags = p.FSYNC_IN.struct.unpack_from(body)
        await self._method("fsync")(fh, bool(flags & p.FSYNC_FDATASYNC))

    # -- directories ------------------------------------------------------------------

    async def _opendir(self, h, body):
        return open_out(await self._method("opendir")(h[3], _ctx(h)))

    async def _readdir(self, h, body, plus: bool = False):
        fh, offset, size, _, _, _ = _unpack_read(body)
        reply = DirectoryReply(size, plus)
        await self._method("readdir")(fh, offset, reply)
        return reply.payload()

    async def _readdirplus(self, h, body):
        return await self._readdir(h, body, plus=True)

    async def _releasedir(self, h, body):
        fh, _, _, _ = p.RELEASE_IN.struct.unpack_from(body)
        await self._method("releasedir")(fh)

    async def _fsyncdir(self, h, body):
        fh, flags = p.FSYNC_IN.struct.unpack_from(body)
        await self._method("fsyncdir")(fh, bool(flags & p.FSYNC_FDATASYNC))

    # -- extended attributes ------------------------------------------------------------

    async def _setxattr(self, h, body):
        (size,) = p.GETXATTR_IN.struct.unpack_from(body)  # the compat setxattr_in begins the same
        name = _name(body, p.SETXATTR_IN_COMPAT_SIZE)
        start = p.SETXATTR_IN_COMPAT_SIZE + len(name) + 1
        value = bytes(body[start:start + size])
        await self._method("setxattr")(h[3], name, value, _ctx(h))

    async def _getxattr(self, h, body):
        (size,) = p.GETXATTR_IN.struct.unpack_from(body)
        value = await self._method("getxattr")(h[3], _name(body, p.GETXATTR_IN.size), _ctx(h))
        return _xattr_reply(value, size)

    async def _listxattr(self, h, body):
        (size,) = p.GETXATTR_IN.struct.unpack_from(body)
        names = await self._method("listxattr")(h[3], _ctx(h))
        return _xattr_reply(b"".join(n + b"\0" for n in names), size)

    async def _removexattr(self, h, body):
        await self._method("removexattr")(h[3], _name(body), _ctx(h))


def _xattr_reply(value: bytes, size: int):
    if size == 0:
        return p.GETXATTR_OUT.struct.pack(len(value))
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value


def error_name(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "OK"

