"""An MLPerf Storage-shaped figure: the DLIO benchmark's unet3d workload, scaled to two
cores, through dorafs, s3fs-fuse and rclone mounts of the same s3rver bucket, with the
kernel's page cache bounded to a fraction of the dataset.

    bash bench/setup.sh          # also: Open MPI, mpi4py, dlio-benchmark (see there)
    . .venv/bin/activate
    python3 bench/dlio.py                     # 96 files of ~16 MiB, page cache 256 MiB, 2 epochs
    python3 bench/dlio.py --systems dorafs --files 16 --kernel-cache off

DLIO (`dlio_benchmark`, the benchmark MLPerf Storage runs) generates the unet3d dataset
once (npz files, one sample each, sizes drawn around `--record-mib` with a quarter of
it as standard deviation), which is uploaded to s3rver under `bench/dlio/train/`. Then,
per system, `mpirun -np 1 dlio_benchmark workload=unet3d_a100` with the PyTorch data
loader reads it from the system's mount: batch 4, `read_threads` 2, a simulated
accelerator computing `--compute` seconds per batch, 2 epochs; once on a fresh cache
(cold) and once on a new mount over the cache the first run left (warm: the system's
own cache; the kernel's page cache of the first mount is gone with it). DLIO reports per
epoch the accelerator utilisation AU (compute time over wall time) and samples/s.

The page cache bound (MLPerf Storage sizes the dataset at several times the host's
memory so that no epoch is served from it; this machine has 24 GiB): each run gets two
cgroup v1 memory groups, children of this process's own, created before the mount and
removed after it (bench/cachelimit.py; also on errors and SIGTERM):

- DLIO's group (`--kernel-cache`, 256 MiB by default): mpirun, dlio_benchmark and its
  DataLoader workers start inside it, so every page the kernel caches for their reads is
  charged to it: the FUSE mount's page cache, the backing files dorafs hands the kernel
  through FUSE passthrough, the local files of `local`. A control loop keeps the group's
  limit at its other memory (≈1.25 GiB at its peak here: PyTorch, MPI, the batches in /dev/shm) plus the
  budget, so the page cache it can hold is the budget, not what is left of a guess.
- The mount daemons' group (`--daemon-cache`, 256 MiB by default): the mount process and
  its children (dorafs's embedded worker; s3fs; rclone) are moved in once mounted. Their
  own memory (buffers, dorafs's 64 MiB page buffer, rclone's read-ahead) is not bounded,
  only the page cache of what they read and write, i.e. of their disk caches: each
  system's own cache lives on its disk (dorafs's page files, s3fs's use_cache files,
  rclone's VFS cache files) and not in the host's spare memory. Before each mount the page
  cache of the session's cache directory is dropped (fdatasync + POSIX_FADV_DONTNEED), as
  are the local files before `local`.

`--kernel-cache off --daemon-cache off` runs as before (no bound). With the defaults the
dataset (~1.5 GiB) is six times each budget. Per run the script also counts what s3rver
served (its request log: ranged and whole GETs, HEADs, listings, GET bytes), the CPU
seconds of DLIO's processes and of each daemon process, the largest page cache each group
held, and the load average.

Systems as bench/systems.py starts them (dorafs: the embedded worker with its defaults;
s3fs: use_cache + kernel_cache; rclone: --vfs-cache-mode full). Results: a table, and
bench/results/dlio-<timestamp>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachelimit import CacheLimit, Unavailable, descendants, drop_page_cache, parse_size, remove_stale  # noqa: E402
from procs import BENCH, CACHE, REGISTRY, WORK, clean_stale  # noqa: E402
from servers import s3rver_served  # noqa: E402

MiB = 1 << 20
BUCKET, PREFIX = "bench", "dlio"
VENV_BIN = Path(sys.executable).parent


def dlio_argv(data_folder: Path, out: Path, args, *, generate: bool) -> list[str]:
    record = args.record_mib * MiB
    argv = ["workload=unet3d_a100",
            f"++workload.workflow.generate_data={generate}", f"++workload.workflow.train={not generate}",
            "++workload.workflow.checkpoint=False",
            f"++workload.dataset.data_folder={data_folder}",
            f"++workload.dataset.num_files_train={args.files}",
            f"++workload.dataset.record_length={record}",
            f"++workload.dataset.record_length_stdev={record // 4}",
            f"++workload.dataset.record_length_resize={record}",
            f"++workload.train.epochs={args.epochs}",
            f"++workload.train.computation_time={args.compute}",
            f"++workload.reader.batch_size={args.batch}",
            f"++workload.reader.read_threads={args.read_threads}",
            f"++workload.output.folder={out}",
            f"hydra.run.dir={out}/hydra"]
    dlio = [str(VENV_BIN / "dlio_benchmark")]
    mpirun = shutil.which("mpirun")
    if mpirun:
        dlio = [mpirun, "-np", "1", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"] + dlio
    return dlio + argv


def run_dlio(argv: list[str], log: Path, limit: CacheLimit | None = None) -> dict:
    """Run DLIO (inside `limit`'s group when given); its CPU seconds (all its processes:
    mpirun, dlio_benchmark, the DataLoader's workers) and wall time."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    if limit is not None:
        argv = limit.wrap(argv)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600, cwd=log.parent)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"dlio_benchmark failed ({done.returncode}); see {log}")
    return {"seconds": time.perf_counter() - start,
            "dlio_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def s3_requests(log: Path, offset: int) -> tuple[dict, int]:
    """What s3rver served since `offset` of its log (bench/servers.py), and the new offset."""
    served, end = s3rver_served(log, offset)
    gets = [r for r in served if r.kind == "get"]
    out = {"requests": len(served), "ranged_get": sum(r.status == 206 for r in gets),
           "whole_get": sum(r.status == 200 for r in gets), "head": sum(r.kind == "head" for r in served),
           "listing": sum(r.kind == "listing" for r in served), "other": sum(r.kind == "other" for r in served),
           "get_mib": round(sum(r.nbytes for r in gets) / MiB, 1)}
    if gets:  # s3rver's time per GET: from the request to the answer's last byte
        ms = sorted(r.ms for r in gets)
        out["get_ms_mean"] = round(sum(ms) / len(ms), 1)
        out["get_ms_median"] = ms[len(ms) // 2]
        out["get_ms_sum"] = round(sum(ms))
        bounds = (0.5, 1, 2, 4, 8, 16)
        out["get_sizes_mib"] = {f"<={b}": sum(1 for r in gets if (i == 0 or r.nbytes > bounds[i - 1] * MiB)
                                               and r.nbytes <= b * MiB) for i, b in enumerate(bounds)}
        out["get_sizes_mib"][">16"] = sum(1 for r in gets if r.nbytes > 16 * MiB)
    return out, end


def dataset(args, s3, work: Path) -> None:
    """Generate the dataset with DLIO once (kept under bench/.cache), upload what is missing."""
    tag = f"unet3d-{args.files}x{args.record_mib}MiB"
    local = CACHE / "dlio-data" / tag
    if len(list((local / "train").glob("*.npz"))) != args.files:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        print(f"generating {tag} with dlio_benchmark", flush=True)
        run_dlio(dlio_argv(local, work / "generate", args, generate=True), work / "generate.log")
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:
        if "BucketAlready" not in type(exc).__name__ and "BucketAlready" not in str(exc):
            raise
    have = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/") for o in page.get("Contents", [])}
    stale = [k for k in have if k.startswith(f"{PREFIX}/train/")
             and not (local / "train" / k.rsplit("/", 1)[1]).exists()]
    for key in stale:  # another --files/--record-mib: only this dataset under the prefix
        s3.delete_object(Bucket=BUCKET, Key=key)
    files = sorted((local / "train").glob("*.npz"))
    todo = [p for p in files if have.get(f"{PREFIX}/train/{p.name}") != p.stat().st_size]
    if todo:
        print(f"uploading {len(todo)} files", flush=True)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: s3.upload_file(str(p), BUCKET, f"{PREFIX}/train/{p.name}"), todo))
    # bench/systems.py waits for a `large` directory to call a mount ready; DLIO lists
    # `valid` (no evaluation here: no npz in it), and a store has no empty directories.
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/large/README", Body=b"the mount-ready marker of bench/systems.py\n")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/valid/README", Body=b"no evaluation files\n")
    args.dataset_bytes = sum(p.stat().st_size for p in files)


