"""Profile the dorafs mount and its worker with py-spy while one scenario runs warm.

    python3 bench/profile.py seq1        # or rand4k, small, stat, ... (a scenario or row name)
    python3 bench/profile.py seq1 --cold # profile the cold pass instead

Starts s3rver (the dataset must have been uploaded by a harness run in the same mode),
mounts dorafs on a fresh cache, runs the scenario cold, remounts and runs it again under
`py-spy record` on the mount and on the embedded worker (`--idle` off: only samples where a
thread is on CPU or blocked in Python count), then prints the functions with the most own
samples for each process and the share of wall time each process spent on CPU.
Flame graphs (SVG) are left under bench/.cache/profiles/.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset  # noqa: E402
from procs import CACHE, REGISTRY, WORK, clean_stale  # noqa: E402
from scenarios import Ctx, all_scenarios  # noqa: E402
from servers import S3rver  # noqa: E402
from systems import Dorafs  # noqa: E402

OUT = CACHE / "profiles"


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().split(")")[-1].split()
        import os
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def worker_counters(cache: Path) -> dict[str, float]:
    """A few of the embedded worker's Prometheus counters (summed over labels)."""
    import httpx
    try:
        address = (cache / "worker.addr").read_text().strip()
        text = httpx.get(f"http://{address}/metrics", timeout=5).text
    except Exception:
        return {}
    out: dict[str, float] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{")[0]
        if base in ("dorafs_worker_bytes_served_total", "dorafs_worker_page_requests_total",
                    "dorafs_worker_ufs_requests_total", "dorafs_worker_metadata_requests_total"):
            out[name if base != "dorafs_worker_bytes_served_total" else base] += float(value)
    return out


def top_frames(raw: Path, n: int = 15) -> list[tuple[int, str]]:
    """Own-time samples per innermost frame from py-spy's collapsed-stack output."""
    own: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        total += int(count)
    return [(c * 100 // max(total, 1), f) for f, c in own.most_common(n)], total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--mode", default="quick", choices=sorted(dataset.SPECS))
    p.add_argument("--cold", action="store_true")
    p.add_argument("--dorafs-options", default="")
    p.add_argument("--repeat", type=int, default=5, help="run the measured pass this many times (more samples)")
    args = p.parse_args()
    if not shutil.which("py-spy"):
        raise SystemExit("profile: py-spy is not installed (pip install py-spy)")
    scenario = next((s for s in all_scenarios() if args.scenario in (s.name, *s.row_names())), None)
    if scenario is None:
        raise SystemExit(f"profile: no scenario {args.scenario}")
    clean_stale()
    spec = dataset.SPECS[args.mode]
    workdir = WORK / f"profile-{time.strftime('%H%M%S')}"
    workdir.mkdir(parents=True)
    OUT.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(spec, workdir, args.mode == "quick", 600)
    try:
        server = S3rver(workdir)
        if dataset.count_objects(server.client(), spec) != len(spec.objects()):
            raise SystemExit("profile: dataset missing; run the harness once in this mode first")
        system = Dorafs(server, spec.mode, workdir)
        system.options = args.dorafs_options
        session = system.session()
        if not args.cold:
            with session.mount() as m:
                scenario.run(ctx, m.path, "cold")
                scenario.prefill(ctx, m.path)
        with session.mount() as m:
            pids = dict(m.rss_pids)
            spies = {}
            for role, pid in pids.items():
                raw = OUT / f"{scenario.name}-{role}.txt"
                spies[role] = (subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "200",
                                                 "--format", "raw", "--output", str(raw), "--nonblocking"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw)
            time.sleep(1.0)
            cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
            metrics0 = worker_counters(session.cache)
            start = time.perf_counter()
            for _ in range(1 if args.cold else args.repeat):
                out = scenario.run(ctx, m.path, "cold" if args.cold else "warm")
            wall = time.perf_counter() - start
            cpu = {role: cpu_seconds(pid) - cpu0[role] for role, pid in pids.items()}
            metrics1 = worker_counters(session.cache)
            for proc, _ in spies.values():
                proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
                proc.wait(30)
        session.close()
        for row, (value, detail) in out.items():
            print(f"{row}: {value:,.1f} {scenario.unit} (last pass; {wall:.1f} s for all passes)")
        print("worker counters during the measured passes:")
        for name in sorted(metrics1):
            delta = metrics1[name] - metrics0.get(name, 0)
            if delta:
                print(f"   {name} +{delta:,.0f}")
        for role, (_, raw) in spies.items():
            print(f"\n== {role} (pid {pids[role]}): {cpu[role]:.1f} CPU-s in {wall:.1f} s wall "
                  f"= {100 * cpu[role] / wall:.0f}% of one core")
            if raw.exists():
                frames, total = top_frames(raw)
                print(f"   {total} samples; own time by innermost frame:")
                for pct, frame in frames:
                    print(f"   {pct:3d}%  {frame}")
    finally:
        REGISTRY.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
