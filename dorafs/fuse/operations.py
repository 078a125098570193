"""FUSE operations of a dorafs mount (the session in dorafs/fuse/session.py calls them).

Subtleties:
- Version pinning: `open` stats the file and pins (version, size) in its handle; every
  read of that handle is served from that version or fails with ESTALE.
- Kernel page cache: `keep_cache` is set only when the kernel can hold pages of this
  version alone. If another handle of the same inode is open on a different version,
  the new handle bypasses the kernel cache (`direct_io`) and the inode is marked so that
  the next open flushes the cache. A cold open of a file that later opens will get by
  passthrough bypasses it too (`_bypasses_page_cache`, docs/SEMANTICS.md promise 5).
- readdir offsets are positions in a listing snapshot taken when the directory handle
  first reads, so offsets are stable across calls; every entry reported through
  readdirplus takes one lookup reference, as the kernel expects.
- An unlinked file (through this mount) stays readable through the handles opened
  before, as on a local disk: its node keeps the status it had, shows st_nlink 0, and
  its pinned version's pages are not dropped from the workers while it is open here.
- A directory's st_nlink is 2 plus its subdirectories once a listing of it was read
  to its end (for `listing_ttl`); 2 before that.
- Writing files and changing the namespace are in dorafs/fuse/writing.py, which
  translates them into calls of the client core (dorafs/client/writes.py, namespace.py).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from dataclasses import replace

import trio

from dorafs.client import DoraClient
from dorafs.client.local import descriptor_budget
from dorafs.client.namespace import Namespace
from dorafs.client.writes import Staging, Writes
from dorafs.config import MountConfig
from dorafs.errors import IsADirectory, NotADirectory, NotFound, UfsError
from dorafs.fuse.errors import fuse_operation
from dorafs.fuse.handles import NAME_MAX, DirHandle, FileHandle, too_long, valid_name
from dorafs.fuse.inodes import InodeTable, Node
from dorafs.fuse.metrics import INODES, PASSTHROUGH_READAHEAD, READS, STAGING_BYTES
from dorafs.fuse.objectfiles import NOT_CACHED, Fallback, ObjectFiles
from dorafs.fuse.passthrough import CACHED_OPEN, KERNEL_PAGES, OTHER_VERSION, WRITING, Passthrough
from dorafs.fuse.types import ROOT_INODE, EntryAttributes, FileInfo, FUSEError, StatvfsData
from dorafs.fuse.writing import WritingOperations
from dorafs.ufs import FileStatus, join

log = logging.getLogger(__name__)


KERNEL_FOREVER = 365 * 86400.0  # a TTL of -1 ("never recheck") as a kernel timeout
# A cold open reads past the kernel's page cache (`_bypasses_page_cache`) unless its
# process, or its file, was seen reading in a way the page cache serves better: in small
# pieces (SMALL_READS reads under SMALL_READ bytes, each where the one before ended, of
# one such open), or footer first (the first read of such an open ends at the file's
# end, away from its start). The last PAGE_CACHE_READERS such processes are remembered;
# a file, as long as its inode is.
SMALL_READ = 128 << 10
SMALL_READS = 16
PAGE_CACHE_READERS = 1024


def _first(value: float | None, default: float) -> float:
    return default if value is None else value


def passthrough_wanted(config: MountConfig) -> bool:
    """Passthrough unless told otherwise; never with direct_io (every read is to reach
    the mount)."""
    wanted = True if config.passthrough is None else config.passthrough
    return wanted and not config.direct_io


def _kernel_seconds(ttl: float) -> float:
    return KERNEL_FOREVER if ttl < 0 else ttl


class DoraOperations(WritingOperations):
    # The FUSE session, once mounted: `kernel.invalidate_inode` drops the kernel's cached
    # attributes and pages of an inode, off the request path (sent from a thread: waiting
    # for it inside a handler can deadlock).
    kernel = None

    def __init__(self, client: DoraClient, config: MountConfig, root_uri: str, root_status: FileStatus,
                 staging: Staging):
        super().__init__()
        self.client = client
        self.config = config
        self.inodes = InodeTable(root_uri, root_status)
        self.staging = staging  # built and run by its owner, the mount
        self.writes = Writes(client, self.staging, counted=self._counted)  # the writing policy
        self.namespace = Namespace(client)  # the namespace policy; this object is its `Local`
        # Wholly cached files are read from their object file: by the kernel itself
        # (passthrough) unless every read is to reach the mount, else by the mount.
        self.objects = ObjectFiles(client, config.passthrough_min_size, max_held=descriptor_budget())
        self.passthrough = Passthrough(passthrough_wanted(config))
        self._writing: set[Node] = set()  # nodes with a WriteFile
        self._page_cache_readers: OrderedDict[int, None] = OrderedDict()  # pids whose cold opens keep it
        STAGING_BYTES.set_function(lambda: self.staging.used)
        INODES.set_function(lambda: len(self.inodes))
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._numbers = itertools.count(1)
        self._uid = os.getuid() if config.uid is None else config.uid
        self._gid = os.getgid() if config.gid is None else config.gid
        self._modes = (stat.S_IFREG | config.file_mode, stat.S_IFDIR | config.dir_mode)
        # The kernel's own caches follow the mount's TTLs unless told otherwise.
        self._attr_timeout = _kernel_seconds(_first(config.attr_timeout, config.status_ttl))
        self._entry_timeout = _kernel_seconds(_first(config.entry_timeout, config.status_ttl))
        self._negative_timeout = _kernel_seconds(_first(config.entry_timeout, config.negative_ttl))

    # -- attributes -------------------------------------------------------------------

    def _attributes(self, node: Node) -> EntryAttributes:
        status = node.status
        attr = EntryAttributes()
        attr.st_ino = node.inode
        attr.generation = 0
        attr.entry_timeout = self._entry_timeout
        attr.attr_timeout = self._attr_timeout
        node.attr_version = status.version
        attr.st_mode = self._modes[status.is_dir]
        if not node.linked:
            attr.st_nlink = 0
        elif status.is_dir:
            attr.st_nlink = 2 + self._subdirs(node)
        else:
            attr.st_nlink = 1
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_size = status.size
        attr.st_blksize = self.client.page_size
        attr.st_blocks = (status.size + 511) // 512
        stamp = int(status.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        return attr

    def _invalidate_kernel(self, inode: int) -> None:
        """Have the kernel drop its cached attributes and pages of `inode` (soon, never
        waited for here: see the session's notifications)."""
        if self.kernel is not None:
            self.kernel.invalidate_inode(inode)

    def _drop_kernel_pages(self, node: Node, version: str) -> None:
        """Version `version` of `node` is held from the next open on, and the kernel
        reads it from the object file (passthrough): the pages it keeps of the FUSE file
        from reads through the mount are of no more use. Dropped now, in the background,
        rather than by that open: without `keep_cache` (which passthrough excludes) the
        kernel drops them before the open returns, about 40 ms per 256 MiB here. Kept
        for a file whose readers read through the page cache: its next opens read them
        (`open`, KERNEL_PAGES)."""
        if node.page_cache_reads:
            return
        if node.kernel_version == version and not node.cached_opens and self.passthrough.unavailable() is None:
            node.kernel_version = None
            self._invalidate_kernel(node.inode)

    def _gone(self, node: Node) -> None:
        """The store no longer has `node` under its name (deleted or renamed there): the
        kernel forgets the name now rather than when its entry_timeout runs out, so the
        next use of the name looks it up again. Otherwise a file deleted in the bucket and
        created again through the mount would be opened as the kernel's old entry (ENOENT)
        instead of created."""
        if self.kernel is not None and node.path and node.linked and node.writer is None:
            name = node.path.rpartition("/")[2]
            self.kernel.invalidate_entry(self.inodes.parent_of(node).inode, name.encode("utf-8", "surrogateescape"))

    def _new_inode(self, node: Node, why: str) -> None:
        """An open of `node` that the kernel would refuse: while an inode is read through
        passthrough, the kernel fails every open of it that is not passthrough too
        (fs/fuse/iomode.c), so one of another version or for writing cannot share it.
        The name gets a new inode instead: `node` is detached from its path, as after an
        unlink (its opens read on, their version), the kernel is told to forget the name,
        and the open is answered ESTALE, on which the kernel looks the name up again
        (LOOKUP_REVAL) and opens the inode that lookup answers."""
        self.passthrough.new_inode(why)
        self._gone(node)
        self.inodes.detach(node)
        raise FUSEError(errno.ESTALE)

    def _subdirs(self, node: Node) -> int:
        """The directory's subdirectories as last counted, while the count is fresh; else 0."""
        if node.subdirs is None:
            return 0
        ttl = self.config.listing_ttl
        if ttl >= 0 and trio.current_time() - node.subdirs_at > ttl:
            node.subdirs = None
            return 0
        return node.subdirs

    def _count_subdirs(self, node: Node, count: int) -> None:
        """A listing of `node` was read to its end; the kernel drops attributes showing another st_nlink."""
        before = self._subdirs(node)
        node.subdirs, node.subdirs_at = count, trio.current_time()
        if count != before:
            self._invalidate_kernel(node.inode)

    def _negative(self) -> EntryAttributes:
        """A cacheable "no such entry" answer (kept by the kernel for negative_ttl)."""
        attr = EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = self._negative_timeout
        return attr

    # -- namespace --------------------------------------------------------------------

    @fuse_operation
    async def lookup(self, parent_inode, name, ctx):
        parent = self.inodes[parent_inode]
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return self._negative()
        if text == ".":
            node = parent
        elif text == "..":
            node = self.inodes.parent_of(parent)
        elif not valid_name(text):
            return self._negative()
        else:
            if not parent.status.is_dir:
                raise NotADirectory(parent.path)
            path = f"{parent.path}/{text}" if parent.path else text
            if too_long(path, join(parent.uri, text)):
                raise FUSEError(errno.ENAMETOOLONG)
            node = self.inodes.at(path)
            if node is None or node.writer is None:
                try:
                    status = await self.client.stat(join(parent.uri, text))
                except NotFound:
                    return self._negative()
                node = self.inodes.child(parent, text, status)
            self._sync(node)
        node.lookups += 1
        return self._attributes(node)

    @fuse_operation
    async def forget(self, inode_list):
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @fuse_operation
    async def getattr(self, inode, ctx=None):
        node = self.inodes[inode]
        if node.writer is None and node.linked:  # an unlinked node keeps the status it had
            node.status = await self._stat(node)
        self._sync(node)
        return self._attributes(node)

    async def _stat(self, node: Node) -> FileStatus:
        try:
            return await self.client.stat(node.uri)
        except NotFound:
            if node.inode == ROOT_INODE:  # an empty S3 prefix: the mount starts empty
                return FileStatus(name="", is_dir=True)
            self._gone(node)
            raise
        except UfsError:
            if node.inode == ROOT_INODE:  # the store fails: the root stays the directory it was
                return node.status
            raise

    def _sync(self, node: Node) -> None:
        """A node being written shows its staged size and mtime."""
        writer = node.writer
        if writer is not None:
            node.status = replace(node.status, is_dir=False, size=writer.size, mtime=writer.mtime)

    @fuse_operation
    async def statfs(self, ctx):
        stat = StatvfsData()
        capacity = sum(w.capacity for w in self.client.membership.workers.values()) or (1 << 40)
        stat.f_bsize = stat.f_frsize = 4096
        stat.f_blocks = capacity // 4096
        stat.f_namemax = NAME_MAX
        if self.config.read_only:
            stat.f_bfree = stat.f_bavail = 0
            stat.f_files = stat.f_ffree = stat.f_favail = 0
            return stat
        # Files go to the UFS, which has no size to speak of: the bound a writer meets is the
        # staging space (a file streams past it only while written sequentially).
        free = max(0, self.staging.limit - self.staging.used)
        stat.f_bfree = stat.f_bavail = min(stat.f_blocks, free // 4096)
        stat.f_files = 1 << 32
        stat.f_ffree = stat.f_favail = (1 << 32) - len(self.inodes)
        return stat

    # -- files ------------------------------------------------------------------------

    @fuse_operation
    async def open(self, inode, flags, ctx):
        node = self.inodes[inode]
        writing = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writing:
            self._writable()
        if writing and self.passthrough.holds(node.inode):
            self._new_inode(node, "writing")
        if writing or node.writer is not None:
            self.passthrough.fallback(WRITING)
            if node.writer is None and node.status.is_dir:
                raise IsADirectory(node.path)
            if node.writer is None and not node.linked:  # staging it would bring it back under its name
                raise NotFound(node.path)
            writer = await self._writer(node, truncate=bool(flags & os.O_TRUNC))
            return self._open_writer(node, writer, flags)
        # An unlinked node (reopened through /proc/PID/fd) is the version it was.
        status = await self._stat(node) if node.linked else node.status
        if status.is_dir:
            raise IsADirectory(node.path)
        version = status.version
        others = any(v != version for v, n in node.open_versions.items() if n > 0)
        if others and self.passthrough.holds(node.inode) and node.linked:
            self._new_inode(node, "another version")
        node.status = status
        stale_attributes = node.attr_version is not None and node.attr_version != version
        if stale_attributes:
            # The kernel holds attributes (the size above all) of another version for up
            # to attr_timeout, and would clip reads at the old size: this handle bypasses
            # the kernel cache, and the kernel is told to drop that inode's attributes.
            node.attr_version = None
            self._invalidate_kernel(node.inode)
        handle = FileHandle(node, self.client.open_pinned(node.uri, status))
        backing_id = 0
        not_held = None  # why the version is not held, when that is the reason it is not handed over
        try:
            if self._holds_object_files():
                # A reader that read this version through the kernel's page cache left
                # its pages there: the next open reads them rather than wait for the
                # version's object file, which is being made from them.
                handle.held = await self.objects.hold(handle.file, wait=node.kernel_version != version)
            else:
                raise Fallback(self.passthrough.unavailable())
            if others:
                raise Fallback(OTHER_VERSION)
            if node.cached_opens and not self.passthrough.holds(node.inode):
                raise Fallback(CACHED_OPEN)
            if node.page_cache_reads and node.kernel_version == version and not self.passthrough.holds(node.inode):
                # Its readers read through the kernel's page cache, which holds this version
                # from their earlier opens: the next epoch reads it there, with no request
                # (a passthrough open would drop it, and pyarrow's posix_fadvise before each
                # column chunk would then cost a refused readahead each, bench/README.md).
                # What the kernel lacks comes from the held file (HeldReader).
                raise Fallback(KERNEL_PAGES)
            backing_id = self.passthrough.register(node.inode, handle.held)
        except Fallback as why:  # a mount that cannot hand over any file says so first
            self.passthrough.fallback(self.passthrough.unavailable() or why.reason, why.detail)
            not_held = why.reason
        except BaseException:
            if handle.held is not None:
                self.objects.let_go(handle.held)
            raise
        if backing_id:
            direct_io, keep_cache = False, False
            handle.passthrough = True
        elif (others or stale_attributes or self.config.direct_io or self.passthrough.holds(node.inode)
              or self._bypasses_page_cache(node, not_held, ctx.pid)):
            direct_io, keep_cache = True, False
            node.kernel_version = None
            handle.direct = True
            handle.opener = ctx.pid
            # A direct handle that is mmapped puts the inode in the kernel's page-cache mode,
            # which would fail a passthrough open beside it (EIO): counted as a cached open.
            handle.cached = True
            node.cached_opens += 1
        else:
            direct_io, keep_cache = False, node.kernel_version == version
            node.kernel_version = version
            if ctx.pid in self._page_cache_readers:  # a reader the page cache serves better: its files too
                node.page_cache_reads = True
            handle.cached = True
            node.cached_opens += 1
        node.open_versions[version] = node.open_versions.get(version, 0) + 1
        node.open_handles += 1
        fh = next(self._numbers)
        self._handles[fh] = handle
        return FileInfo(fh=fh, keep_cache=keep_cache, direct_io=direct_io, backing_id=backing_id)

    def _bypasses_page_cache(self, node: Node, not_held: str | None, pid: int) -> bool:
        """Does this cold open read past the kernel's page cache (`direct_io` unset)?

        Yes when a later open of the version will be handed to the kernel whole: this
        mount passes files through, the file is large enough to be, a worker on this
        machine owns it, and the kernel holds no page of this version. Pages the kernel
        would cache now would be of no use then, and filling them is the costliest copy
        of a cold read (fresh memory for every byte, bench/README.md "A cold open reads
        past the kernel's page cache"). Not for a process seen reading in a way the page
        cache serves better, nor for a file that was (`_keep_page_cache`)."""
        if self.config.direct_io is not None or not_held != NOT_CACHED:
            return False
        if self.passthrough.unavailable() is not None or node.kernel_version == node.status.version:
            return False
        if node.page_cache_reads or pid in self._page_cache_readers:
            return False
        return self.client.owner_here(node.uri) is not None

    def _read_direct(self, handle: FileHandle, off: int, size: int, n: int) -> None:
        """Learn from each read of a direct handle whether its reader is one the kernel's
        page cache serves better:

        - small sequential pieces: without the page cache each is a request to the
          mount, where the kernel's readahead would ask for a megabyte at a time
          (SMALL_READS of them);
        - footer first: a first read that ends at the file's end, away from its start,
          is a reader of a format whose index is at the end (Parquet, ORC, Arrow's IPC
          files, zip and npz), which then reads pieces of the file, coming back to
          some (a column chunk read by several processes, a dataset read again): the
          kernel serves those again without a request (bench/README.md, "Footer-first
          readers keep the page cache")."""
        if not handle.read_end and off and n and off + n == handle.file.status.size:
            self._keep_page_cache(handle, "read it footer first")
        elif size < SMALL_READ and off == handle.read_end and n == size:
            handle.small_reads += 1
            if handle.small_reads == SMALL_READS:
                self._keep_page_cache(handle, f"reads it in pieces under {SMALL_READ >> 10} KiB")

    def _keep_page_cache(self, handle: FileHandle, why: str) -> None:
        """The opener's next cold opens use the page cache, and so do the next cold opens
        of that file, whoever makes them (a tool run once per file, the other readers of
        a dataset)."""
        handle.node.page_cache_reads = True
        if handle.opener:
            self._page_cache_readers[handle.opener] = None
            self._page_cache_readers.move_to_end(handle.opener)
            while len(self._page_cache_readers) > PAGE_CACHE_READERS:
                self._page_cache_readers.popitem(last=False)
        log.info("process %d %s (%s): its next cold opens, and the file's, use the kernel's page cache",
                 handle.opener, why, handle.node.path)

    def _holds_object_files(self) -> bool:
        """Are object files held, to be read by the kernel (passthrough) or by the mount
        itself (which reads a worker's files only with `short_circuit`)?"""
        return bool(self.config.short_circuit) or self.passthrough.unavailable() is None

    @fuse_operation
    async def read(self, fh, off, size):
        handle = self._handles[fh]
        if handle.passthrough:
            # The kernel reads a passthrough handle from the backing file (read, mmap,
            # splice): what reaches the mount for it is the kernel's readahead into the FUSE
            # file's own page cache, which pyarrow asks for before each column chunk
            # (posix_fadvise WILLNEED). No read of this handle uses those pages, but the
            # file's next opens do: its reader advises the kernel of what it reads, which
            # the page cache serves better, so they keep those pages rather than being
            # handed over (`open`, KERNEL_PAGES) and read them with no request, where
            # passthrough would drop them and have every advice asked for again
            # (bench/README.md, "A second epoch reads the kernel's pages").
            PASSTHROUGH_READAHEAD.inc()
            node = handle.node
            node.page_cache_reads = True
            node.kernel_version = handle.file.status.version
        start = time.perf_counter()
        if handle.held is not None:  # a verified object file: one preadv, nothing else
            data = self.objects.reader.now(handle.held, off, size)
            if data is None:
                data = await self.objects.reader.later(handle.held, off, size)
            READS.add_held(len(data), time.perf_counter() - start)
            return data
        if handle.writer is not None:
            data = handle.writer.read(off, size)
        else:
            data = await self.client.read(handle.file, off, size, True)  # a read across pages: a view of each
            n = sum(map(len, data)) if type(data) is tuple else len(data)
            if handle.direct:
                self._read_direct(handle, off, size, n)
                node = handle.node
                if node.page_cache_reads and len(node.open_versions) == 1:
                    # A direct handle of a reader the page cache serves better (its first
                    # open, before the mount knew): the readahead it advises still fills the
                    # kernel's pages of the FUSE file, with this version only (its open
                    # dropped any other, and no other version is open), so the file's next
                    # opens read them (`open`, KERNEL_PAGES).
                    node.kernel_version = handle.file.status.version
            if off + n > handle.read_end:
                handle.read_end = off + n
            READS.add(n, time.perf_counter() - start)
            return data
        READS.add(len(data), time.perf_counter() - start)
        return data

    @fuse_operation
    async def release(self, fh):
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, FileHandle):
            return
        node = handle.node
        if handle.passthrough:
            self.passthrough.release(node.inode)
        if handle.held is not None:
            self.objects.let_go(handle.held)
        if handle.cached:
            node.cached_opens -= 1
        try:
            if handle.writer is not None:
                await self._let_go(node, handle.writer, upload=True)
            else:
                self.client.close(handle.file)  # its readahead ends with it
                version = handle.file.status.version
                if handle.held is None and handle.read_end > 0 and self._holds_object_files():
                    # Read through the mount: if its worker now holds all of that version (this
                    # reader read it to its end, or the last of several readers of its parts
                    # closes), it is held from the next open.
                    self.objects.prepare_soon(handle.file, lambda: self._drop_kernel_pages(node, version))
                node.open_versions[version] -= 1
                if node.open_versions[version] <= 0:
                    del node.open_versions[version]
        finally:
            node.open_handles -= 1
            self.inodes.release_if_unused(node)

    # -- directories ------------------------------------------------------------------

    @fuse_operation
    async def opendir(self, inode, ctx):
        node = self.inodes[inode]
        if not node.status.is_dir:
            raise NotADirectory(node.path)
        node.open_handles += 1
        fh = next(self._numbers)
        self._handles[fh] = DirHandle(node)
        return fh

    async def _entry(self, handle: DirHandle, index: int) -> FileStatus | None:
        """Entry `index` of the handle's listing snapshot, fetching batches as needed. Files
        created through this mount and not uploaded yet come last."""
        while index >= len(handle.entries) and not handle.complete:
            if handle.batches is None:
                handle.batches = self.client.list_batches(handle.node.uri)
            try:
                batch = await handle.batches.__anext__()
            except (StopAsyncIteration, NotFound) as exc:
                if isinstance(exc, NotFound) and handle.node.inode != ROOT_INODE:
                    raise
                handle.complete = True  # the end, or an empty S3 prefix at the root
                self._count_subdirs(handle.node, sum(1 for e in handle.entries if e.is_dir))
                listed = {e.name for e in handle.entries}
                handle.entries.extend(self._pending_children(handle.node, listed))
                break
            handle.entries.extend(e for e in batch if valid_name(e.name))
        return handle.entries[index] if index < len(handle.entries) else None

    @fuse_operation
    async def readdir(self, fh, start_id, token):
        handle = self._handles[fh]
        index = start_id
        while (entry := await self._entry(handle, index)) is not None:
            node = self.inodes.child(handle.node, entry.name, entry)
            if not token.add(entry.name.encode("utf-8", "surrogateescape"), self._attributes(node), index + 1):
                self.inodes.release_if_unused(node)
                return
            if token.plus:  # a READDIRPLUS entry is a lookup; a READDIR one is not
                node.lookups += 1
            else:
                self.inodes.release_if_unused(node)
            index += 1

    @fuse_operation
    async def releasedir(self, fh):
        handle = self._handles.pop(fh, None)
        if not isinstance(handle, DirHandle):
            return
        if handle.batches is not None:
            await handle.batches.aclose()
        handle.node.open_handles -= 1
        self.inodes.release_if_unused(handle.node)
