"""dorafs benchmark harness: dorafs against s3fs-fuse, rclone mount and the FUSE ceiling,
side by side on the same bucket of the same local S3 server, in one run.

    bash bench/run.sh            # quick mode (a few minutes): set up, then run
    bash bench/run.sh --full     # full mode (1 GiB object, 10,000 files)
    python3 bench/harness.py --help

Writes bench/results/<timestamp>-<mode>.json and .png and prints a table of figures and
ratios per scenario, and the targets of issue 3 met or missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,  # noqa: E402
                           TimeElapsedColumn, TransferSpeedColumn)

import dataset  # noqa: E402
from firsttouch import prime  # noqa: E402
from procs import (BENCH, CACHE, REGISTRY, WORK, clean_stale, cpu_seconds, each_at_once, peak_rss_mib,  # noqa: E402
                   reset_peak_rss, rss_mib)
from report import Report, Result, fmt, merge_rounds  # noqa: E402
from scenarios import Ctx, all_scenarios, describe  # noqa: E402
from servers import S3RVER_NODE_FLAGS, SERVERS  # noqa: E402
from systems import SYSTEMS, Dorafs, DorafsBaseline, Mounted, versions  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 200)
RESULTS = BENCH / "results"


class RssWatch:
    """Peak RSS of a mount's processes during one run: VmHWM reset at the start (clear_refs),
    read at the end; a 50 ms VmRSS poll covers kernels that refuse the reset."""

    def __init__(self, m: Mounted):
        self.pids = dict(m.rss_pids)
        self.polled = {role: 0.0 for role in self.pids}
        self.reset = {role: reset_peak_rss(pid) for role, pid in self.pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.05):
            for role, pid in self.pids.items():
                v = rss_mib(pid)
                if v is not None:
                    self.polled[role] = max(self.polled[role], v)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        out = {}
        for role, pid in self.pids.items():
            hwm = peak_rss_mib(pid) if self.reset[role] else None
            out[role] = round(max(hwm or 0.0, self.polled[role]), 1)
        return out


# What a dorafs mount's reads went through, from its /metrics around one workload: opens
# handed to the kernel (passthrough) or not and why, held object files, READs that reached
# the mount (all of them, and those answered from a held object file).
MOUNT_SERIES = ("dorafs_mount_passthrough_opens_total", "dorafs_mount_object_file_opens_total",
                "dorafs_mount_reads_total", "dorafs_mount_object_file_reads_total")


def scrape_mount(m: Mounted) -> dict[str, float] | None:
    """The counters of MOUNT_SERIES (by label) of a mount serving /metrics; None otherwise."""
    if m.metrics_port is None:
        return None
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{m.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if line.startswith(MOUNT_SERIES):
            name, _, value = line.rpartition(" ")
            out[name.replace("dorafs_mount_", "").replace("_total", "")] = float(value)
    return out


def settle(m: Mounted, timeout: float = 180.0) -> float | None:
    """Wait until a dorafs mount has no object file being prepared (sealed by its worker
    and verified: what a version read to its end gets after its last close); the seconds
    waited, or None for a mount without /metrics. A mount that stays up does this in the
    background; the harness unmounts right after the cold pass, which would cut it short
    and leave the warm pass a version still in pages."""
    if m.metrics_port is None:
        return None
    import urllib.request
    start = time.perf_counter()
    idle = 0  # polls in a row with nothing being prepared: a last RELEASE may still be on its way
    while time.perf_counter() - start < timeout and idle < 3:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{m.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        line = next((x for x in text.splitlines() if x.startswith("dorafs_mount_object_files_preparing ")), None)
        if line is None:
            return None
        idle = idle + 1 if float(line.split()[1]) == 0 else 0
        time.sleep(0.05)
    return round(time.perf_counter() - start, 2)


def mount_delta(before: dict | None, after: dict | None) -> dict[str, int] | None:
    """What changed between two scrapes, left out where nothing did."""
    if before is None or after is None:
        return None
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v != before.get(k, 0.0)}


def ensure_dataset(server, spec: dataset.Spec) -> None:
    manifest = CACHE / f"dataset-{server.name}-{spec.mode}.json"
    s3 = server.client()
    if server.persistent and manifest.exists():
        try:
            ok = json.loads(manifest.read_text()).get("digest") == spec.digest() and \
                dataset.count_objects(s3, spec) == len(spec.objects())
        except Exception:
            ok = False
        if ok:
            console.print(f"dataset: s3://{dataset.BUCKET}/{spec.prefix}/ already in {server.name} "
                          f"({len(spec.objects()):,} objects, {spec.total_bytes / 2**20:,.0f} MiB)")
            return
    server.clear(spec.prefix)
    with Progress(TextColumn("uploading dataset to " + server.name), BarColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("upload", total=spec.total_bytes)
        start = time.perf_counter()
        dataset.upload(s3, spec, progress, task)
    n = dataset.count_objects(s3, spec)
    if n != len(spec.objects()):
        raise SystemExit(f"bench: upload incomplete: {n} of {len(spec.objects())} objects")
    manifest.write_text(json.dumps({"digest": spec.digest(), "objects": n}))
    console.print(f"dataset: uploaded {n:,} objects, {spec.total_bytes / 2**20:,.0f} MiB to {server.name} "
                  f"in {time.perf_counter() - start:.0f} s")


def warm_server(server, spec: dataset.Spec) -> float:
    """Read the large object once straight from the S3 server, untimed, before any system
    is timed; its seconds. A server that compiles its code as it runs (s3rver on node)
    serves its first long reads slower and at more CPU per byte: the first system of
    the first scenario read cold sequential at 223 MiB/s where the next, the same code
    a commit earlier, read at 349 (bench/README.md, "Receive buffers that nobody
    zeroes"). Ranged GETs of 16 MiB, four at once, as a cold sequential reader's
    readahead asks."""
    s3 = server.client()
    key = f"{spec.prefix}/large/big.bin"

    def read(start: int, _) -> None:
        end = min(spec.large_size, start + (16 << 20)) - 1
        body = s3.get_object(Bucket=dataset.BUCKET, Key=key, Range=f"bytes={start}-{end}")["Body"]
        while body.read(1 << 20):
            pass

    began = time.perf_counter()
    each_at_once(range(0, spec.large_size, 16 << 20), 4, read)
    return time.perf_counter() - began


def verify(spec: dataset.Spec, mnt: Path) -> str | None:
    """Compare a sample of bytes read through the mount with the dataset; None if equal."""
    rng = random.Random(7)
    checks = [("large/big.bin", spec.large_size, 0, 1 << 20),
              ("large/big.bin", spec.large_size, rng.randrange(spec.large_size - (3 << 20)), 3 << 20),
              ("large/big.bin", spec.large_size, spec.large_size - 100_000, 100_000)]
    checks += [(f"small/{n}", spec.small_size, 0, spec.small_size) for n in rng.sample(spec.small_names(), 5)]
    checks += [(f"medium/{spec.medium_names()[-1]}", spec.medium_size, 0, spec.medium_size)]
    for rel, size, off, length in checks:
        with open(mnt / rel, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != size:
                return f"{rel}: size {os.fstat(f.fileno()).st_size} != {size}"
            f.seek(off)
            got = b""
            while len(got) < length and (chunk := f.read(length - len(got))):
                got += chunk
        if got != dataset.content(spec, rel, size, off, length):
            return f"{rel} [{off}, +{length}): bytes differ"
    if len(os.listdir(mnt / "dir")) != spec.flat_count:
        return "dir/: wrong number of entries"
    if len(os.listdir(mnt / "small")) != -(-spec.small_count // spec.per_dir) + 1:
        return "small/: wrong number of entries"
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="quick mode (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full mode")
    p.set_defaults(mode="quick")
    p.add_argument("--s3", choices=sorted(SERVERS), default="s3rver", help="S3 server (default s3rver)")
    p.add_argument("--systems", default="dorafs,s3fs,rclone,ceiling,native",
                   help=f"comma-separated, from {','.join(SYSTEMS)} (default dorafs,s3fs,rclone,ceiling,native)")
    p.add_argument("--scenarios", default="", help="comma-separated subset of scenario names")
    p.add_argument("--dorafs-options", default="", help="extra -o options for the dorafs mounts")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="another dorafs checkout (with its .venv) to run beside this one as dorafs-base")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per workload")
    p.add_argument("--keep-work", action="store_true", help="keep logs under bench/.cache/work/")
    p.add_argument("--prime-gib", type=float, default=4.0,
                   help="GiB of memory touched and freed just before each cold pass, so that no system "
                        "pays the machine's first touch of fresh memory for the others (bench/firsttouch.py; "
                        "0: none)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the scenarios this many times, the systems' order turned by one each round; "
                        "the table gives each figure's median, and a second table dorafs's (and a baseline's) ratio "
                        "to the best peer in each round; a multiple of the number of systems times each "
                        "system first as often as the others (the first of a round read slower in some runs)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = dataset.SPECS[args.mode]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for line in clean_stale():
        console.print(f"[yellow]{line}[/yellow]")
    if WORK.exists():
        shutil.rmtree(WORK, ignore_errors=True)
    workdir = WORK / stamp
    workdir.mkdir(parents=True)
    RESULTS.mkdir(exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    server_cls = SERVERS[args.s3]
    if not server_cls.available():
        raise SystemExit(f"bench: the {args.s3} server is not installed (run bash bench/setup.sh)")
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.baseline:
        DorafsBaseline.checkout = Path(args.baseline).resolve()
        if "dorafs-base" not in wanted:
            wanted.insert(wanted.index("dorafs") + 1 if "dorafs" in wanted else 0, "dorafs-base")
    unknown = [s for s in wanted if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"bench: unknown systems {unknown}; known: {list(SYSTEMS)}")
    scenarios = all_scenarios()
    if args.scenarios:
        keep = {s.strip() for s in args.scenarios.split(",")}
        scenarios = [s for s in scenarios if s.name in keep or keep & set(s.row_names())]
    timeout = args.timeout or (300 if args.mode == "quick" else 1500)
    ctx = Ctx(spec, workdir, args.mode == "quick", timeout, args.prime_gib)

    rounds: list[list[Result]] = []
    natives: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    load_start = os.getloadavg()
    try:
        server = server_cls(workdir)
        console.print(f"S3 server: {server.name} on {server.endpoint}"
                      + (f" (node {' '.join(S3RVER_NODE_FLAGS) or 'without flags'})" if server.name == "s3rver" else ""))
        ensure_dataset(server, spec)

        systems = []
        for name in wanted:
            cls = SYSTEMS[name]
            why = cls.available()
            if why:
                notes.append(f"{name} skipped: {why}")
                console.print(f"[yellow]{name} skipped: {why}[/yellow]")
                continue
            system = cls(server, spec.mode, workdir)
            if isinstance(system, Dorafs) or system.name == "ceiling":  # the ceiling mirrors dorafs's readahead
                system.options = args.dorafs_options
            systems.append(system)
        dorafs_name = next((s.name for s in systems if s.is_dorafs), "dorafs")

        steps = 2 * len(systems) + args.rounds * sum(len(s.phases) * len(systems) for s in scenarios)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("starting", total=steps)

            # 1. every system mounts and returns the right bytes, cold and warm
            for system in list(systems):
                session = system.session()
                try:
                    for phase in ("cold", "warm"):
                        progress.update(task, description=f"verify · {phase} · {system.name}")
                        with session.mount() as m:
                            problem = verify(spec, m.path)
                        progress.advance(task)
                        if problem:
                            raise RuntimeError(f"wrong bytes: {problem}")
                    progress.console.print(f"[green]✓[/green] {system.name}: mounts, and its bytes match "
                                           f"the dataset (cold and warm)")
                except Exception as exc:
                    notes.append(f"{system.name} failed verification and was dropped: {exc}")
                    progress.console.print(f"[red]✗ {system.name}: {exc}[/red]")
                    systems.remove(system)
                finally:
                    session.close()

            # 2. the S3 server warmed up, untimed: no system pays for its first long reads
            progress.update(task, description="warming the S3 server")
            progress.console.print(f"S3 server warmed up: the large object read once from it, untimed "
                                   f"({warm_server(server, spec):.1f} s)")

            # 3. the scenarios, each side by side across systems; with --rounds, all of
            # them again, the systems' order turned by one each round
            for n in range(args.rounds):
                turn = systems[n % len(systems):] + systems[:n % len(systems)] if systems else []
                if args.rounds > 1:
                    progress.console.print(f"round {n + 1} of {args.rounds}: {', '.join(s.name for s in turn)}")
                this_round: list[Result] = []
                for scenario in scenarios:
                    native = scenario.native(ctx) if hasattr(scenario, "native") and n == 0 else None
                    if native is not None:
                        natives[scenario.name] = native
                        progress.console.print(f"  {scenario.name:<10} native local file    "
                                               f"{fmt(native, scenario.unit):>10} {scenario.unit}")
                    for system in turn:
                        session = system.session()
                        try:
                            for i, phase in enumerate(scenario.phases):
                                progress.update(task, description=f"{scenario.name} · {phase} · {system.name}"
                                                + (f" · round {n + 1}" if args.rounds > 1 else ""))
                                this_round += run_phase(ctx, server, scenario, system, session, phase,
                                                        prefill=(i + 1 < len(scenario.phases)),
                                                        console=progress.console, dorafs=dorafs_name)
                                progress.advance(task)
                        finally:
                            session.close()
                rounds.append(this_round)
            progress.update(task, description=f"done in {time.perf_counter() - started:.0f} s", total=steps,
                            completed=steps)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: unmounting and stopping everything we started[/yellow]")
        notes.append("interrupted")
        raise
    finally:
        REGISTRY.teardown()
        if not args.keep_work:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.perf_counter() - started
    peers = [s.name for s in systems if s.is_peer]
    results = rounds[0] if len(rounds) == 1 else merge_rounds(rounds, peers, dorafs_name)
    order = [(row, phase) for s in scenarios for row in s.row_names() for phase in s.phases]
    titles = {row: describe(s, ctx) for s in scenarios for row in s.row_names()}
    report = Report(results, [s.name for s in systems], peers, dorafs_name, natives, order, titles)
    title = (f"dorafs bench, {args.mode} mode, S3 server {args.s3}, {os.cpu_count()} CPUs, "
             f"{elapsed / 60:.1f} min — ratios > 1 mean dorafs is better")
    console.print(report.table(title))
    if len(rounds) > 1:
        console.print(report.rounds_table())
    console.print(report.targets_table())
    for line in notes:
        console.print(f"[yellow]note: {line}[/yellow]")
    meta = {"timestamp": stamp, "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "dorafs_commit": _commit(), "mode": args.mode, "s3_server": args.s3,
            "s3rver_node_flags": " ".join(S3RVER_NODE_FLAGS) if args.s3 == "s3rver" else None, "elapsed_s": round(elapsed, 1),
            "dataset": {"large": spec.large_size, "small": spec.small_count, "small_size": spec.small_size,
                        "medium": spec.medium_count, "medium_size": spec.medium_size, "flat": spec.flat_count},
            "systems": {s.name: s.config for s in systems}, "versions": versions(), "notes": notes,
            "cold": "first mount of a fresh, empty cache", "prime_gib": args.prime_gib, "rounds": len(rounds), "warm": "remount of the same cache: the system's cache "
            "kept, the kernel page/dentry cache of the old mount gone with it"}
    base = RESULTS / f"{stamp}-{args.mode}"
    report.save_json(base.with_suffix(".json"), meta, rounds if len(rounds) > 1 else None)
    report.save_png(base.with_suffix(".png"), title.split(" — ")[0])
    base.with_suffix(".md").write_text(report.plain_table() + "\n"
                                       + ("\n" + report.plain_rounds() + "\n" if len(rounds) > 1 else ""))
    console.print(f"results: {base}.json, {base.name}.png, {base.name}.md")
    return 0


def _commit() -> str:
    """The dorafs commit measured (read-only git queries), '+dirty' when the tree has edits."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "dorafs", "worker"],
                               cwd=BENCH.parent, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def run_phase(ctx, server, scenario, system, session, phase, *, prefill, console, dorafs) -> list[Result]:
    rows = scenario.row_names()
    if phase == "cold" and ctx.prime_gib:
        prime(ctx.prime_gib)  # memory touched a moment ago for every system's cold pass alike
    with session.mount() as m:
        watch = RssWatch(m)
        metrics_before = scrape_mount(m)
        s3_before = server.requests()
        s3_cpu = cpu_seconds(server.proc.pid)
        start = time.perf_counter()
        ctx.settle = lambda: settle(m)
        try:
            out = scenario.run(ctx, m.path, phase)
            error = None
        except Exception as exc:
            out, error = {}, f"{type(exc).__name__}: {exc}"
        finally:
            ctx.settle = lambda: None
        wall = time.perf_counter() - start
        through = mount_delta(metrics_before, scrape_mount(m))
        rss = watch.stop()
        s3_requests = server.requests() - s3_before
        s3_cpu = round(cpu_seconds(server.proc.pid) - s3_cpu, 2)  # the S3 server's share of the two cores
        settled = None
        if prefill and error is None:
            try:
                scenario.prefill(ctx, m.path)
                settled = settle(m)  # untimed: the warm pass finds what a mount left up would
            except Exception as exc:
                error = f"prefill failed: {exc}"
    results = []
    for row in rows:
        value, detail = out.get(row, (None, {}))
        if through is not None:
            detail = dict(detail, mount=through)
        if settled is not None:
            detail = dict(detail, settle_s=settled)
        detail = dict(detail, s3_server_cpu_s=s3_cpu)
        results.append(Result(row, phase, system.name, value, scenario.unit, scenario.higher_better, detail,
                              rss, s3_requests, round(wall, 3), error))
        rss_text = "+".join(f"{v:.0f}" for v in rss.values())
        text = (f"[red]{error[:300]}[/red]" if error else
                f"{fmt(value, scenario.unit):>10} {scenario.unit:<9} RSS {rss_text:>9} MiB  "
                f"S3 req {s3_requests:>6} ({s3_cpu:.2f} CPU-s)  {wall:6.1f} s")
        console.print(f"  {row:<10} {phase:<5} {system.name:<8} {text}")
        if through and row == rows[0]:
            console.print("      mount: " + " ".join(f"{k}={v}" for k, v in sorted(through.items())) +
                          (f"; then {settled} s until nothing was being prepared" if settled else ""))
        if error and os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
