"""Short-circuit reads: page files of a worker on this machine, read with pread.

A worker on loopback keeps its pages as files; asking it over HTTP for a page costs a
round trip and a 1 MiB body through two sockets, while reading the file costs one copy
from the kernel's page cache. So for a worker on this machine the client asks only where
the pages of a run are (`/v1/locate`: the worker fills them first if needed, and answers
their paths and checksums, no bodies) and reads the files itself, one after another
into one block, so that a read crossing from one page into the next needs no copy.

Why this cannot return wrong bytes: a page file's name holds the object version's id,
the page index and the page's checksum, and every page read here is checked against
that checksum before it is used. A file that is missing (evicted meanwhile), unreadable
(another user's cache) or corrupt is not used: the caller fetches the page over HTTP as
usual, where a corrupt page is verified and refetched by the worker.

Once a file has been read whole and matched its checksum, its descriptor is kept (a
bounded LRU), and later reads of that page that miss the mount's page buffer, the
random reads above all, are a `pread` of just the bytes asked for. Page files never
change under a name (the checksum is in it); a kept descriptor of a file the worker has
since evicted still reads the same bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Hashable

import xxhash


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Unreadable(Exception):
    """The file cannot be opened or read by this process (not merely corrupt)."""


class WouldBlock(Exception):
    """The file is not (wholly) in the kernel's page cache: reading it would wait for the disk."""


def descriptor_budget() -> int:
    """How many page files to keep open: a quarter of the descriptor limit, raised to
    its hard maximum first (a random reader of a 4 GiB file touches 4,096 pages)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    return max(64, min(16384, soft // 4))


class LocalPages:
    """Verified page files of local workers, by page key, with their descriptors kept."""

    def __init__(self, max_open: int | None = None):
        self.max_open = descriptor_budget() if max_open is None else max_open
        self._open: OrderedDict[Hashable, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    @staticmethod
    def read_page(into: memoryview, path: str, checksum: str, *, wait: bool = True) -> int | None:
        """Read a page file (path, checksum) into `into`, which is exactly its size.

        Returns the open descriptor when its bytes matched the checksum; None when the
        file is missing (evicted since the worker answered), shorter or corrupt. Raises
        Unreadable when it cannot be read at all (another user's cache). With `wait`
        false the read takes only what the kernel's page cache holds (RWF_NOWAIT) and
        raises WouldBlock for a file that would have to come from the disk.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unreadable(f"{path}: {exc.strerror}") from None
        try:
            got = os.preadv(fd, [into], 0, 0 if wait else os.RWF_NOWAIT) if len(into) else 0
        except BlockingIOError:
            os.close(fd)
            raise WouldBlock(path) from None
        except OSError as exc:
            os.close(fd)
            if not wait and exc.errno == errno.EOPNOTSUPP:  # a file system without RWF_NOWAIT
                raise WouldBlock(path) from None
            raise Unreadable(f"{path}: {exc.strerror}") from None
        if not wait and got != len(into):  # partly cached, or shorter: a waiting read decides
            os.close(fd)
            raise WouldBlock(path)
        if got != len(into) or xxhash.xxh3_64_hexdigest(into) != checksum:
            os.close(fd)
            return None
        return fd

    def keep(self, key: Hashable, fd: int) -> None:
        """Keep the descriptor of a verified page file (closing the least recent past the budget)."""
        self._keep(key, fd)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._open

    def pread(self, key: Hashable, length: int, offset: int) -> bytes | None:
        """Bytes of a verified page, or None if its descriptor is not kept."""
        fd = self._open.get(key)
        if fd is None:
            return None
        self._open.move_to_end(key)
        return os.pread(fd, length, offset)

    def readinto(self, key: Hashable, view: memoryview, offset: int) -> bool:
        """Fill `view` from a verified page at `offset`; False if its descriptor is not kept."""
        fd = self._open.get(key)
        if fd is None:
            return False
        self._open.move_to_end(key)
        got = os.preadv(fd, [view], offset)
        if got != len(view):  # a page file never shrinks under its name: the caller asked past its end
            raise ValueError(f"page file short by {len(view) - got} bytes at {offset}")
        return True

    def _keep(self, key: Hashable, fd: int) -> None:
        old = self._open.pop(key, None)
        if old is not None:
            os.close(old)
        self._open[key] = fd
        while len(self._open) > self.max_open:
            os.close(self._open.popitem(last=False)[1])

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])