def summary(out: Path) -> dict:
    found = list(out.rglob("summary.json"))
    if not found:
        raise RuntimeError(f"no summary.json under {out}")
    metric = json.loads(found[0].read_text())["metric"]
    return {"au": metric["train_au_percentage"], "samples_s": metric["train_throughput_samples_per_second"],
            "au_mean": metric["train_au_mean_percentage"],
            "samples_s_mean": metric["train_throughput_mean_samples_per_second"],
            "io_mb_s_mean": metric.get("train_io_mean_MB_per_second")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="local,dorafs,s3fs,rclone",
                   help="local: the same files on the local disk (the machine's ceiling)")
    p.add_argument("--files", type=int, default=96)
    p.add_argument("--record-mib", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--compute", type=float, default=0.2, help="simulated accelerator seconds per batch")
    p.add_argument("--kernel-cache", default="256MiB",
                   help="page cache DLIO's processes may hold (cgroup v1 memory; `off`: no bound)")
    p.add_argument("--daemon-cache", default="256MiB",
                   help="page cache the mount daemons may hold of their own cache files (`off`: no bound)")
    p.add_argument("--s3", choices=["s3rver", "moto"], default="s3rver")
    args = p.parse_args()
    if not (VENV_BIN / "dlio_benchmark").exists():
        sys.exit("dlio.py: dlio_benchmark is not installed (bash bench/setup.sh)")
    args.kernel_cache_bytes = parse_size(args.kernel_cache)
    args.daemon_cache_bytes = parse_size(args.daemon_cache)
    if args.kernel_cache_bytes or args.daemon_cache_bytes:
        try:  # fail now, not after the upload
            CacheLimit("dlio-probe", 64 << 20).close()
        except Unavailable as exc:
            sys.exit(f"dlio.py: {exc}")
    # SIGTERM unwinds like Ctrl-C: mounts, processes and cgroups are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from servers import SERVERS
    from systems import SYSTEMS

    for line in clean_stale() + remove_stale("bench-dlio-"):
        print(line)
    work = WORK / "dlio"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, dict] = {}
    args.loadavg = []
    try:
        server = SERVERS[args.s3](work)
        os.environ.update(server.env)
        dataset(args, server.client(), work)
        s3log = server.proc.log_path
        for name in args.systems.split(","):
            if name == "local":  # the ceiling: the generated files on the local disk
                local = CACHE / "dlio-data" / f"unet3d-{args.files}x{args.record_mib}MiB"
                out = work / "out" / "local"
                out.mkdir(parents=True)
                drop_page_cache(local)  # read from the disk, charged to DLIO's group
                with limits(args, "local") as (reader, _):
                    r = run_dlio(dlio_argv(local, out, args, generate=False), work / "local.log", reader)
                    r |= {"reader_cgroup": reader.stats()} if reader else {}
                results[name] = {"config": f"local disk {local}", "warm": summary(out) | r}
                show(name, "disk", results[name]["warm"])
                continue
            cls = SYSTEMS[name]
            why = cls.available()
            if why:
                print(f"{name}: skipped ({why})")
                continue
            system = cls(server, PREFIX, work)
            session = system.session()
            results[name] = {"config": system.config}
            try:
                for phase in ("cold", "warm"):
                    # The system's own cache is on the disk: nothing of it in memory at the start.
                    drop_page_cache(session.cache)
                    with limits(args, f"{name}-{phase}") as (reader, daemons), session.mount() as m:
                        pids = [m.proc.pid] + descendants(m.proc.pid)
                        if daemons is not None:
                            for pid in pids:
                                daemons.adopt(pid)
                        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
                        s3rver_cpu0 = cpu_seconds(server.proc.pid)
                        _, mark = s3_requests(s3log, 0)
                        out = work / "out" / f"{name}-{phase}"
                        out.mkdir(parents=True)
                        args.loadavg.append(os.getloadavg()[0])
                        r = run_dlio(dlio_argv(m.path, out, args, generate=False), work / f"{name}-{phase}.log",
                                     reader)
                        args.loadavg.append(os.getloadavg()[0])
                        r["s3"], _ = s3_requests(s3log, mark)
                        r["s3rver_cpu_s"] = round(cpu_seconds(server.proc.pid) - s3rver_cpu0, 1)
                        r["daemon_cpu_s"] = {f"{'mount' if pid == m.proc.pid else 'child'}-{pid}":
                                             round(cpu_seconds(pid) - cpu0[pid], 1)
                                             for pid in pids if cpu_seconds(pid) is not None and cpu0[pid] is not None}
                        if reader is not None:
                            r["reader_cgroup"] = reader.stats()
                        if daemons is not None:
                            r["daemon_cgroup"] = daemons.stats()
                        r["loadavg_1m"] = os.getloadavg()[0]
                        results[name][phase] = summary(out) | r
                        show(name, phase, results[name][phase])
            finally:
                session.close()
    finally:
        REGISTRY.teardown()
    report(results, args)


