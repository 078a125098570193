"""The one rule from a membership to a hash ring, shared by the mount and the scheduler.

A load job must put every page on the worker a mount will ask for it, so the scheduler,
`dorafs-admin ring` and the client build their ring here, from the same worker list, and
route a file by its full normalized UFS URI: the owner is `ring.candidates(uri)[0]`.

Workers whose page size differs from the cluster's (the most common one) are left off
the ring: their pages would not line up with the pages the mount asks for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from dorafs.membership import WorkerInfo
from dorafs.ring import HashRing


@dataclass
class Routing:
    ring: HashRing
    page_size: int | None  # the cluster's page size; None without workers
    workers: dict[str, WorkerInfo]  # the workers on the ring, by id
    left_out: list[str] = field(default_factory=list)  # ids with another page size

    def candidates(self, uri: str, limit: int | None = None) -> list[WorkerInfo]:
        """Workers for a key in the order a client tries them; the first owns it."""
        return [self.workers[wid] for wid in self.ring.candidates(uri, limit)]

    def owner(self, uri: str) -> WorkerInfo | None:
        found = self.ring.candidates(uri, 1)
        return self.workers[found[0]] if found else None


def build_routing(workers: Mapping[str, WorkerInfo], page_size: int | None = None) -> Routing:
    """The ring over `workers`; `page_size` defaults to the most common one among them."""
    if page_size is None:
        sizes = Counter(w.page_size for w in workers.values())
        page_size = sizes.most_common(1)[0][0] if sizes else None
    on_ring = {wid: w for wid, w in workers.items() if w.page_size == page_size}
    left_out = sorted(wid for wid in workers if wid not in on_ring)
    return Routing(HashRing(list(on_ring)), page_size, on_ring, left_out)
