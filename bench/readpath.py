"""What one cached 4 KiB read costs the mount below the FUSE device, in thread CPU time.

    python3 bench/readpath.py [--checkout DIR] [--reads 50000] [--rounds 5] [--held]

Builds, in one process, what a mount has behind its session: a DoraClient with 16 page
files of 1 MiB kept open as verified local pages (as the embedded worker's would be),
DoraOperations with an open handle on them, and the FUSE Dispatcher; then calls the
dispatcher's READ handler with random 4 KiB reads, as the session does for each request,
and prints the thread CPU per read (best of `--rounds`; thread time, so the machine's other
load hardly moves it). What it leaves out: the device's read and write, and the
scheduler. `--held`: the handle holds one verified object file of the 16 pages
instead (dorafs/fuse/objectfiles.py: a version wholly cached on this machine, where the
kernel does not read it through passthrough). `--checkout` measures another checkout's code (default: this one), so two
commits can be compared in turns.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

PAGE = 1 << 20
PAGES = 16


async def measure(root: Path, reads: int, rounds: int, held: bool) -> list[float]:
    from dorafs.client.client import DoraClient
    from dorafs.client.writes import Staging
    from dorafs.config import MountConfig
    from dorafs.fuse import protocol as p
    from dorafs.fuse.dispatch import Dispatcher
    from dorafs.fuse.handles import FileHandle
    from dorafs.fuse.operations import DoraOperations
    from dorafs.membership import Membership
    from dorafs.ufs import UfsSet
    from dorafs.ufs.base import FileStatus

    config = MountConfig()
    client = DoraClient(config, Membership(), UfsSet())
    ops = DoraOperations(client, config, "file:///bench", FileStatus("", True), Staging(config, client.ufs))
    status = FileStatus("big", False, PAGES * PAGE, 0.0, "v1")
    # Checkouts before the client's split by concern: `open` and `_key` on the client.
    opened = client.open_pinned("file:///bench/big", status) if hasattr(client, "open_pinned") else \
        client.open("file:///bench/big", status)
    key = client.reader.key if hasattr(client, "reader") else client._key
    handle = ops._handles[7] = FileHandle(None, opened)
    if held:
        from dorafs.fuse.objectfiles import HeldFile
        whole = root / "object"
        whole.write_bytes(os.urandom(PAGES * PAGE))
        handle.held = HeldFile(("file:///bench/big", "v1"), os.open(whole, os.O_RDONLY), PAGES * PAGE)
    for i in range(PAGES):
        path = root / f"p{i}"
        path.write_bytes(os.urandom(PAGE))
        client.local.keep(key(opened, i), os.open(path, os.O_RDONLY), PAGE)
    read = Dispatcher(ops).handlers[p.READ]
    header = (0, p.READ, 1, 5, 0, 0, 0)
    rng = random.Random(1)
    bodies = [memoryview(p.READ_IN.struct.pack(7, rng.randrange(PAGES * PAGE // 4096) * 4096, 4096, 0, 0, 0))
              for _ in range(reads)]
    for body in bodies[:2000]:  # warm: the page cache and the interpreter's caches
        await read(header, body)
    per_read = []
    for _ in range(rounds):
        start = time.thread_time()
        for body in bodies:
            await read(header, body)
        per_read.append((time.thread_time() - start) / reads * 1e6)
    client.local.close()
    return per_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--reads", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--held", action="store_true", help="the handle holds a verified object file")
    args = ap.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        per_read = trio.run(measure, Path(tmp), args.reads, args.rounds, args.held)
    what = "held object file" if args.held else "kept page file"
    print(f"{args.checkout.name}: cached 4 KiB read, dispatcher to {what}: {min(per_read):.2f} µs thread CPU "
          f"(best of {args.rounds}; rounds {', '.join(f'{x:.2f}' for x in per_read)})")


if __name__ == "__main__":
    main()
