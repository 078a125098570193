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
import resource
import select
import socket
import time

import trio


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def read_all(fd: int, wait) -> int:
    waits = 0
    while True:
        try:
            if not os.read(fd, 4096):
                return waits
        except BlockingIOError:
            waits += 1
            wait()


async def read_all_trio(fd: int) -> int:
    waits = 0
    while True:
        try:
            if not os.read(fd, 4096):
                return waits
        except BlockingIOError:
            waits += 1
            await trio.lowlevel.wait_readable(fd)


def measure(way: str, messages: int, gap: float) -> float:
    sock, pid = sender(messages, gap)
    try:
        began = cpu()
        if way == "poll":
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            waits = read_all(sock.fileno(), poller.poll)
        else:
            waits = trio.run(read_all_trio, sock.fileno())
        return (cpu() - began) / max(waits, 1) * 1e6
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
