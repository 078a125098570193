"""An MLPerf Storage-shaped figure: the DLIO benchmark's unet3d workload, scaled to two
cores, through dorafs, s3fs-fuse and rclone mounts of the same s3rver bucket.

    bash bench/setup.sh          # also: Open MPI, mpi4py, dlio-benchmark (see there)
    . .venv/bin/activate
    python3 bench/dlio.py                     # 32 files of ~16 MiB, 2 epochs, each system cold and warm
    python3 bench/dlio.py --systems dorafs --files 16

DLIO (`dlio_benchmark`, the benchmark MLPerf Storage runs) generates the unet3d dataset
once (npz files, one sample each, sizes drawn around `--record-mib` with a quarter of
it as standard deviation), which is uploaded to s3rver under `bench/dlio/train/`. Then,
per system, `mpirun -np 1 dlio_benchmark workload=unet3d_a100` with the PyTorch data
loader reads it from the system's mount: batch 4, `read_threads` 2, a simulated
accelerator computing `--compute` seconds per batch, 2 epochs; once on a fresh cache
(cold) and once on a new mount over the cache the first run left (warm: the system's
own cache, the kernel's page cache of the first mount gone with it). DLIO reports per
epoch the accelerator utilisation AU (compute time over wall time) and samples/s.
Within a run, epoch 2 may find pages the kernel kept from epoch 1: the dataset is
smaller than this machine's memory, and nothing here limits the kernel's cache, so
epoch 1 of each run is the figure free of that.

Systems as bench/systems.py starts them (dorafs: the embedded worker with its defaults;
s3fs: use_cache + kernel_cache; rclone: --vfs-cache-mode full). Results: a table, and
bench/results/dlio-<timestamp>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import BENCH, CACHE, REGISTRY, WORK, clean_stale  # noqa: E402

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


def run_dlio(argv: list[str], log: Path) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=3600, cwd=log.parent)
    if done.returncode != 0:
        raise RuntimeError(f"dlio_benchmark failed ({done.returncode}); see {log}")


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
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--record-mib", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--compute", type=float, default=0.2, help="simulated accelerator seconds per batch")
    p.add_argument("--s3", choices=["s3rver", "moto"], default="s3rver")
    args = p.parse_args()
    if not (VENV_BIN / "dlio_benchmark").exists():
        sys.exit("dlio.py: dlio_benchmark is not installed (bash bench/setup.sh)")

    from servers import SERVERS
    from systems import SYSTEMS

    for line in clean_stale():
        print(line)
    work = WORK / "dlio"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, dict] = {}
    try:
        server = SERVERS[args.s3](work)
        os.environ.update(server.env)
        dataset(args, server.client(), work)
        for name in args.systems.split(","):
            if name == "local":  # the ceiling: the generated files on the local disk, in the page cache
                out = work / "out" / "local"
                out.mkdir(parents=True)
                local = CACHE / "dlio-data" / f"unet3d-{args.files}x{args.record_mib}MiB"
                run_dlio(dlio_argv(local, out, args, generate=False), work / "local.log")
                results[name] = {"config": f"local disk {local}", "warm": summary(out)}
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
                    with session.mount() as m:
                        out = work / "out" / f"{name}-{phase}"
                        out.mkdir(parents=True)
                        start = time.perf_counter()
                        run_dlio(dlio_argv(m.path, out, args, generate=False), work / f"{name}-{phase}.log")
                        results[name][phase] = summary(out) | {"seconds": time.perf_counter() - start}
                        r = results[name][phase]
                        print(f"{name} {phase}: AU {r['au_mean']:.1f}% ({', '.join(f'{a:.1f}' for a in r['au'])}), "
                              f"{r['samples_s_mean']:.2f} samples/s", flush=True)
            finally:
                session.close()
    finally:
        REGISTRY.teardown()
    report(results, args)


def report(results: dict, args) -> None:
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    lines = [f"DLIO unet3d (PyTorch reader, npz), {args.files} files of ~{args.record_mib} MiB "
             f"({args.dataset_bytes / MiB:.0f} MiB), batch {args.batch}, read_threads {args.read_threads}, "
             f"computation_time {args.compute} s, {args.epochs} epochs, {args.s3}", "",
             "| system | run | AU % (mean; per epoch) | samples/s (mean; per epoch) |", "|---|---|---|---|"]
    for name, r in results.items():
        for phase in ("cold", "warm"):
            if phase in r and name == "local":
                phase_label = "page cache"
            else:
                phase_label = phase
            if phase in r:
                x = r[phase]
                lines.append(f"| {name} | {phase_label} | {x['au_mean']:.1f}; {', '.join(f'{a:.1f}' for a in x['au'])} | "
                             f"{x['samples_s_mean']:.2f}; {', '.join(f'{s:.2f}' for s in x['samples_s'])} |")
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
        ax.set_xticks(range(len(names)), names)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