def show(name: str, phase: str, r: dict) -> None:
    extra = ""
    if "s3" in r:
        s3 = r["s3"]
        extra = (f"; S3 {s3['requests']} requests ({s3['ranged_get']} ranged GETs, {s3['whole_get']} whole, "
                 f"{s3['head']} HEAD, {s3['listing']} listings), {s3['get_mib']:.0f} MiB; "
                 f"daemon CPU {r['daemon_cpu_s']}, s3rver CPU {r['s3rver_cpu_s']} s; "
                 f"GET sizes {s3.get('get_sizes_mib')}, s3rver ms per GET mean {s3.get('get_ms_mean')} "
                 f"median {s3.get('get_ms_median')}")
    if "reader_cgroup" in r:
        extra += f"; DLIO page cache peak {r['reader_cgroup']['peak_file_mib']:.0f} MiB"
    print(f"{name} {phase}: AU {r['au_mean']:.1f}% ({', '.join(f'{a:.1f}' for a in r['au'])}), "
          f"{r['samples_s_mean']:.2f} samples/s ({', '.join(f'{a:.2f}' for a in r['samples_s'])}), "
          f"{r['seconds']:.0f} s, DLIO CPU {r['dlio_cpu_s']} s{extra}", flush=True)


@contextmanager
def limits(args, tag: str):
    """The two groups of one run: DLIO's (`--kernel-cache`) and the mount daemons'
    (`--daemon-cache`), each None when off; removed on the way out, whatever happened."""
    reader = daemons = None
    try:
        if args.kernel_cache_bytes:
            reader = CacheLimit(f"dlio-reader-{tag}", args.kernel_cache_bytes)
        if args.daemon_cache_bytes:
            daemons = CacheLimit(f"dlio-daemons-{tag}", args.daemon_cache_bytes)
        yield reader, daemons
    finally:
        for group in (reader, daemons):
            if group is not None:
                try:
                    group.close()
                except OSError as exc:
                    print(f"dlio.py: could not remove {group.path}: {exc}")


