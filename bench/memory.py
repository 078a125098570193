"""What filling fresh memory costs against reusing it: the reason the mount reuses blocks.

    python3 bench/memory.py [FILE]     # FILE: any file of 1 GiB or more (default: a temporary one)

Reads 4 MiB pieces of FILE (from the kernel's page cache after the first pass) into
blocks that are freshly allocated (bytearray, anonymous mmap) or reused from a pool, while
the last 32 blocks stay referenced as the mount's page buffer would hold them, and prints
the cost per MiB of each.
"""

from __future__ import annotations

import mmap
import os
import sys
import tempfile
import time

BLOCK = 4 << 20
HELD = 32  # blocks kept referenced, like a 128 MiB page buffer
PASSES = 300


def measure(fd: int, blocks: int, make) -> float:
    held = []
    start = time.perf_counter()
    for i in range(PASSES):
        block = make()
        os.preadv(fd, [block], (i % blocks) * BLOCK)
        held.append(block)
        if len(held) > HELD:
            held.pop(0)
    return 1e6 * (time.perf_counter() - start) / (PASSES * BLOCK / (1 << 20))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    temp = None
    if path is None:
        temp = tempfile.NamedTemporaryFile(prefix="dorafs-memory-", delete=False)
        for _ in range(256):
            temp.write(os.urandom(BLOCK))
        temp.close()
        path = temp.name
    try:
        fd = os.open(path, os.O_RDONLY)
        blocks = max(1, os.fstat(fd).st_size // BLOCK)
        pool = [bytearray(BLOCK) for _ in range(HELD + 1)]
        turn = iter(range(1 << 62))
        measure(fd, blocks, lambda: pool[next(turn) % len(pool)])  # warm the page cache
        print(f"{'block':<24} {'us per MiB':>10}")
        for name, make in (("fresh bytearray", lambda: bytearray(BLOCK)),
                           ("fresh anonymous mmap", lambda: mmap.mmap(-1, BLOCK)),
                           ("reused from a pool", lambda: pool[next(turn) % len(pool)])):
            print(f"{name:<24} {measure(fd, blocks, make):>10.0f}", flush=True)
        os.close(fd)
    finally:
        if temp is not None:
            os.unlink(temp.name)


if __name__ == "__main__":
    main()
