"""What the cluster secret and TLS cost on the warm page path.

Starts one worker per mode on loopback over the same file:// dataset (plain HTTP with no
secret, plain HTTP with the secret, TLS with the secret; a CA made with trustme), warms
each worker's cache, then fetches every page of the dataset again with the mount's own
client (`dorafs.client.workers.WorkerClient`) and prints MiB/s per mode. Warm pages are
sent with sendfile on plain HTTP and read in chunks through TLS.

    python3 bench/tls.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dorafs.client.workers import WorkerClient  # noqa: E402
from dorafs.security import Credentials, client_context  # noqa: E402
from dorafs.ufs import FsspecUfs  # noqa: E402
from tests.cluster import ProcessSet  # noqa: E402

MiB = 1 << 20


async def fetch_all(address: str, credentials: Credentials, uris: list[str], page: int, rounds: int) -> float:
    ufs = FsspecUfs("file")
    statuses = [await ufs.stat(uri) for uri in uris]
    client = WorkerClient(timeout=30, connect_timeout=5, credentials=credentials)

    async def one_pass() -> int:
        total = 0
        for uri, status in zip(uris, statuses):
            for index in range((status.size + page - 1) // page):
                total += len(await client.page(address, uri, status.version, status.size, index, page))
        return total

    try:
        await one_pass()  # warm the worker's cache
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            total = await one_pass()
            best = max(best, total / MiB / (time.perf_counter() - start))
        return best
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="dataset size in MiB (16 MiB files)")
    parser.add_argument("--rounds", type=int, default=3, help="warm passes per mode; the best is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dorafs-bench-tls-") as tmp:
        base = Path(tmp)
        data = base / "data"
        data.mkdir()
        uris = []
        for i in range(max(1, args.mib // 16)):
            (data / f"f{i}.bin").write_bytes(os.urandom(16 * MiB))
            uris.append(f"file://{data}/f{i}.bin")
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca.cert_pem.write_to_path(str(base / "ca.pem"))
        cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
        secret = secrets.token_hex(32)
        (base / "secret").write_text(secret)
        os.chmod(base / "secret", 0o600)
        modes = {
            "plain HTTP, no secret": ([], Credentials()),
            "plain HTTP, secret": (["--secret-file", str(base / "secret")], Credentials(secret.encode())),
            "TLS, secret": (["--secret-file", str(base / "secret"), "--tls-cert", str(base / "server.pem"),
                             "--tls-key", str(base / "server.pem")],
                            Credentials(secret.encode(), client_context(base / "ca.pem"))),
        }
        print(f"warm page reads, {len(uris) * 16} MiB in 1 MiB pages, best of {args.rounds} passes")
        with ProcessSet(base / "procs") as procs:
            for name, (extra, credentials) in modes.items():
                worker = procs.worker(extra=["--ufs-roots", f"file://{data}", *extra], cache_size="2GiB")
                rate = trio.run(fetch_all, worker.address, credentials, uris, MiB, args.rounds)
                print(f"  {name:24s} {rate:8.0f} MiB/s")
                worker.stop()


if __name__ == "__main__":
    main()
