"""What one wake-up costs the waiting process: a blocking poll, and trio's loop.

    python3 bench/wakeups.py [--messages 5000] [--gap-us 200]

A child process sends `--messages` messages of 600 bytes over a socket pair, one every
`--gap-us` microseconds, so that the reader always finds the socket empty and waits;
the reader reads each as the mount reads a worker's stream (`os.read` until EAGAIN,
then wait): once waiting in `poll`, once in trio (`wait_readable`, as
dorafs/client/transport.py does). CPU microseconds of the reader per wait, each way
twice, alternately. Every request the mount or the worker waits for costs at least this.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import own_cpu  # noqa: E402


def sender(messages: int, gap: float) -> tuple[socket.socket, int]:
    """The reading end of a socket pair, and the pid of the child writing into it."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        for _ in range(messages):
            theirs.send(b"x" * 600)
            time.sleep(gap)
        theirs.close()
        os._exit(0)
    theirs.close()
    ours.setblocking(False)
    return ours, pid


async def read_all(fd: int, wait) -> int:
    """Read `fd` to its end, `await wait()` whenever it is empty; how many waits."""
    waits = 0
    while True:
        try:
            if not os.read(fd, 4096):
                return waits
        except BlockingIOError:
            waits += 1
            await wait()


def measure(way: str, messages: int, gap: float) -> float:
    sock, pid = sender(messages, gap)
    try:
        if way == "poll":  # blocks the thread, never yields to trio's loop
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)

            async def wait() -> None:
                poller.poll()
        else:
            async def wait() -> None:
                await trio.lowlevel.wait_readable(sock.fileno())
        began = own_cpu()
        waits = trio.run(read_all, sock.fileno(), wait)
        return (own_cpu() - began) / max(waits, 1) * 1e6
    finally:
        sock.close()
        os.waitpid(pid, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--gap-us", type=float, default=200)
    args = p.parse_args()
    costs: dict[str, list[float]] = {"poll": [], "trio": []}
    for _ in range(2):
        for way in costs:
            costs[way].append(measure(way, args.messages, args.gap_us / 1e6))
    for way, got in costs.items():
        print(f"{way}: {', '.join(f'{c:.1f}' for c in got)} CPU microseconds per wait")


if __name__ == "__main__":
    main()
