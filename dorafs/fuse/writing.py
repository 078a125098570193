"""The changing half of the FUSE operations: writing files and the namespace.

Subtleties:
- A file open for writing has one `WriteFile` (dorafs/client/writes.py) on its node,
  shared by every handle of that inode, readers included; its size and mtime are the
  node's while it exists, even before the file is in the UFS.
- Uploads happen in `flush` (each close(2)) and `fsync`, whose errors reach the
  application. `release` uploads only what no flush did (writes through a mapping) and
  only if no upload failed, and logs its errors, since the kernel drops them.
- Namespace changes check the UFS itself (not the workers' caches) for existence and
  emptiness, go straight to the UFS, then invalidate the workers' entries and move the
  mount's own nodes. A renamed file or directory that is being written is uploaded
  first, so the UFS holds what is moved.
- An unlinked or replaced file that is open here for reading keeps its pages on the
  workers (the open handles still read that version); they age out of the caches as
  any other page. A new name too long for a path, a URI or an S3 key: ENAMETOOLONG.
- With `read_only` every change answers EROFS (the kernel, mounted `ro`, mostly does so
  before asking).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as _stat
import time
from dataclasses import replace

from dorafs.client.writes import WriteFile
from dorafs.errors import DoraError, Exists, IsADirectory, NotADirectory, NotEmpty, NotFound, StaleVersion
from dorafs.fuse.errors import fuse_operation
from dorafs.fuse.handles import NAME_MAX, FileHandle, too_long, valid_name
from dorafs.fuse.inodes import Node
from dorafs.fuse.metrics import UPLOAD_BYTES, UPLOADS, WRITE_BYTES
from dorafs.fuse.types import RENAME_NOREPLACE, FileInfo, FUSEError
from dorafs.ufs import FileStatus, join
from dorafs.ufs.base import NEW

log = logging.getLogger("dorafs.fuse.operations")


class WritingOperations:
    """Mixed into DoraOperations, whose state (client, config, inodes, staging, handles) it uses."""

    # -- writing files ----------------------------------------------------------------

    def _writable(self) -> None:
        if self.config.read_only:
            raise FUSEError(errno.EROFS)

    def _name(self, name: bytes) -> str:
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise FUSEError(errno.EINVAL) from None
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if not valid_name(text):
            raise FUSEError(errno.EINVAL)
        return text

    def _dir(self, inode: int) -> Node:
        node = self.inodes[inode]
        if not node.status.is_dir:
            raise NotADirectory(node.path)
        return node

    @staticmethod
    def _path(parent: Node, name: str) -> str:
        return f"{parent.path}/{name}" if parent.path else name

    def _new_path(self, parent: Node, name: str) -> str:
        """The path of a name being created: ENAMETOOLONG if no file could have it."""
        path = self._path(parent, name)
        if too_long(path, join(parent.uri, name)):
            raise FUSEError(errno.ENAMETOOLONG)
        return path

    @staticmethod
    def _subdirs_changed(directory: Node, change: int) -> None:
        if directory.subdirs is not None:
            directory.subdirs = max(0, directory.subdirs + change)

    @staticmethod
    def _read_here(node: Node | None) -> bool:
        """Whether a handle of this mount still reads the node's pinned version."""
        return node is not None and any(n > 0 for n in node.open_versions.values())

    async def _ufs_stat(self, uri: str) -> FileStatus | None:
        """The UFS's own answer (not a cached one): what a change must be checked against."""
        try:
            return await self.client.ufs.get(uri).stat(uri)
        except NotFound:
            return None

    async def _writer(self, node: Node, *, truncate: bool) -> WriteFile:
        """The node's WriteFile, created (and filled with the file's bytes unless
        `truncate`) if the file is not being written yet."""
        writer = node.writer
        if writer is None:
            writer = self.staging.open(node.uri, node.status.version or NEW)  # its commit's condition
            try:
                if not truncate:
                    await self._load(writer, node)
            except BaseException:
                await writer.close()
                raise
            if node.writer is not None:  # another open got there first
                await writer.close()
                writer = node.writer
            else:
                node.writer = writer
                self._writing.add(node)
        if truncate:
            await writer.truncate(0)
            writer.mtime = time.time()
        return writer

    async def _load(self, writer: WriteFile, node: Node) -> None:
        status = await self.client.stat(node.uri)
        try:
            await writer.load(self.client, status)
        except StaleVersion:  # changed since the workers last looked: ask the UFS
            status = await self.client.ufs.get(node.uri).stat(node.uri)
            await writer.load(self.client, status)
        if status.is_dir:
            raise IsADirectory(node.path)
        writer.dirty = False

    def _open_writer(self, node: Node, writer: WriteFile, flags: int) -> FileInfo:
        writer.handles += 1
        node.open_handles += 1
        node.kernel_version = None  # the next open of another version flushes the kernel's pages
        fh = next(self._numbers)
        self._handles[fh] = FileHandle(node, None, writer, append=bool(flags & os.O_APPEND))
        return FileInfo(fh=fh, keep_cache=False, direct_io=self.config.direct_io)

    async def _commit(self, node: Node, writer: WriteFile) -> None:
        """Upload the writer's bytes if changed; then the workers and the node see the new version."""
        try:
            status = await writer.commit()
        except DoraError:
            UPLOADS.labels("failed").inc()
            raise
        if status is None:
            return
        UPLOADS.labels("ok").inc()
        UPLOAD_BYTES.inc(status.size)
        node.kernel_version = None
        node.status = replace(status, name=node.status.name)
        await self.client.invalidate(writer.uri or node.uri, pages=True)

    async def _let_go(self, node: Node, writer: WriteFile, *, upload: bool) -> None:
        """One handle less on `writer`; the last one uploads what is left and drops it."""
        writer.handles -= 1
        if writer.handles > 0:
            return
        try:
            if upload and writer.dirty and writer.failed is None and writer.last_error is None:
                await self._commit(node, writer)
        except DoraError as exc:  # release's errors never reach the application
            log.warning("upload of %s when its last handle closed failed: %s", writer.uri, exc)
        finally:
            if node.writer is writer:
                node.writer = None
                self._writing.discard(node)
                node.status = replace(node.status, size=writer.size, mtime=writer.mtime)
            await writer.close()

    def _pending_children(self, directory: Node, listed: set[str]) -> list[FileStatus]:
        """Files in `directory` being written through this mount that the UFS lacks yet."""
        prefix = self._path(directory, "")
        found = []
        for node in self._writing:
            name = node.path[len(prefix):]
            if (node.path.startswith(prefix) and name and "/" not in name and name not in listed
                    and self.inodes.at(node.path) is node and node.writer.uri is not None):
                found.append(FileStatus(name=name, is_dir=False, size=node.writer.size, mtime=node.writer.mtime))
        return sorted(found, key=lambda e: e.name)

    @fuse_operation
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._writable()
        if not _stat.S_ISREG(mode):
            raise FUSEError(errno.ENOTSUP)
        parent = self._dir(parent_inode)
        text = self._name(name)
        node = self.inodes.at(self._new_path(parent, text))
        exists = node is not None and node.writer is not None
        if not exists:
            status = await self._ufs_stat(join(parent.uri, text))
            exists = status is not None
            if exists and status.is_dir:
                raise IsADirectory(self._path(parent, text))
            node = self.inodes.child(parent, text, status or FileStatus(name=text, is_dir=False, mtime=time.time()))
        if exists and flags & os.O_EXCL:
            raise Exists(self._path(parent, text))
        try:
            writer = await self._writer(node, truncate=bool(flags & os.O_TRUNC) or not exists)
        except BaseException:
            self.inodes.release_if_unused(node)
            raise
        info = self._open_writer(node, writer, flags)
        node.lookups += 1
        self._sync(node)
        return info, self._attributes(node)

    @fuse_operation
    async def write(self, fh, off, buf):
        handle = self._handles[fh]
        writer = handle.writer
        if writer is None:
            raise FUSEError(errno.EBADF)
        if handle.append:  # the kernel's idea of the end may be older than the file's
            off = writer.size
        written = await writer.write(off, buf)
        writer.mtime = time.time()
        WRITE_BYTES.inc(written)
        return written

    @fuse_operation
    async def flush(self, fh):
        handle = self._handles.get(fh)
        if isinstance(handle, FileHandle) and handle.writer is not None:
            await self._commit(handle.node, handle.writer)

    @fuse_operation
    async def fsync(self, fh, datasync):
        handle = self._handles.get(fh)
        if isinstance(handle, FileHandle) and handle.writer is not None:
            await self._commit(handle.node, handle.writer)

    @fuse_operation
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.inodes[inode]
        changes = (fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid
                   or fields.update_atime or fields.update_mtime)
        if changes:
            self._writable()
        self._sync(node)
        shown = self._attributes(node)
        if (fields.update_uid and attr.st_uid != shown.st_uid) or (fields.update_gid and attr.st_gid != shown.st_gid):
            raise FUSEError(errno.EPERM)  # the UFS keeps no owners
        # Modes and times are accepted and not kept: S3 stores neither (see docs/SEMANTICS.md).
        if fields.update_size:
            if node.status.is_dir:
                raise IsADirectory(node.path)
            handle = self._handles.get(fh) if fh else None
            writer = handle.writer if isinstance(handle, FileHandle) and handle.writer else node.writer
            if writer is not None:
                await writer.truncate(attr.st_size)
                writer.mtime = time.time()
            else:  # truncate(2) of a file nobody has open: stage, cut, upload now
                writer = await self._writer(node, truncate=attr.st_size == 0)
                writer.handles += 1
                try:
                    await writer.truncate(attr.st_size)
                    writer.mtime = time.time()
                    await self._commit(node, writer)
                finally:
                    await self._let_go(node, writer, upload=False)
        self._sync(node)
        return self._attributes(node)

    @fuse_operation
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._writable()
        if not _stat.S_ISREG(mode):  # fifos, sockets, devices: no such thing in a UFS
            raise FUSEError(errno.ENOTSUP)
        parent = self._dir(parent_inode)
        text = self._name(name)
        self._new_path(parent, text)
        uri = join(parent.uri, text)
        if await self._ufs_stat(uri) is not None or self.inodes.at(self._path(parent, text)) is not None \
                and self.inodes.at(self._path(parent, text)).writer is not None:
            raise Exists(self._path(parent, text))
        status = await self.client.ufs.get(uri).put(uri, b"")
        await self.client.invalidate(uri)
        node = self.inodes.child(parent, text, status)
        node.lookups += 1
        return self._attributes(node)

    # -- namespace changes ------------------------------------------------------------

    @fuse_operation
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        text = self._name(name)
        uri, path = join(parent.uri, text), self._new_path(parent, text)
        existing = self.inodes.at(path)
        if (existing is not None and existing.writer is not None) or await self._ufs_stat(uri) is not None:
            raise Exists(path)
        await self.client.ufs.get(uri).make_dir(uri)
        await self.client.invalidate(uri)
        self._subdirs_changed(parent, +1)
        node = self.inodes.child(parent, text, FileStatus(name=text, is_dir=True, mtime=time.time()))
        node.lookups += 1
        return self._attributes(node)

    @fuse_operation
    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        text = self._name(name)
        uri, path = join(parent.uri, text), self._path(parent, text)
        node = self.inodes.at(path)
        pending = node is not None and node.writer is not None
        status = await self._ufs_stat(uri)
        if status is None and not pending:
            raise NotFound(path)
        if status is not None and status.is_dir:
            raise IsADirectory(path)
        if status is not None:
            await self.client.ufs.get(uri).delete(uri)
            await self.client.invalidate(uri, pages=not self._read_here(node))
        if node is not None:
            if node.writer is not None:
                node.writer.uri = None  # an unlinked file's writes go nowhere, as on a disk
            self.inodes.detach(node)

    @fuse_operation
    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        text = self._name(name)
        uri, path = join(parent.uri, text), self._path(parent, text)
        status = await self._ufs_stat(uri)
        if status is None:
            raise NotFound(path)
        if not status.is_dir:
            raise NotADirectory(path)
        await self._require_empty(uri, path)
        await self.client.ufs.get(uri).remove_dir(uri)
        await self.client.invalidate(uri, recursive=True)
        self._subdirs_changed(parent, -1)
        node = self.inodes.at(path)
        if node is not None:
            self.inodes.detach(node)

    async def _require_empty(self, uri: str, path: str) -> None:
        if self._pending_children_under(path):
            raise NotEmpty(path)
        async for page in self.client.ufs.get(uri).list_pages(uri):
            if page:
                raise NotEmpty(path)

    def _pending_children_under(self, path: str) -> list[Node]:
        return [n for n in self._writing if n.path.startswith(path + "/") and n.writer.uri is not None
                and self.inodes.at(n.path) is n]

    @fuse_operation
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._writable()
        if flags & ~RENAME_NOREPLACE:  # RENAME_EXCHANGE cannot be done on S3
            raise FUSEError(errno.EINVAL)
        old_parent, new_parent = self._dir(parent_inode_old), self._dir(parent_inode_new)
        old_name, new_name = self._name(name_old), self._name(name_new)
        src_uri, src_path = join(old_parent.uri, old_name), self._path(old_parent, old_name)
        dst_uri, dst_path = join(new_parent.uri, new_name), self._new_path(new_parent, new_name)
        if src_path == dst_path:
            return
        # What is being written at or under the source goes to the UFS first, to be moved.
        for node in [n for n in self._writing if n.path == src_path or n.path.startswith(src_path + "/")]:
            if node.writer is not None:
                await self._commit(node, node.writer)
        src = await self._ufs_stat(src_uri)
        if src is None:
            raise NotFound(src_path)
        target = self.inodes.at(dst_path)
        dst = await self._ufs_stat(dst_uri)
        if dst is None and target is not None and target.writer is not None and target.writer.uri is not None:
            dst = FileStatus(name=new_name, is_dir=False)  # being created through this mount
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Exists(dst_path)
        ufs = self.client.ufs.get(src_uri)
        if src.is_dir:
            if dst_path.startswith(src_path + "/"):
                raise FUSEError(errno.EINVAL)
            if dst is not None:
                if not dst.is_dir:
                    raise NotADirectory(dst_path)
                await self._require_empty(dst_uri, dst_path)
                await ufs.remove_dir(dst_uri)
        elif dst is not None and dst.is_dir:
            raise IsADirectory(dst_path)
        if target is not None and target.writer is not None:
            target.writer.uri = None  # the replaced file's pending writes go nowhere
        await ufs.rename(src_uri, dst_uri, src.is_dir)
        await self.client.invalidate(src_uri, recursive=src.is_dir,
                                     pages=not self._read_here(self.inodes.at(src_path)))
        await self.client.invalidate(dst_uri, recursive=src.is_dir, pages=not self._read_here(target))
        if src.is_dir:
            self._subdirs_changed(old_parent, -1)
            if dst is None:
                self._subdirs_changed(new_parent, +1)
        for node in self.inodes.move(src_path, new_parent, new_name):
            if node.path == dst_path:
                node.status = replace(node.status, name=new_name)
            if node.writer is not None and node.writer.uri is not None:
                node.writer.uri = node.uri

    # -- not supported: no such things in an object store ---------------------------------

    async def _not_supported(self, *args, **kwargs):
        if self.config.read_only:
            raise FUSEError(errno.EROFS)
        raise FUSEError(errno.ENOTSUP)

    symlink = link = setxattr = removexattr = _not_supported
