"""Positioned reads on structured data (issue 21): pyarrow reading a few random columns of
a random row group from several Parquet files, 4 processes, through mounts of one s3rver
bucket and from the local disk.

    bash bench/setup.sh; . .venv/bin/activate
    python3 bench/parquet.py                          # dorafs, s3fs, rclone, native
    python3 bench/parquet.py --systems s3fs,native --reads 16
    python3 bench/parquet.py --systems dorafs,s3fs --rounds 6   # the order turned each round, then a summary

The files (written once with pyarrow under bench/.cache/parquet/, uploaded to s3rver
under `bench/parquet/data/`, a prefix of their own so bench/dataset.py's datasets never
count them): `--files` files of 32 uncompressed int64 columns (no dictionary), row groups
of `--chunk-kib` KiB per column chunk (0.5 MiB: 65,536 rows), `--row-groups` of them per
file (4: 64 MiB files).

Before any system is timed, every data file is read once straight from s3rver, untimed
(`warm_server`): its first reads after it starts cost it more. Just before each cold
pass, `--prime-gib` GiB of memory is touched and freed (bench/firsttouch.py): on a
virtual machine memory nobody touched lately costs four times as much to fault in, and
without it the first system timed paid that for the others.

The workload: `--procs` processes (forked, started together), each opening every file
once with `pyarrow.parquet.ParquetFile` (the footer) and then making `--reads` reads of
`--columns` random columns of a random row group of a random file
(`read_row_group(rg, columns=...)`, pyarrow's defaults); the choices come from a seed
per process, the same for every system and every pass. Passes per system:

- cold: the first mount of a fresh cache (the system's own cache empty);
- again: the same reads again on that mount, a training job's second epoch (what the
  kernel and the mount kept of the cold pass);
- warm: a new mount over the cache the cold pass left (the kernel's page cache of the
  first mount is gone with it);
- hot: the same reads again on that mount (what the kernel kept).

`native` reads the same files on the local disk (no FUSE): cold after dropping their
page cache (POSIX_FADV_DONTNEED), the other passes from the page cache.

Per pass: MiB/s of column data (the chunks' sizes from the footer, summed over every
read of every process, over the slowest process's wall time), reads/s, what s3rver
served during the pass, from its request log (GETs, their sizes in buckets, and how many
were in flight on average; the log's format is described in bench/servers.py), and the CPU
seconds of the mount's processes, of the readers and of s3rver during the pass.
Results: a table, bench/results/parquet-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachelimit import descendants, drop_page_cache  # noqa: E402
from dlio import cpu_seconds  # noqa: E402
from firsttouch import prime  # noqa: E402
from procs import BENCH, CACHE, REGISTRY, WORK, clean_stale  # noqa: E402
from servers import s3rver_served  # noqa: E402

MiB = 1 << 20
BUCKET, PREFIX = "bench", "parquet"
COLUMNS = 32
PASSES = ("cold", "again", "warm", "hot")  # (the module's note says what each is)
BUCKETS = [(64 << 10, "≤64K"), (256 << 10, "≤256K"), (1 << 20, "≤1M"), (4 << 20, "≤4M"), (16 << 20, "≤16M"),
           (None, ">16M")]


# -- the files ---------------------------------------------------------------------------

def write_files(args) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = args.chunk_kib * 1024 // 8
    tag = f"{args.files}x{args.row_groups}rg-{COLUMNS}c-{args.chunk_kib}k"
    root = CACHE / "parquet" / tag
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(21)
    for i in range(args.files):
        with pq.ParquetWriter(root / f"part-{i:03d}.parquet",
                              pa.schema([(f"c{j:02d}", pa.int64()) for j in range(COLUMNS)]),
                              compression="none", use_dictionary=False) as w:
            for _ in range(args.row_groups):
                table = pa.table({f"c{j:02d}": rng.integers(0, 1 << 62, rows) for j in range(COLUMNS)})
                w.write_table(table, row_group_size=rows)
    done.write_text(tag)
    return root


def upload(s3, local: Path) -> None:
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:
        if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
            raise
    have = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/data/") for o in page.get("Contents", [])}
    files = sorted(local.glob("*.parquet"))
    names = {f"{PREFIX}/data/{p.name}" for p in files}
    for key in have:
        if key not in names:  # another --files/--row-groups: only this set under the prefix
            s3.delete_object(Bucket=BUCKET, Key=key)
    for p in files:
        if have.get(f"{PREFIX}/data/{p.name}") != p.stat().st_size:
            s3.upload_file(str(p), BUCKET, f"{PREFIX}/data/{p.name}")
    # bench/systems.py calls a mount ready when it shows a `large` directory
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/large/README", Body=b"the mount-ready marker of bench/systems.py\n")


def warm_server(s3) -> float:
    """Read every data file once straight from s3rver, untimed, before any system is
    timed; its seconds. s3rver (node) serves its first reads after it starts slower and
    at more CPU per byte, which the first system timed paid alone: dorafs's first pass
    after s3rver started was its slowest in every session (bench/README.md). Ranged
    GETs of 8 MiB, four at once, as the systems' cold passes ask."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [(o["Key"], o["Size"]) for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/data/") for o in page.get("Contents", [])]

    def read(job: tuple[str, int]) -> None:
        key, start, size = job
        body = s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{min(size, start + (8 << 20)) - 1}")["Body"]
        while body.read(1 << 20):
            pass

    began = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(read, [(key, start, size) for key, size in keys for start in range(0, size, 8 << 20)]))
    return time.perf_counter() - began


