"""What serving a cold read costs the S3 server: its CPU per GiB by GET length and GETs in flight.

    .venv/bin/python bench/storegets.py [--mode full] [--rounds 2]

Needs the dataset in s3rver (run `python3 bench/harness.py --full` once; `--mode quick`
reads the quick dataset's 256 MiB object instead). Starts s3rver, then reads the large
object once per cell as ranged GETs of one length, a number of them in flight at once
(one thread each, a new connection per GET), and prints the server's CPU seconds per
GiB served and the rate. The client is as cheap as a client gets (botocore only signs;
the body is received with `recv_into` into one buffer per thread), so the server's share
of a cold read on a shared machine is what the table shows: on two cores, every CPU
second the server spends is one the mount, its worker and the reader do not get.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataset import SPECS  # noqa: E402
from procs import WORK, cpu_seconds, each_at_once  # noqa: E402
from servers import S3rver  # noqa: E402

MiB = 1 << 20
CELLS = [(8, 1), (8, 2), (8, 4), (8, 8), (4, 4), (4, 8), (16, 2), (16, 4), (16, 8)]  # (MiB per GET, in flight)


def get(server: S3rver, key: str, start: int, length: int, buffer: bytearray) -> None:
    """One signed ranged GET on a connection of its own, its answer received into `buffer`."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = f"127.0.0.1:{server.port}"
    request = AWSRequest(method="GET", url=f"http://{host}/bench/{key}",
                         headers={"Range": f"bytes={start}-{start + length - 1}", "Host": host})
    S3SigV4Auth(Credentials(server.key, server.secret), "s3", "us-east-1").add_auth(request)
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    view = memoryview(buffer)
    got = 0
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"GET /bench/{key} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
        while n := s.recv_into(view):
            got += n
    if got < length:
        raise SystemExit(f"storegets: a GET of {length} bytes brought {got}: {bytes(view[:min(got, 300)])!r}")


def cell(server: S3rver, key: str, size: int, length: int, at_once: int) -> tuple[float, float]:
    """Read the object as GETs of `length`, `at_once` in flight: (server CPU-s per GiB, MiB/s)."""
    before, began = cpu_seconds(server.proc.pid), time.monotonic()
    each_at_once(range(0, size - size % length, length), at_once,
                 lambda start, buffer: get(server, key, start, length, buffer),
                 per_thread=lambda: bytearray(length + 64 * 1024))
    seconds = time.monotonic() - began
    served = (size - size % length) / (1 << 30)
    return (cpu_seconds(server.proc.pid) - before) / served, served * 1024 / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=sorted(SPECS), default="full", help="which dataset's large object")
    p.add_argument("--rounds", type=int, default=2, help="times each cell is measured (cells rotate within a round)")
    args = p.parse_args()
    spec = SPECS[args.mode]
    key, size = f"{args.mode}/large/big.bin", spec.large_size
    work = WORK / "storegets"
    work.mkdir(parents=True, exist_ok=True)
    server = S3rver(work)
    results: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in CELLS}
    try:
        for r in range(args.rounds):
            for length, at_once in CELLS:
                cpu, rate = cell(server, key, size, length * MiB, at_once)
                results[(length, at_once)].append((cpu, rate))
                print(f"round {r + 1}: {length:>2} MiB GETs, {at_once} in flight: s3rver {cpu:.2f} CPU-s/GiB, "
                      f"{rate:.0f} MiB/s", flush=True)
    finally:
        server.stop()
    print("\n| GET length | in flight | s3rver CPU-s per GiB (each round) | MiB/s (each round) |")
    print("|---|---|---|---|")
    for (length, at_once), rows in results.items():
        print(f"| {length} MiB | {at_once} | {', '.join(f'{c:.2f}' for c, _ in rows)} | "
              f"{', '.join(f'{m:.0f}' for _, m in rows)} |")


if __name__ == "__main__":
    main()
