"""Inode numbers for paths, with the kernel's lookup counts.

An inode exists while the kernel holds a reference to it (lookup count > 0) or while a
file or directory handle uses it. Paths are relative to the mount root ('' is the root).
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dorafs.fuse.types import ROOT_INODE, FUSEError
from dorafs.ufs import FileStatus, join

if TYPE_CHECKING:
    from dorafs.client.writes import WriteFile


@dataclass(eq=False)
class Node:
    inode: int
    path: str
    uri: str
    status: FileStatus
    lookups: int = 0
    open_handles: int = 0
    # Open handles that may use the kernel's page cache: all but passthrough ones (a
    # direct_io handle does when it is mmapped).
    cached_opens: int = 0
    page_cache_reads: bool = False  # a cold open of it was read as the page cache serves better (fuse/operations.py)
    # Version whose pages the kernel may hold in its page cache for this inode; None
    # when it may hold pages of more than one version (then the next open flushes them).
    kernel_version: str | None = None
    # Version whose attributes (size, mtime) were last given to the kernel; None if unsure.
    attr_version: str | None = None
    open_versions: dict[str, int] = field(default_factory=dict)
    writer: WriteFile | None = None  # staged content while the file is open for writing
    # False once unlinked or replaced by a rename: the node lives on for its open handles
    # and the kernel's references, with the status it had, and st_nlink 0.
    linked: bool = True
    # A directory's subdirectories, counted when a listing of it was read to its end
    # (and when), and kept in step by mkdir/rmdir through this mount: st_nlink is 2 + it.
    subdirs: int | None = None
    subdirs_at: float = 0.0


class InodeTable:
    def __init__(self, root_uri: str, root_status: FileStatus):
        self._numbers = itertools.count(ROOT_INODE + 1)
        root = Node(ROOT_INODE, "", root_uri, root_status, lookups=1)
        self._by_inode: dict[int, Node] = {root.inode: root}
        self._by_path: dict[str, Node] = {"": root}

    def __len__(self) -> int:
        return len(self._by_inode)

    def __getitem__(self, inode: int) -> Node:
        node = self._by_inode.get(inode)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def child(self, parent: Node, name: str, status: FileStatus) -> Node:
        """The node for parent/name, created if needed, with its status refreshed."""
        path = f"{parent.path}/{name}" if parent.path else name
        node = self._by_path.get(path)
        if node is None:
            node = Node(next(self._numbers), path, join(parent.uri, name), status)
            self._by_inode[node.inode] = node
            self._by_path[path] = node
        else:
            node.status = status
        return node

    def at(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def detach(self, node: Node) -> None:
        """The node's path no longer names it (unlinked, removed, replaced by a rename).
        It lives on by inode while the kernel or an open handle still refers to it."""
        node.linked = False
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        self.release_if_unused(node)

    def move(self, old_path: str, new_parent: Node, new_name: str) -> list[Node]:
        """A rename: the node at `old_path` and every node under it take their new paths
        and URIs. Whatever the new path named before is detached. Returns the moved nodes."""
        new_path = f"{new_parent.path}/{new_name}" if new_parent.path else new_name
        new_uri = join(new_parent.uri, new_name)
        under = old_path + "/"
        moved = [n for p, n in self._by_path.items() if p == old_path or p.startswith(under)]
        replaced = [n for p, n in self._by_path.items() if p == new_path or p.startswith(new_path + "/")]
        for node in replaced + moved:
            self._by_path.pop(node.path, None)
        for node in moved:
            suffix = node.path[len(old_path):]
            node.path, node.uri = new_path + suffix, new_uri + suffix
            self._by_path[node.path] = node
        for node in replaced:
            if node not in moved:
                node.linked = False
                self.release_if_unused(node)
        return moved

    def parent_of(self, node: Node) -> Node:
        if not node.path:
            return node
        return self._by_path.get(node.path.rpartition("/")[0]) or self._by_path[""]

    def forget(self, inode: int, count: int) -> None:
        node = self._by_inode.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups -= count
        self.release_if_unused(node)

    def release_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node.open_handles <= 0 and node.inode != ROOT_INODE:
            self._by_inode.pop(node.inode, None)
            if self._by_path.get(node.path) is node:
                del self._by_path[node.path]
