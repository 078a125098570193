"""S3-compatible servers on loopback: s3rver (the main one) and moto (optional).

s3rver (npm) stores objects as files and answers a ranged GET by streaming from the
offset, so a ranged read costs the same on a 1 GiB object as on a 1 MiB one. moto keeps
objects in memory and its ranged GET cost grows with the object's size (DESIGN.md), so
it is here only for comparison (`--s3 moto`).

s3rver 3.7 creates continuation tokens with a cipher that OpenSSL 3 (Node >= 17) only
offers through the legacy provider; without it every truncated listing fails with
ERR_OSSL_EVP_UNSUPPORTED. So it runs with NODE_OPTIONS=--openssl-legacy-provider.

Both servers log one line per request; `requests()` counts them, so each measurement
can report how many S3 requests it caused.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from procs import CACHE, Tracked, free_port, port_open, wait_for

S3RVER_BIN = CACHE / "node" / "node_modules" / ".bin" / "s3rver"
# s3rver's V8 heap starts with room for 128 MB of old objects. Without it, its cost per
# byte served flips between two states: with its heap small (11-15 MB live), the
# collector's limit for a full collection counts the 64 KiB buffers each read streams,
# and once it is reached s3rver collects the whole heap every 20 MiB or so (20-30 full
# collections per 512 MiB, 1.8-2.8 CPU-s a GiB), else it frees them in young-generation
# collections alone (0-5 full ones, 1.2-1.6 CPU-s a GiB). Which state a pass meets
# depends on what s3rver served before it, not on the client timed: the same GETs met
# both within one run. With the room, no full collection in any way of asking, 1.1-1.4
# CPU-s a GiB (bench/README.md, "s3rver's two costs per byte"). BENCH_S3RVER_NODE_FLAGS
# replaces the flags ("" for s3rver as it comes).
S3RVER_NODE_FLAGS = os.environ.get("BENCH_S3RVER_NODE_FLAGS", "--initial-old-space-size=128").split()
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")


class S3Server:
    name = "s3"
    key = secret = "bench"
    persistent = False  # does the data survive a restart (skip the upload)?
    _request_line: re.Pattern[bytes]

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Tracked | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(max_pool_connections=16, retries={"mode": "standard"}))

    def _wait(self) -> None:
        def ready():
            if not self.proc.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.proc.log_tail()}")
            return port_open(self.port)
        wait_for(ready, timeout=30, what=self.name)

    def requests(self) -> int:
        """Requests served so far (lines of the request log)."""
        try:
            with open(self.proc.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return 0
        return len(self._request_line.findall(_ANSI.sub(b"", data)))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def clear(self, prefix: str) -> None:
        """Forget an older upload under `prefix` (before uploading the dataset again)."""


class S3rver(S3Server):
    name = "s3rver"
    key = secret = "S3RVER"  # s3rver's built-in credentials
    persistent = True
    # "info: /bench/quick/large/big.bin 206 3ms 1mb"
    _request_line = re.compile(rb"^info: \S+ \d{3} [\d,.]+m?s ", re.M)

    def __init__(self, workdir: Path, extra_node_flags: tuple[str, ...] = ()):
        super().__init__(workdir)
        self.log_path = workdir / "s3rver.log"
        self.data_dir = CACHE / "s3rver-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["NODE_OPTIONS"] = (env.get("NODE_OPTIONS", "") + " --openssl-legacy-provider").strip()
        node = shutil.which("node") or "node"
        self.proc = Tracked("s3rver", [node, *S3RVER_NODE_FLAGS, *extra_node_flags, S3RVER_BIN, "-d", self.data_dir, "-a", "127.0.0.1",
                                       "-p", self.port], workdir / "s3rver.log", env=env)
        self._wait()

    def clear(self, prefix: str) -> None:
        # s3rver keeps each object as files under <data>/<bucket>/<key>; it has no index.
        shutil.rmtree(self.data_dir / "bench" / prefix, ignore_errors=True)

    @staticmethod
    def available() -> bool:
        return S3RVER_BIN.exists() and shutil.which("node") is not None


class Moto(S3Server):
    name = "moto"
    key = secret = "testing"
    # 127.0.0.1 - - [21/Nov/2026 02:04:55] "GET /bench/... HTTP/1.1" 206 -
    _request_line = re.compile(rb'"(?:GET|HEAD|PUT|POST|DELETE) [^"]*HTTP/1\.\d" \d{3}')

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.proc = Tracked("moto", ["moto_server", "-H", "127.0.0.1", "-p", self.port], workdir / "moto.log")
        self._wait()

    @staticmethod
    def available() -> bool:
        return shutil.which("moto_server") is not None


SERVERS = {"s3rver": S3rver, "moto": Moto}


# s3rver's logger (lib/middleware/logger.js) logs koa-logger's line from its 17th
# character on, colour codes included, so how much of the path is left tells the method:
# a GET's "/bench/dlio/train/x.npz" shows as "/dlio/train/x.npz", a HEAD's as
# "h/dlio/train/x.npz", a listing's "/bench?list-type=2&..." as "?list-type=2&..."; then
# the status, the time to the answer's last byte, and the answer's length rounded to two
# decimals of its unit (a HEAD prints its object's length). A presigned URL's query
# (dorafs/ufs/s3direct.py) does not make a GET a listing.
_SERVED = re.compile(r"^info: (\S+) (\d{3}) ([\d,.]+)(m?s) ([\d.]+)(b|kb|mb|gb)$", re.M)
_UNIT = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


@dataclass
class Served:
    kind: str  # "get" (a read of an object, whole or ranged), "head", "listing", "other"
    status: int
    ms: float
    nbytes: float  # as the log rounds it


def s3rver_served(log: Path, offset: int = 0) -> tuple[list[Served], int]:
    """The requests s3rver's log shows after `offset`, and the log's new end."""
    with open(log, "rb") as f:
        f.seek(offset)
        data = f.read()
    found = []
    for path, status, took, took_unit, size, unit in _SERVED.findall(_ANSI.sub(b"", data).decode(errors="replace")):
        presigned = "Signature=" in path  # a GET of a presigned URL (V4's X-Amz-Signature, V2's Signature)
        if ("=" in path or "?" in path) and not presigned:
            kind = "listing"
        elif path.startswith("h/"):
            kind = "head"
        elif path.startswith("/") and status in ("200", "206"):
            kind = "get"
        else:
            kind = "other"
        ms = float(took.replace(",", "")) * (1000 if took_unit == "s" else 1)
        found.append(Served(kind, int(status), ms, float(size) * _UNIT[unit]))
    return found, offset + len(data)