def report(results: dict, args) -> None:
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    bound = (f"DLIO's page cache bounded at {args.kernel_cache}, the daemons' at {args.daemon_cache}"
             if args.kernel_cache_bytes else "no page cache bound")
    loads = ", ".join(f"{x:.1f}" for x in args.loadavg)
    lines = [f"DLIO unet3d (PyTorch reader, npz), {args.files} files of ~{args.record_mib} MiB "
             f"({args.dataset_bytes / MiB:.0f} MiB), batch {args.batch}, read_threads {args.read_threads}, "
             f"computation_time {args.compute} s, {args.epochs} epochs, {args.s3}; {bound}", "",
             "| system | run | AU % (mean; per epoch) | samples/s (mean; per epoch) | wall s | "
             "S3 GETs ranged, whole, HEADs; GET MiB | CPU s: DLIO, daemons, s3rver | page cache peak MiB: DLIO, daemons |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for phase in ("cold", "warm"):
            if phase not in r:
                continue
            x = r[phase]
            label = "local disk" if name == "local" else phase
            s3 = x.get("s3")
            s3_text = (f"{s3['ranged_get']}, {s3['whole_get']}, {s3['head']}; {s3['get_mib']:.0f}"
                       if s3 else "–")
            daemon_cpu = "+".join(f"{v:.1f}" for v in x.get("daemon_cpu_s", {}).values()) or "–"
            if "s3rver_cpu_s" in x:
                daemon_cpu += f", s3rver {x['s3rver_cpu_s']:.1f}"
            peaks = ", ".join(f"{x[g]['peak_file_mib']:.0f}" if g in x else "–"
                              for g in ("reader_cgroup", "daemon_cgroup"))
            lines.append(f"| {name} | {label} | {x['au_mean']:.1f}; {', '.join(f'{a:.1f}' for a in x['au'])} | "
                         f"{x['samples_s_mean']:.2f}; {', '.join(f'{s:.2f}' for s in x['samples_s'])} | "
                         f"{x['seconds']:.0f} | {s3_text} | {x['dlio_cpu_s']:.1f}, {daemon_cpu} | {peaks} |")
    lines += ["", f"1-minute load average at the start and end of each run: {loads}"]
    text = "\n".join(lines)
    print("\n" + text)
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / f"dlio-{stamp}.md").write_text(f"`{' '.join(sys.argv)}`\n\n{text}\n")
    (out / f"dlio-{stamp}.json").write_text(json.dumps({"argv": sys.argv, "args": vars(args), "results": results},
                                                       indent=1))
    try:
        plot(results, out / f"dlio-{stamp}.png", lines[0])
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"results: {out}/dlio-{stamp}.*")


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "au", "AU, % (epoch 1 | epoch 2)"),
                           (axes[1], "samples_s", "samples/s (epoch 1 | epoch 2)")):
        width = 0.2
        for j, (phase, epoch) in enumerate([("cold", 0), ("cold", 1), ("warm", 0), ("warm", 1)]):
            values = [results[n].get(phase, {}).get(key, [0, 0])[epoch] for n in names]
            xs = [i + (j - 1.5) * width for i in range(len(names))]
            ax.bar(xs, values, width, label=f"{phase}, epoch {epoch + 1}")
        ax.set_xticks(range(len(names)), [f"{n}\n(disk: warm bars)" if n == "local" else n for n in names])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
