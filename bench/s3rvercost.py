"""What s3rver itself spends to serve bytes, by how a client asks for them and receives them.

    .venv/bin/python bench/s3rvercost.py [--mib 512] [--rounds 4] [--ways 16x3,16x1] [--trace-gc]

Every cold figure of bench/ is taken against one s3rver on the same two cores as the
system measured, so its CPU per byte bounds them all. This reads the large object of the
full dataset (bench/harness.py --full uploads it) with plain HTTP GETs of presigned URLs
from threads of this process (no S3 client library in the way), in runs of 1, 8 or 64
MiB, one or several at once, receiving with `recv_into` of a given size (and for the
last ways, stopping a moment after each MiB received, as a receiver that writes each page
before it receives the next: `recv_into` with MSG_WAITALL, then a sleep), and prints
s3rver's CPU seconds per GiB (its /proc stat, all threads) and the rate for each way of
asking. The ways are interleaved round after round, so a drift of the machine shows as a
spread within one row, not as a difference between rows. `--trace-gc` also counts
s3rver's full collections of its heap in each way (V8's Mark-Compact), which decide its
cost per byte without the heap room bench/servers.py gives it (`BENCH_S3RVER_NODE_FLAGS=`
runs it without: see bench/README.md, "s3rver's two costs per byte").
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import cpu_seconds, each_at_once  # noqa: E402
from servers import S3RVER_NODE_FLAGS, S3rver  # noqa: E402

KEY = "full/large/big.bin"
MiB = 1 << 20
# (run, at once, receive size, SO_RCVBUF or None, seconds stopped after each receive)
WAYS = [(8 * MiB, 3, 256 << 10, None, 0.0), (8 * MiB, 3, 64 << 10, None, 0.0), (8 * MiB, 3, MiB, None, 0.0),
        (8 * MiB, 3, 256 << 10, 4 * MiB, 0.0), (8 * MiB, 1, 256 << 10, None, 0.0), (64 * MiB, 1, 256 << 10, None, 0.0),
        (MiB, 1, 256 << 10, None, 0.0), (MiB, 3, 256 << 10, None, 0.0),
        (16 * MiB, 3, MiB, None, 0.0), (16 * MiB, 3, MiB, None, 0.001), (16 * MiB, 3, MiB, None, 0.003)]


def get(port: int, path: str, start: int, length: int, recv: int, rcvbuf: int | None, pause: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Range: bytes={start}-{start + length - 1}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("s3rver closed the connection before its headers")
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        first_line = status.split(b"\r\n", 1)[0]
        if b" 206 " not in first_line:
            raise RuntimeError(f"s3rver answered {first_line!r}")
        got, buf = len(rest), memoryview(bytearray(recv))
        while got < length:
            if pause:  # a whole piece, then the stop
                n = s.recv_into(buf, min(recv, length - got), socket.MSG_WAITALL)
            else:
                n = s.recv_into(buf)
            if not n:
                raise RuntimeError(f"short body: {got} of {length} bytes")
            got += n
            if pause:
                time.sleep(pause)


def one_way(port: int, path: str, pid: int, total: int, way: tuple, log: Path | None = None) -> tuple[float, float, int]:
    """(s3rver CPU-s per GiB, MiB/s, full collections of its heap or -1) for `total` bytes read one way."""
    run, at_once, recv, rcvbuf, pause = way
    logged = log.stat().st_size if log else 0
    cpu, began = cpu_seconds(pid), time.monotonic()
    each_at_once(range(0, total, run), at_once,
                 lambda start, _: get(port, path, start, min(run, total - start), recv, rcvbuf, pause))
    wall, spent = time.monotonic() - began, cpu_seconds(pid) - cpu
    full = -1
    if log:
        with open(log, "rb") as f:
            f.seek(logged)
            full = f.read().count(b"Mark-Compact")
    return spent / (total / (1 << 30)), total / MiB / wall, full


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="bytes read per way and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--trace-gc", action="store_true", help="run s3rver with V8's --trace-gc and count its full "
                   "collections (Mark-Compact) in each way")
    p.add_argument("--ways", metavar="RUNxAT,...", help="these ways instead, each RUN MiB GETs AT at once, received "
                   "a MiB at a time (e.g. 16x1,16x3,16x8)")
    args = p.parse_args()
    ways = WAYS if not args.ways else [(int(run) * MiB, int(at), MiB, None, 0.0)
                                       for run, at in (w.split("x") for w in args.ways.split(","))]
    if not S3rver.available():
        print("s3rvercost: s3rver is not installed (bash bench/setup.sh)", file=sys.stderr)
        return 1
    work = Path(__file__).resolve().parent / ".cache" / "work" / "s3rvercost"
    work.mkdir(parents=True, exist_ok=True)
    server = S3rver(work, ("--trace-gc",) if args.trace_gc else ())
    log = server.log_path if args.trace_gc else None
    try:
        client = server.client()
        try:
            size = client.head_object(Bucket="bench", Key=KEY)["ContentLength"]
        except Exception as exc:
            print(f"s3rvercost: no s3://bench/{KEY} in s3rver ({exc}); run bench/harness.py --full once",
                  file=sys.stderr)
            return 1
        url = client.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": KEY}, ExpiresIn=3600)
        path = url.split(f":{server.port}", 1)[1]
        total = min(size, args.mib * MiB)
        pid = server.proc.pid
        # Untimed first: s3rver's first requests after it started cost it more (its code warming up).
        one_way(server.port, path, pid, min(size, 64 * MiB), (8 * MiB, 3, 256 << 10, None, 0.0))
        results: dict[tuple, list[tuple[float, float, int]]] = {way: [] for way in ways}
        for r in range(args.rounds):
            for way in ways:
                results[way].append(one_way(server.port, path, pid, total, way, log))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        flags = " ".join(S3RVER_NODE_FLAGS) or "none"
        print(f"s3rver (node flags: {flags}) serving {total // MiB} MiB of s3://bench/{KEY} per way and round, "
              f"{args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the end\n")
        gc = " full collections, each round |" if args.trace_gc else ""
        print("| run | at once | recv | SO_RCVBUF | stop after each | s3rver CPU-s/GiB, each round | median | MiB/s, median |"
              + gc)
        print("|---|---|---|---|---|---|---|---|" + ("---|" if gc else ""))
        for (run, at_once, recv, rcvbuf, pause), got in results.items():
            cpus = [c for c, _, _ in got]
            print(f"| {run // MiB} MiB | {at_once} | {recv >> 10} KiB | {'default' if rcvbuf is None else f'{rcvbuf // MiB} MiB'} "
                  f"| {f'{pause * 1000:g} ms' if pause else '–'} "
                  f"| {', '.join(f'{c:.2f}' for c in cpus)} | {statistics.median(cpus):.2f} "
                  f"| {statistics.median(r for _, r, _ in got):.0f} |"
                  + (f" {', '.join(str(n) for _, _, n in got)} |" if gc else ""))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
