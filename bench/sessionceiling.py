"""bench/ceiling.py's memory file system served by dorafs's own FUSE session, not pyfuse3.

The same tree and bytes as the pyfuse3 ceiling (dataset.read_range: a memoryview slice
per read), the same options (ro, default_permissions, 64 concurrent requests, direct_io
opens with CEILING_DIRECT_IO=1): the two differ only in the FUSE layer, so their CPU per
request is what each layer costs (bench/fuselayer.py prints both).

    python3 bench/sessionceiling.py MODE MOUNTPOINT
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset import SPECS, object_key, read_range  # noqa: E402

from dorafs.fuse import mounting  # noqa: E402
from dorafs.fuse.session import Session  # noqa: E402
from dorafs.fuse.types import ROOT_INODE, EntryAttributes, FileInfo, FUSEError, StatvfsData  # noqa: E402

TIMEOUT = 1.0
DIRECT_IO = os.environ.get("CEILING_DIRECT_IO") == "1"


class MemoryFS:
    def __init__(self, mode: str):
        spec = SPECS[mode]
        self.nodes: dict[int, tuple] = {ROOT_INODE: ("", True, 0, "", {})}  # name, is_dir, size, key, children
        self.parents = {ROOT_INODE: ROOT_INODE}
        next_inode = ROOT_INODE + 1
        for rel, size in spec.objects():
            parent = ROOT_INODE
            *dirs, name = rel.split("/")
            for d in dirs:
                child = self.nodes[parent][4].get(d.encode())
                if child is None:
                    child, next_inode = next_inode, next_inode + 1
                    self.nodes[child] = (d, True, 0, "", {})
                    self.nodes[parent][4][d.encode()] = child
                    self.parents[child] = parent
                parent = child
            self.nodes[next_inode] = (name, False, size, object_key(spec, rel), {})
            self.nodes[parent][4][name.encode()] = next_inode
            self.parents[next_inode] = parent
            next_inode += 1
        self.uid, self.gid = os.getuid(), os.getgid()

    def _attr(self, inode: int) -> EntryAttributes:
        _, is_dir, size, _, _ = self.nodes[inode]
        stamp = 1_700_000_000 * 10**9
        return EntryAttributes(
            st_ino=inode, entry_timeout=TIMEOUT, attr_timeout=TIMEOUT,
            st_mode=(stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644), st_nlink=2 if is_dir else 1,
            st_uid=self.uid, st_gid=self.gid, st_size=size, st_blksize=1 << 20, st_blocks=(size + 511) // 512,
            st_atime_ns=stamp, st_mtime_ns=stamp, st_ctime_ns=stamp)

    async def lookup(self, parent, name, ctx):
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self.parents[parent])
        child = self.nodes[parent][4].get(name)
        if child is None:
            return EntryAttributes(st_ino=0, entry_timeout=TIMEOUT)
        return self._attr(child)

    async def forget(self, items):
        pass

    async def getattr(self, inode, ctx):
        return self._attr(inode)

    async def open(self, inode, flags, ctx):
        if self.nodes[inode][1]:
            raise FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        return FileInfo(fh=inode, direct_io=DIRECT_IO)

    async def read(self, fh, off, size):
        _, _, length, key, _ = self.nodes[fh]
        return read_range(key, length, off, size)

    async def release(self, fh):
        pass

    async def opendir(self, inode, ctx):
        if not self.nodes[inode][1]:
            raise FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start, token):
        entries = sorted(self.nodes[fh][4].items())
        for i in range(start, len(entries)):
            if not token.add(entries[i][0], self._attr(entries[i][1]), i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        return StatvfsData(f_bsize=4096, f_frsize=4096, f_namemax=255)


async def serve(mode: str, mountpoint: str) -> None:
    fd = mounting.mount(mountpoint, {"ro", "default_permissions", "fsname=sessionceiling", "subtype=sessionceiling"})
    session = Session(MemoryFS(mode), fd, workers=64)
    try:
        async with trio.open_nursery() as nursery:
            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for _ in signals:
                        session.terminate()
                        return
            nursery.start_soon(on_signal)
            await nursery.start(session.serve)
            await session.ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        mounting.unmount(mountpoint)
        os.close(fd)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], sys.argv[2])
