"""What one S3 request costs the worker's client: boto3's CPU and wall time per call.

    python3 bench/s3calls.py [--mode full] [--calls 400]

Needs the dataset in s3rver (run `python3 bench/harness.py` once in the same mode). Starts
s3rver, then times `head_object` and a ranged `get_object` of the small files (128 KiB),
one call after another from one thread, as the worker makes them: the CPU seconds are this
process's own, so they are boto3's cost per call (signing, hooks, parsing, receiving), and
the rest of the wall time is the server's. A cold small-file read costs the worker a GET
(and a HEAD unless a listing brought the status).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import WORK, own_cpu  # noqa: E402
from servers import S3rver  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="full", help="the dataset's mode (prefix in the bucket)")
    p.add_argument("--calls", type=int, default=400, help="calls of each kind, on distinct files")
    args = p.parse_args()
    work = WORK / "s3calls"
    work.mkdir(parents=True, exist_ok=True)
    server = S3rver(work)
    try:
        s3 = server.client()
        listed = s3.list_objects_v2(Bucket="bench", Prefix=f"{args.mode}/small/", MaxKeys=args.calls)
        keys = [o["Key"] for o in listed.get("Contents", [])]
        if not keys:
            raise SystemExit(f"s3calls: no objects under bench/{args.mode}/small/ (run the harness once)")
        calls = {
            "head_object": lambda key: s3.head_object(Bucket="bench", Key=key),
            "get_object 128 KiB": lambda key: s3.get_object(Bucket="bench", Key=key,
                                                            Range="bytes=0-1048575")["Body"].read(),
        }
        print(f"{'call':<20} {'round':>5} {'wall ms':>8} {'CPU ms':>7}  (per call, {len(keys)} calls)")
        for name, call in calls.items():
            for round_ in (1, 2):
                wall, cpu = time.perf_counter(), own_cpu()
                for key in keys:
                    call(key)
                wall, cpu = time.perf_counter() - wall, own_cpu() - cpu
                print(f"{name:<20} {round_:>5} {wall / len(keys) * 1e3:>8.2f} {cpu / len(keys) * 1e3:>7.2f}",
                      flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
