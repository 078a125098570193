"""Page-file writes from a thread beside a busy interpreter: what the interpreter lock costs them.

    python3 bench/gilwrites.py [--mib 128] [--rounds 2]

A worker's receiving thread writes each page into its file in pieces of 64 KiB
(worker/pagestore.py `WRITE_PIECE`: larger writes take larger folios, which cost more
system CPU, bench/pagewrites.py). Each `os.pwrite` lets go of the interpreter lock and
takes it back after; while another thread runs Python (the worker's event loop), that
taking back waits until the other thread lets go, at most the switch interval (5 ms by
default). This writes `--mib` MiB in 64 KiB and in 1 MiB pieces under bench/.cache,
alone and beside a thread running Python without a pause, at switch intervals of 5 and
0.5 ms: the writer's MiB/s and its voluntary context switches (each a wait for the lock
or for the disk).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import WORK  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


def write_file(path: Path, mib: int, piece: int, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for m in range(mib):
            for at in range(0, MiB, piece):
                os.pwrite(fd, data[at:at + piece], m * MiB + at)
    finally:
        os.close(fd)


def one(path: Path, mib: int, piece: int, busy: bool, data: memoryview) -> tuple[float, int]:
    """The writer's MiB/s and voluntary switches, alone or beside a spinning thread."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin) if busy else None
    if spinner:
        spinner.start()
    try:
        before = resource.getrusage(resource.RUSAGE_THREAD)
        began = time.perf_counter()
        write_file(path, mib, piece, data)
        took = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_THREAD)
    finally:
        stop.set()
        if spinner:
            spinner.join()
        path.unlink(missing_ok=True)
    return mib / took, after.ru_nvcsw - before.ru_nvcsw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=128, help="written per run")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"gilwrites-{os.getpid()}.dat"
    data = memoryview(bytearray(os.urandom(MiB)))
    rows: dict[tuple[float, int, bool], list[tuple[float, int]]] = {}
    for r in range(args.rounds):
        for interval in (0.005, 0.0005):
            sys.setswitchinterval(interval)
            for piece in (64 * KiB, MiB):
                for busy in (False, True):
                    rate, switches = one(path, args.mib, piece, busy, data)
                    rows.setdefault((interval, piece, busy), []).append((rate, switches))
                    print(f"round {r + 1}: switch interval {interval * 1000:g} ms, {piece // KiB} KiB pieces, "
                          f"{'beside a busy thread' if busy else 'alone'}: {rate:.0f} MiB/s, "
                          f"{switches} voluntary switches", flush=True)
    sys.setswitchinterval(0.005)
    print("\n| switch interval | write size | alone, MiB/s | beside a busy thread, MiB/s | its voluntary switches |\n"
          "|---|---|---|---|---|")
    for interval in (0.005, 0.0005):
        for piece in (64 * KiB, MiB):
            alone = rows[(interval, piece, False)]
            busy = rows[(interval, piece, True)]
            print(f"| {interval * 1000:g} ms | {piece // KiB} KiB | {', '.join(f'{a:.0f}' for a, _ in alone)} | "
                  f"{', '.join(f'{b:.0f}' for b, _ in busy)} | {statistics.median(s for _, s in busy):.0f} |")


if __name__ == "__main__":
    main()
