"""The FUSE ceiling: a minimal pyfuse3 filesystem serving the dataset from memory.

It is the limit no Python FUSE mount beats: the same kernel FUSE path, the same
pyfuse3 + trio loop and default mount options as dorafs, and a `read` that costs one
memoryview slice of an in-memory pattern (dataset.read_range) — no I/O, no copies, no
locking. Metadata is a static in-memory tree, so lookups and listings cost only the
FUSE round trip.

Like a first open of a dorafs file, opens do not set `keep_cache` (each open starts
without the kernel's cached pages) and do not set `direct_io` (the kernel's readahead
applies). Entry and attribute timeouts are 1 s. The kernel readahead of the mount is
raised as dorafs raises its own (`read_ahead_kb`, default 1024), so both get requests of
the same size: a ceiling with smaller requests would not be the limit of a mount with
larger ones.

    python3 bench/ceiling.py MODE MOUNTPOINT [READ_AHEAD_KB]      (CEILING_DIRECT_IO=1: direct_io opens)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import SPECS, object_key, read_range  # noqa: E402

from dorafs.config import MountConfig  # noqa: E402
from dorafs.mount import set_read_ahead  # noqa: E402

TIMEOUT = 1.0
# CEILING_DIRECT_IO=1: opens set direct_io, as a dorafs mount with -o direct_io does
# (bench/fuselayer.py), so every read reaches the server.
DIRECT_IO = os.environ.get("CEILING_DIRECT_IO") == "1"


class Node:
    __slots__ = ("inode", "name", "is_dir", "size", "key", "children", "parent")

    def __init__(self, inode, name, is_dir, size=0, key="", parent=None):
        self.inode, self.name, self.is_dir, self.size, self.key = inode, name, is_dir, size, key
        self.children: dict[bytes, Node] = {}
        self.parent = parent


class CeilingFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, mode: str):
        super().__init__()
        spec = SPECS[mode]
        self.nodes: dict[int, Node] = {}
        self.root = self._add(pyfuse3.ROOT_INODE, "", True, parent=None)
        self.root.parent = self.root
        next_inode = pyfuse3.ROOT_INODE + 1
        for rel, size in spec.objects():
            parent = self.root
            *dirs, name = rel.split("/")
            for d in dirs:
                child = parent.children.get(d.encode())
                if child is None:
                    child = self._add(next_inode, d, True, parent=parent)
                    next_inode += 1
                parent = child
            self._add(next_inode, name, False, size, object_key(spec, rel), parent)
            next_inode += 1
        self.listings = {n.inode: sorted(n.children.values(), key=lambda c: c.name)
                         for n in self.nodes.values() if n.is_dir}
        self.uid, self.gid = os.getuid(), os.getgid()

    def _add(self, inode, name, is_dir, size=0, key="", parent=None) -> Node:
        node = Node(inode, name, is_dir, size, key, parent)
        self.nodes[inode] = node
        if parent is not None:
            parent.children[name.encode()] = node
        return node

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = (stat.S_IFDIR | 0o755) if node.is_dir else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = node.size
        a.st_blksize = 1 << 20
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_700_000_000 * 10**9
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.nodes[parent_inode]
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent
        else:
            node = parent.children.get(name)
            if node is None:
                a = pyfuse3.EntryAttributes()
                a.st_ino = 0
                a.entry_timeout = TIMEOUT
                return a
        return self._attr(node)

    async def getattr(self, inode, ctx=None):
        return self._attr(self.nodes[inode])

    async def opendir(self, inode, ctx):
        if not self.nodes[inode].is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = self.listings[fh]
        for i in range(start_id, len(entries)):
            node = entries[i]
            if not pyfuse3.readdir_reply(token, node.name.encode(), self._attr(node), i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        node = self.nodes[inode]
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=DIRECT_IO)

    async def read(self, fh, off, size):
        node = self.nodes[fh]
        return read_range(node.key, node.size, off, size)

    async def release(self, fh):
        pass

    async def forget(self, inode_list):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


async def _serve(mountpoint: str, read_ahead_kb: int) -> None:
    async with trio.open_nursery() as nursery:
        if read_ahead_kb:
            nursery.start_soon(set_read_ahead, mountpoint, read_ahead_kb)
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main(max_tasks=64)  # as dorafs's default fuse_tasks
        nursery.cancel_scope.cancel()


def main() -> None:
    mode, mountpoint = sys.argv[1], sys.argv[2]
    read_ahead_kb = int(sys.argv[3]) if len(sys.argv) > 3 else MountConfig.read_ahead_kb
    fs = CeilingFS(mode)
    options = set(pyfuse3.default_options) | {"ro", "fsname=ceiling", "subtype=ceiling"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(_serve, mountpoint, read_ahead_kb)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