# -- the workload ------------------------------------------------------------------------

def reader(root: str, seed: int, reads: int, columns: int, start, out) -> None:
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    paths = sorted(str(p) for p in Path(root).glob("*.parquet"))
    start.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    files = [pq.ParquetFile(p) for p in paths]
    opened = time.perf_counter() - t0
    nbytes = 0
    for _ in range(reads):
        f = rng.randrange(len(files))
        meta = files[f].metadata
        rg = rng.randrange(meta.num_row_groups)
        cols = sorted(rng.sample(range(meta.num_columns), columns))
        table = files[f].read_row_group(rg, columns=[meta.schema.column(c).name for c in cols])
        assert table.num_rows == meta.row_group(rg).num_rows
        nbytes += sum(meta.row_group(rg).column(c).total_compressed_size for c in cols)
    out.put((seed, nbytes, time.perf_counter() - t0, time.process_time() - cpu0, opened))


def run_pass(root: Path, args) -> dict:
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(args.procs + 1), ctx.Queue()
    procs = [ctx.Process(target=reader, args=(str(root), 1000 + i, args.reads, args.columns, start, out))
             for i in range(args.procs)]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=120)
        got = [out.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    nbytes = sum(g[1] for g in got)
    wall = max(g[2] for g in got)
    reads = args.procs * args.reads
    return {"mib_s": nbytes / MiB / wall, "reads_s": reads / wall, "seconds": wall, "data_mib": nbytes / MiB,
            "reader_cpu_s": round(sum(g[3] for g in got), 2), "open_s": round(max(g[4] for g in got), 3)}


def s3_gets(log: Path, offset: int) -> tuple[dict, int]:
    """GETs s3rver served since `offset` of its log (bench/servers.py), and the new offset."""
    served, end = s3rver_served(log, offset)
    sizes = [r.nbytes for r in served if r.kind == "get"]
    hist = {label: 0 for _, label in BUCKETS}
    for s in sizes:
        for limit, label in BUCKETS:
            if limit is None or s <= limit:
                hist[label] += 1
                break
    return {"gets": len(sizes), "get_mib": round(sum(sizes) / MiB, 1),
            "heads": sum(r.kind == "head" for r in served), "other": sum(r.kind in ("listing", "other") for r in served),
            "mean_kib": round(sum(sizes) / len(sizes) / 1024) if sizes else 0, "sizes": hist,
            "get_ms": round(sum(r.ms for r in served if r.kind == "get"))}, end


# -- the run -----------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="dorafs,s3fs,rclone,native")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--row-groups", type=int, default=4, help="per file")
    p.add_argument("--chunk-kib", type=int, default=512, help="size of one column chunk")
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--reads", type=int, default=64, help="per process per pass")
    p.add_argument("--columns", type=int, default=4, help="columns per read")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the systems this many times, the order turned by one each round (the first "
                        "system timed goes last next), and summarize the rounds: MiB/s per round and the "
                        "median, and each system's ratio to --versus in the same round")
    p.add_argument("--versus", default="s3fs", help="the system the summary's ratios are to")
    p.add_argument("--prime-gib", type=float, default=4.0,
                   help="GiB of memory touched and freed just before each cold pass, so that no system "
                        "pays the machine's first touch of fresh memory for the others (bench/firsttouch.py; "
                        "0: none)")
    p.add_argument("--baseline", type=Path, help="a checkout whose code the system dorafs-base runs "
                   "(the same embedded mount; the change and the code before it in one run)")
    p.add_argument("--profile", metavar="DIR", type=Path,
                   help="sample the dorafs mount and its worker with py-spy during each pass "
                        "(collapsed stacks: DIR/<system>-<pass>-<pid>.txt)")
    p.add_argument("--profiler", choices=("py-spy", "perf", "strace"), default="py-spy",
                   help="py-spy: Python stacks of every thread; perf: CPU samples with native and kernel "
                        "symbols (DIR/<system>-<pass>.perf.data, `perf report -i` it); strace: system calls "
                        "counted per process and thread (DIR/<system>-<pass>-<pid>.strace)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from servers import SERVERS
    from systems import DorafsBaseline

    if args.baseline:
        DorafsBaseline.checkout = args.baseline.resolve()

    for line in clean_stale():
        print(line)
    work = WORK / "parquet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    local = write_files(args)
    args.file_mib = round(sum(p.stat().st_size for p in local.glob("*.parquet")) / args.files / MiB, 1)
    rounds: list[dict[str, dict]] = []
    try:
        server = SERVERS["s3rver"](work)
        os.environ.update(server.env)
        upload(server.client(), local)
        print(f"s3rver warmed up: the data files read once from it, untimed ({warm_server(server.client()):.1f} s)")
        systems = args.systems.split(",")
        for turn in range(args.rounds):
            order = systems[turn % len(systems):] + systems[:turn % len(systems)]
            if args.rounds > 1:
                print(f"round {turn + 1} of {args.rounds}: {', '.join(order)}", flush=True)
            rounds.append(run_systems(order, server, local, work, args))
            report(rounds[-1], args)
    finally:
        REGISTRY.teardown()
    if args.rounds > 1:
        summary(rounds, args)


def run_systems(order: list[str], server, local: Path, work: Path, args) -> dict[str, dict]:
    """Each system's passes, one system after another; their results by system and pass."""
    from systems import SYSTEMS

    results: dict[str, dict] = {}
    log = server.proc.log_path
    for name in order:
        results[name] = {}
        if name == "native":
            drop_page_cache(local)
            prime(args.prime_gib)
            for phase in PASSES:
                results[name][phase] = run_pass(local, args)
                show(name, phase, results[name][phase])
            continue
        cls = SYSTEMS[name]
        why = cls.available()
        if why:
            print(f"{name}: skipped ({why})")
            del results[name]
            continue
        system = cls(server, PREFIX, work)
        session = system.session()
        results[name]["config"] = system.config
        try:
            for phases in (("cold", "again"), ("warm", "hot")):
                with session.mount() as m:
                    pids = [m.proc.pid] + descendants(m.proc.pid)
                    for phase in phases:
                        if phase == "cold":
                            prime(args.prime_gib)
                        _, mark = s3_gets(log, 0)
                        spied = args.profile and (system.is_dorafs or name == "dorafs-base" or os.environ.get("PARQUET_PERF_ALL"))
                        spies = profile(args.profile, args.profiler, name, phase, pids) if spied else []
                        cpu0 = [cpu_seconds(pid) or 0.0 for pid in pids + [server.proc.pid]]
                        faults0 = sum(minor_faults(pid) for pid in pids)
                        mount_faults0 = minor_faults(pids[0])
                        store_faults0 = minor_faults(server.proc.pid)
                        calls0, worker_calls0 = syscalls(pids[0]), syscalls(*pids[1:])
                        served0 = mount_reads(m)
                        idle0 = machine_idle()
                        try:
                            results[name][phase] = r = run_pass(m.path / "data", args)
                            cpu1 = [cpu_seconds(pid) or 0.0 for pid in pids + [server.proc.pid]]
                            r["idle_share"] = idle_share(idle0, machine_idle())
                            r["daemon_faults"] = sum(minor_faults(pid) for pid in pids) - faults0
                            r["mount_faults"] = minor_faults(pids[0]) - mount_faults0
                            r["s3rver_faults"] = minor_faults(server.proc.pid) - store_faults0
                            r["mount_syscalls"] = [b - a for a, b in zip(calls0, syscalls(pids[0]))]
                            r["worker_syscalls"] = [b - a for a, b in zip(worker_calls0, syscalls(*pids[1:]))]
                            served1 = mount_reads(m)
                            r["mount_reads"] = served1 - served0 if served0 is not None and served1 is not None else None
                        finally:
                            stop_profile(spies)
                        r["s3"], _ = s3_gets(log, mark)
                        r["daemon_cpu_s"] = round(sum(cpu1[:-1]) - sum(cpu0[:-1]), 2)
                        r["mount_cpu_s"] = round(cpu1[0] - cpu0[0], 2)  # the mount process alone
                        r["s3rver_cpu_s"] = round(cpu1[-1] - cpu0[-1], 2)
                        show(name, phase, r)
        finally:
            session.close()
    return results


def machine_idle() -> tuple[int, int]:
    """The machine's idle and total CPU time so far, in ticks (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])  # idle + iowait; user..steal


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time that was idle between two `machine_idle` readings:
    near 0, the pass was bound by the CPU of everything on the machine together."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 2) if total else 0.0


def mount_reads(m) -> int | None:
    """read() requests a dorafs mount answered so far (its /metrics); None for a mount
    without /metrics."""
    from harness import scrape_mount

    reads = (scrape_mount(m) or {}).get("reads")
    return None if reads is None else int(reads)


def syscalls(*pids: int) -> tuple[int, int]:
    """The read and write system calls so far of live processes, summed (/proc/PID/io's
    syscr and syscw; the mount's writes are mostly its FUSE replies)."""
    reads = writes = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                fields = dict(line.split(": ") for line in f.read().splitlines())
            reads, writes = reads + int(fields["syscr"]), writes + int(fields["syscw"])
        except (OSError, KeyError, ValueError):
            pass
    return reads, writes


def minor_faults(pid: int) -> int:
    """Minor page faults of a live process so far (all its threads): memory faulted in."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def profile(out: Path, profiler: str, name: str, phase: str, pids: list[int]) -> list:
    """Sample `pids` (the mount and its worker) during a pass: py-spy (without pausing
    them), perf or strace (which slows every system call it counts)."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    if profiler == "perf":
        argvs = [["perf", "record", *os.environ.get("PARQUET_PERF_EVENT", "-F 999").split(), "-g", "-o", str(out / f"{name}-{phase}.perf.data"),
                  *(["-a"] if os.environ.get("PARQUET_PERF_ALL") else ["-p", ",".join(str(pid) for pid in pids)])]]
    elif profiler == "strace":
        argvs = [["strace", "-f", "-c", "-o", str(out / f"{name}-{phase}-{pid}.strace"), "-p", str(pid)] for pid in pids]
    else:
        spy = Path(sys.executable).with_name("py-spy")
        argvs = [[str(spy), "record", "--nonblocking", "--threads", "--rate", os.environ.get("SPY_RATE", "250"), "--format", "raw",
                  "-o", str(out / f"{name}-{phase}-{pid}.txt"), "-p", str(pid), *os.environ.get("SPY_ARGS", "").split()]
                 for pid in pids]
    spies = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for argv in argvs]
    time.sleep(1.0)  # the profiler attaches
    return spies


def stop_profile(spies: list) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except Exception:
            spy.kill()
            spy.wait()


def show(name: str, phase: str, r: dict) -> None:
    s3 = r.get("s3")
    extra = (f"; S3 {s3['gets']} GETs, {s3['get_mib']:.0f} MiB, mean {s3['mean_kib']} KiB, "
             f"{s3['get_ms'] / 1000 / r['seconds']:.1f} in flight (their logged times over the wall time), "
             f"{s3['heads']} HEADs, sizes {s3['sizes']}; CPU s: daemons {r['daemon_cpu_s']} "
             f"(mount {r.get('mount_cpu_s')}), "
             f"s3rver {r['s3rver_cpu_s']}, the readers {r.get('reader_cpu_s')}; machine idle {r.get('idle_share')}; daemons' page faults {r.get('daemon_faults')} (mount {r.get('mount_faults')}), s3rver's {r.get('s3rver_faults')}; the mount's read() requests {r.get('mount_reads')}, read and write calls {r.get('mount_syscalls')}, the worker's {r.get('worker_syscalls')}") if s3 else ""
    print(f"{name} {phase}: {r['mib_s']:.1f} MiB/s, {r['reads_s']:.1f} reads/s, {r['seconds']:.2f} s "
          f"(opening the files and reading their footers: {r.get('open_s')} s){extra}",
          flush=True)


def summary(rounds: list[dict[str, dict]], args) -> None:
    """Per system and pass: MiB/s in each round and the median; and the ratio to
    `--versus` in each round (both timed in that round) and its median."""
    import statistics

    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    names = list(dict.fromkeys(name for r in rounds for name in r))
    lines = [f"Parquet, {len(rounds)} rounds (the order turned each round): MiB/s per round, median; "
             f"× {args.versus} in the same round, median", "",
             "| system | pass | MiB/s by round | median | × " + args.versus + " by round | median × |",
             "|---|---|---|---|---|---|"]
    for name in names:
        for phase in PASSES:
            rates = [r[name][phase]["mib_s"] for r in rounds if phase in r.get(name, {})]
            if not rates:
                continue
            ratios = [r[name][phase]["mib_s"] / r[args.versus][phase]["mib_s"] for r in rounds
                      if phase in r.get(name, {}) and phase in r.get(args.versus, {})]
            lines.append(f"| {name} | {phase} | {', '.join(f'{x:.1f}' for x in rates)} | {statistics.median(rates):.1f} | "
                         + (f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |" if ratios else "– | – |"))
    text = "\n".join(lines)
    print("\n" + text)
    out = BENCH / "results"
    (out / f"parquet-rounds-{stamp}.md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    print(f"summary: {out}/parquet-rounds-{stamp}.md")


def report(results: dict, args) -> None:
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    head = (f"Parquet positioned reads: {args.files} files of {args.file_mib} MiB, {COLUMNS} int64 columns "
            f"uncompressed, {args.row_groups} row groups, {args.chunk_kib} KiB column chunks; {args.procs} "
            f"processes x {args.reads} reads of {args.columns} random columns of a random row group; s3rver; "
            f"load average {os.getloadavg()[0]:.1f} at the end")
    lines = [head, "", "| system | pass | MiB/s | reads/s | × native (same pass) | S3 GETs | GET MiB | mean GET KiB | "
             "GET sizes (" + ", ".join(label for _, label in BUCKETS) + ") | CPU s: daemons, s3rver |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    native = results.get("native", {})
    for name, r in results.items():
        for phase in PASSES:
            if phase not in r:
                continue
            x = r[phase]
            ratio = f"{x['mib_s'] / native[phase]['mib_s']:.2f}" if phase in native else "–"
            s3 = x.get("s3")
            s3_text = (f"{s3['gets']} | {s3['get_mib']:.0f} | {s3['mean_kib']} | "
                       + ", ".join(str(v) for v in s3["sizes"].values())
                       + f" | {x['daemon_cpu_s']:.1f}, {x['s3rver_cpu_s']:.1f}") if s3 else "– | – | – | – | –"
            lines.append(f"| {name} | {phase} | {x['mib_s']:.1f} | {x['reads_s']:.1f} | {ratio} | {s3_text} |")
    text = "\n".join(lines)
    print("\n" + text)
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / f"parquet-{stamp}.md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    (out / f"parquet-{stamp}.json").write_text(json.dumps({"argv": sys.argv, "args": vars(args),
                                                           "results": results}, indent=1, default=str))
    print(f"results: {out}/parquet-{stamp}.*")


if __name__ == "__main__":
    main()
