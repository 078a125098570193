"""The changing half of the FUSE operations: writing files and the namespace, translated.

The policy is in the client core: what is staged, when it is uploaded and under which
condition (`Writes`, dorafs/client/writes.py), and which UFS calls and checks a namespace
change makes (`Namespace`, dorafs/client/namespace.py). This module turns kernel
requests into those calls: names into URIs, inodes into nodes, results into attributes.

Subtleties:
- A file open for writing has one `WriteFile` (dorafs/client/writes.py) on its node,
  shared by every handle of that inode, readers included; its size and mtime are the
  node's while it exists, even before the file is in the UFS.
- Uploads happen in `flush` (each close(2)) and `fsync`, whose errors reach the
  application; `release` uploads what no flush did and logs its errors.
- The mount's own nodes follow a change once the UFS made it; a renamed file or
  directory that is being written is uploaded first, so the UFS holds what is moved.
  A new name too long for a path, a URI or an S3 key: ENAMETOOLONG.
- With `read_only` every change answers EROFS (the kernel, mounted `ro`, mostly does so
  before asking).
"""

from __future__ import annotations

import errno
import os
import stat as _stat
import time
from dataclasses import replace

from dorafs.client.writes import WriteFile
from dorafs.errors import Exists, InvalidRequest, IsADirectory, NotADirectory
from dorafs.fuse.errors import fuse_operation
from dorafs.fuse.handles import NAME_MAX, FileHandle, too_long, valid_name
from dorafs.fuse.inodes import Node
from dorafs.fuse.metrics import UPLOAD_BYTES, UPLOADS, WRITE_BYTES
from dorafs.fuse.types import RENAME_NOREPLACE, FileInfo, FUSEError
from dorafs.ufs import FileStatus, join


class WritingOperations:
    """Mixed into DoraOperations, whose state (client, config, inodes, handles, `writes`,
    `namespace`) it uses. It is also the `Local` the namespace asks about this mount's paths."""

    # -- what the mount knows that the UFS does not (dorafs/client/namespace.py's Local) -

    def pending(self, path: str) -> bool:
        node = self.inodes.at(path)
        return node is not None and node.writer is not None and node.writer.uri is not None

    def pending_under(self, path: str) -> bool:
        return any(n.path.startswith(path + "/") and n.writer.uri is not None and self.inodes.at(n.path) is n
                   for n in self._writing)

    def read_here(self, path: str) -> bool:
        """Whether a handle of this mount still reads the pinned version of the node at `path`."""
        node = self.inodes.at(path)
        return node is not None and any(n > 0 for n in node.open_versions.values())

    def replaced(self, path: str) -> None:
        target = self.inodes.at(path)
        if target is not None and target.writer is not None:
            target.writer.uri = None  # the replaced file's pending writes go nowhere

    # -- translation ------------------------------------------------------------------

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
    def _counted(result: str, size: int) -> None:
        UPLOADS.labels(result).inc()
        if result == "ok":
            UPLOAD_BYTES.inc(size)

    # -- writing files ----------------------------------------------------------------

    async def _writer(self, node: Node, *, truncate: bool) -> WriteFile:
        """The node's WriteFile, staged (and filled with the file's bytes unless
        `truncate`) if the file is not being written yet."""
        writer = node.writer
        if writer is None:
            writer = await self.writes.stage(node.uri, node.status.version, load=not truncate, path=node.path)
            if node.writer is not None:  # another open got there first
                await writer.close()
                writer = node.writer
            else:
                node.writer = writer
                self._writing.add(node)
        if truncate:
            await self.writes.truncate(writer, 0)
        return writer

    def _open_writer(self, node: Node, writer: WriteFile, flags: int) -> FileInfo:
        writer.handles += 1
        node.open_handles += 1
        node.kernel_version = None  # the next open of another version flushes the kernel's pages
        fh = next(self._numbers)
        # While the kernel reads this inode from a backing file, no open of it may use
        # the kernel's page cache.
        direct_io = self.config.direct_io or self.passthrough.holds(node.inode)
        self._handles[fh] = FileHandle(node, None, writer, append=bool(flags & os.O_APPEND), cached=not direct_io)
        node.cached_opens += not direct_io
        return FileInfo(fh=fh, keep_cache=False, direct_io=direct_io)

    @staticmethod
    def _uploaded(node: Node):
        def uploaded(status: FileStatus) -> None:
            node.kernel_version = None
            node.status = replace(status, name=node.status.name)
        return uploaded

    async def _commit(self, node: Node, writer: WriteFile) -> None:
        """Upload the writer's bytes if changed; then the node shows the new version."""
        await self.writes.commit(writer, node.uri, self._uploaded(node))

    async def _let_go(self, node: Node, writer: WriteFile, *, upload: bool) -> None:
        """One handle less on `writer`; after the last one the node shows what was written."""
        def dropped() -> None:
            if node.writer is writer:
                node.writer = None
                self._writing.discard(node)
                node.status = replace(node.status, size=writer.size, mtime=writer.mtime)

        await self.writes.release(writer, node.uri, upload=upload, uploaded=self._uploaded(node), dropped=dropped)

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
            status = await self.namespace.existing_file(join(parent.uri, text), self._path(parent, text))
            exists = status is not None
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
        written = await self.writes.write(writer, off, buf, append=handle.append)
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
                await self.writes.truncate(writer, attr.st_size)
            else:  # truncate(2) of a file nobody has open: stage, cut, upload now
                writer = await self._writer(node, truncate=attr.st_size == 0)
                writer.handles += 1
                try:
                    await self.writes.truncate(writer, attr.st_size)
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
        path = self._new_path(parent, text)
        status = await self.namespace.make_file(join(parent.uri, text), path, self)
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
        status = await self.namespace.make_dir(uri, path, self)
        self._subdirs_changed(parent, +1)
        node = self.inodes.child(parent, text, replace(status, name=text))
        node.lookups += 1
        return self._attributes(node)

    @fuse_operation
    async def unlink(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        text = self._name(name)
        path = self._path(parent, text)
        await self.namespace.unlink(join(parent.uri, text), path, self)
        node = self.inodes.at(path)
        if node is not None:
            if node.writer is not None:
                node.writer.uri = None  # an unlinked file's writes go nowhere, as on a disk
            self.inodes.detach(node)

    @fuse_operation
    async def rmdir(self, parent_inode, name, ctx):
        self._writable()
        parent = self._dir(parent_inode)
        text = self._name(name)
        path = self._path(parent, text)
        await self.namespace.remove_dir(join(parent.uri, text), path, self)
        self._subdirs_changed(parent, -1)
        node = self.inodes.at(path)
        if node is not None:
            self.inodes.detach(node)

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
        try:
            renamed = await self.namespace.rename(src_uri, src_path, dst_uri, dst_path, self,
                                                  noreplace=bool(flags & RENAME_NOREPLACE))
        except InvalidRequest:  # a directory into itself: the application's mistake, not logged
            raise FUSEError(errno.EINVAL) from None
        if renamed.is_dir:
            self._subdirs_changed(old_parent, -1)
            if not renamed.replaced:
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
