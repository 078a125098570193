"""The system CPU of writing new bytes into the page cache, by the size of each write call.

    python3 bench/pagewrites.py [--mib 512] [--pieces 64K,512K,1M] [--rounds 3] [--pause 8]

Each run writes `--mib` MiB into a new file under bench/.cache (1 MiB pages, each in
write calls of one piece size, the way the worker's page store writes a page), then
removes it, and prints the system CPU seconds the writes took. Runs rotate through
the piece sizes, `--pause` seconds apart: memory freed a while ago may have been taken
back by a virtual machine's host (free page reporting), and a write that lands in it
pays for that. The table gives every run's figure, so the spread shows.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

MiB = 1 << 20
HERE = Path(__file__).resolve().parent


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def write_pages(path: Path, total: int, piece: int) -> float:
    """System CPU seconds to write `total` bytes as 1 MiB pages in `piece`-byte calls."""
    page = memoryview(bytearray(os.urandom(MiB)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        for at in range(0, total, MiB):
            view, offset = page, at
            while view:
                n = os.pwrite(fd, view[:piece], offset)
                view, offset = view[n:], offset + n
        return resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--pieces", default="64K,512K,1M", help="write call sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pause", type=float, default=8.0, help="seconds before each run")
    args = p.parse_args()
    pieces = [size(x) for x in args.pieces.split(",")]
    path = HERE / ".cache" / "pagewrites.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[int, list[float]] = {piece: [] for piece in pieces}
    for r in range(args.rounds):
        for piece in pieces:
            time.sleep(args.pause)
            seen[piece].append(write_pages(path, args.mib * MiB, piece))
            print(f"round {r + 1}: {piece >> 10:>5} KiB writes: {seen[piece][-1]:.2f} system CPU-s", flush=True)
    print(f"\n| write call | system CPU-s per GiB, each run ({args.mib} MiB each) |\n|---|---|")
    for piece, runs in seen.items():
        print(f"| {piece >> 10} KiB | " + ", ".join(f"{x * 1024 / args.mib:.2f}" for x in runs) + " |")


if __name__ == "__main__":
    main()
