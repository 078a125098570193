"""A tiny file system served by dorafs's FUSE session, for the session's own tests.

`python -m tests.fusetoy MOUNTPOINT` mounts it (mount(2) as root, fusermount3 otherwise)
and serves until unmounted, printing one JSON line on stdout once serving (what INIT
settled) and one when it ends (the session's statistics and what the adapter saw).
Files: `hello` ("hello world\n"), `big` (2 MiB of a counting pattern), `slow` (a read
that waits until interrupted: its handler says when it starts and when its work is
cancelled, one JSON line each).
"""

from __future__ import annotations

import errno
import json
import stat
import sys

import trio

from dorafs.fuse.mounting import mount, unmount
from dorafs.fuse.session import Session
from dorafs.fuse.types import ROOT_INODE, EntryAttributes, FileInfo, FUSEError, StatvfsData

BIG = bytes(i % 251 for i in range(2 << 20))
FILES = {b"hello": b"hello world\n", b"big": BIG, b"slow": b"x" * 4096}


def _say(**event) -> None:
    if __name__ == "__main__":
        print(json.dumps(event), flush=True)


class ToyOperations:
    def __init__(self):
        self.names = {2 + i: name for i, name in enumerate(FILES)}
        self.inodes = {name: ino for ino, name in self.names.items()}
        self.lookups: dict[int, int] = {}
        self.cancelled_reads = 0
        self.reads = 0

    def _attr(self, ino: int) -> EntryAttributes:
        a = EntryAttributes(st_ino=ino, entry_timeout=60, attr_timeout=60, st_uid=0, st_gid=0)
        if ino == ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, len(FILES[self.names[ino]])
        return a

    async def lookup(self, parent, name, ctx):
        if parent != ROOT_INODE or name not in self.inodes:
            raise FUSEError(errno.ENOENT)
        ino = self.inodes[name]
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attr(ino)

    async def forget(self, items):
        for ino, n in items:
            self.lookups[ino] -= n
            if not self.lookups[ino]:
                del self.lookups[ino]

    async def getattr(self, ino, ctx):
        if ino != ROOT_INODE and ino not in self.names:
            raise FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def open(self, ino, flags, ctx):
        return FileInfo(fh=ino, direct_io=self.names[ino] == b"slow")

    async def read(self, fh, off, size):
        self.reads += 1
        if self.names[fh] == b"slow":
            _say(slow_read="started")
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled_reads += 1
                _say(slow_read="cancelled")
                raise
        return memoryview(FILES[self.names[fh]])[off:off + size]

    async def release(self, fh):
        pass

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start, token):
        for i, (ino, name) in enumerate(sorted(self.names.items())):
            if i < start:
                continue
            if not token.add(name, self._attr(ino), i + 1):
                return
            if token.plus:
                self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        return StatvfsData(f_bsize=4096, f_frsize=4096, f_namemax=255)


async def main(mountpoint: str) -> None:
    ops = ToyOperations()
    fd = mount(mountpoint, {"ro", "fsname=toy", "subtype=toy", "default_permissions"})
    session = Session(ops, fd, workers=8)
    try:
        async with trio.open_nursery() as nursery:
            settled = await nursery.start(session.serve)
            print(json.dumps({"serving": True, "minor": settled.minor, "flags": settled.flags,
                              "kernel_flags": settled.kernel_flags, "max_write": settled.max_write,
                              "max_pages": settled.max_pages}), flush=True)
    finally:
        import os
        os.close(fd)
        unmount(mountpoint)
    print(json.dumps({"ended": session.end_reason, "lookups": {str(k): v for k, v in ops.lookups.items()},
                      "cancelled_reads": ops.cancelled_reads, **session.statistics()}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
