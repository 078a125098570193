"""One worker's HTTP hop, alone: what a remote small read costs on each side of the wire.

    python3 bench/workerhop.py [--seconds 5] [--rounds 3] [--part 64KiB] [--repo DIR ...]

For each `--repo` checkout (default: this one), in turns: a worker daemon of that
checkout on loopback over a local directory (`file://`, a 64 MiB file whose pages it
fills first), and a client process of the same checkout that asks it, over one kept
connection and one request at a time, for `--part` bytes at random aligned offsets of
random pages (`WorkerClient.page(..., part=)`, the mount's path for a random reader of a
worker it does not read directly) for `--seconds`. Prints requests per second, wall µs
per request, and the CPU µs per request of the client and of the worker (from
/proc/PID/stat), the median of `--rounds` rounds. No FUSE and no fio, so the figures show
the hop's own cost; the machine's load still shows in the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIZE = 64 << 20
PAGE = 1 << 20


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[:-len(unit)]) * factor
    return int(text)


def client(address: str, uri: str, version: str, part: int, seconds: float, warm: bool) -> None:
    """Run in a subprocess of the checkout under test: prints {"requests", "wall", "cpu"}."""
    import trio

    from dorafs.client.workers import WorkerClient

    async def main() -> dict:
        workers = WorkerClient(timeout=10, connect_timeout=5)
        pages = SIZE // PAGE
        rng = random.Random(1)
        if warm:
            for index in range(pages):
                await workers.page(address, uri, version, SIZE, index, PAGE)
            await workers.aclose()
            return {}
        await workers.page(address, uri, version, SIZE, 0, PAGE, part=(0, part))  # the connection
        n = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for _ in range(50):
                index = rng.randrange(pages)
                offset = rng.randrange(PAGE // part) * part
                data = await workers.page(address, uri, version, SIZE, index, PAGE, part=(offset, part))
                assert len(data) == part
                n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await workers.aclose()
        return {"requests": n, "wall": wall, "cpu": cpu}

    print(json.dumps(trio.run(main)))


def run_client(repo: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--client", *args],
                         capture_output=True, text=True, env=env, cwd=repo)
    if out.returncode:
        raise SystemExit(f"client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Worker:
    def __init__(self, repo: Path, work: Path):
        self.dir = work
        port_file = work / "addr"
        env = dict(os.environ, PYTHONPATH=str(repo), DORAFS_LOG_LEVEL="WARNING")
        self.log = open(work / "worker.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.main", "--listen", "127.0.0.1:0", "--cache-dir", str(work / "cache"),
             "--cache-size", "1GiB", "--page-size", "1MiB", "--port-file", str(port_file),
             ], env=env, cwd=repo, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start; see {work / 'worker.log'}")
            time.sleep(0.05)
        self.address = port_file.read_text().strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--part", default="64KiB")
    p.add_argument("--repo", action="append", help="a dorafs checkout (repeatable; default: this one)")
    p.add_argument("--spy", metavar="FILE", help="record the worker with py-spy in each timed run (raw, FILE.ROUND.N)")
    p.add_argument("--client", nargs=6, help=argparse.SUPPRESS)  # address uri version part seconds warm
    args = p.parse_args()
    if args.client:
        address, uri, version, part, seconds, warm = args.client
        client(address, uri, version, int(part), float(seconds), warm == "1")
        return
    part = parse_size(args.part)
    repos = [Path(r).resolve() for r in (args.repo or [REPO])]
    tmp = Path(tempfile.mkdtemp(prefix="workerhop-"))
    try:
        root = tmp / "ufs"
        root.mkdir()
        path = root / "data.bin"
        rng = random.Random(7)
        with open(path, "wb") as f:
            for _ in range(SIZE // PAGE):
                f.write(rng.randbytes(PAGE))
        st = path.stat()
        uri = path.as_uri()
        workers = []
        for i, repo in enumerate(repos):
            work = tmp / f"w{i}"
            work.mkdir()
            workers.append(Worker(repo, work))
        # The version as the worker reports it (its stat), so page ids match a mount's.
        import urllib.request

        results: dict[int, list[dict]] = {i: [] for i in range(len(repos))}
        try:
            versions = []
            for i, w in enumerate(workers):
                with urllib.request.urlopen(f"http://{w.address}/v1/stat?uri={uri}") as answer:
                    status = json.load(answer)
                versions.append(status["version"])
                run_client(repos[i], [w.address, uri, status["version"], str(part), "0", "1"])
            for n in range(args.rounds):
                for i, (repo, w) in enumerate(zip(repos, workers)):
                    spy = None
                    if args.spy:
                        spy = subprocess.Popen(["py-spy", "record", "--pid", str(w.proc.pid), "--rate", "1000", "--gil",
                                                "--format", "raw", "--output", f"{args.spy}.{n + 1}.{i}",
                                                "--nonblocking"], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                        time.sleep(1)
                    before = cpu_seconds(w.proc.pid)
                    got = run_client(repo, [w.address, uri, versions[i], str(part), str(args.seconds), "0"])
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(30)
                    got["worker"] = cpu_seconds(w.proc.pid) - before
                    results[i].append(got)
                    print(f"round {n + 1} {repo.name} ({_commit(repo)}): {got['requests'] / got['wall']:,.0f} req/s",
                          flush=True)
        finally:
            for w in workers:
                w.stop()
        print(f"\n{args.part} parts of cached pages, one connection, one request at a time, {args.seconds:g} s x "
              f"{args.rounds} rounds (medians; {time.strftime('%H:%M UTC', time.gmtime())}, "
              f"load {os.getloadavg()[0]:.1f}); size {st.st_size}")
        print(f"{'checkout':32} {'req/s':>8} {'wall µs':>8} {'client CPU µs':>14} {'worker CPU µs':>14}")
        for i, repo in enumerate(repos):
            rows = results[i]
            rate = statistics.median(r["requests"] / r["wall"] for r in rows)
            wall = statistics.median(r["wall"] / r["requests"] * 1e6 for r in rows)
            ccpu = statistics.median(r["cpu"] / r["requests"] * 1e6 for r in rows)
            wcpu = statistics.median(r["worker"] / r["requests"] * 1e6 for r in rows)
            print(f"{repo.name + ' (' + _commit(repo) + ')':32} {rate:>8,.0f} {wall:>8.0f} {ccpu:>14.0f} {wcpu:>14.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
