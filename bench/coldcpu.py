"""Where the CPU goes during a sequential read, cold or warm: the mount, its worker and the S3 server.

    python3 bench/coldcpu.py [-o DORAFS_OPTIONS] [--repeat N] [--warm] [--mode quick] [--small]
                             [--readers N] [--bs SIZE] [--fill-only N] [--spy FILE] [--perf FILE] [--peer s3fs]

Needs the dataset in s3rver (run `python3 bench/harness.py --full` once; `--mode quick`
reads the quick dataset's 256 MiB object instead, so the quick run of the harness is
enough). Each pass mounts dorafs on an empty cache, reads the large object with fio (256 KiB, one reader;
`--readers N`: N readers, each its own part, as the harness's seq4; `--bs` another read size)
and prints the throughput with the CPU seconds each process spent meanwhile: on two
cores, their sum against twice the wall time tells whether the read is CPU-bound.
With `--small`, each pass reads the dataset's small files instead (bench/workloads.py
smallfiles: 4 processes, random order) and prints files/s, the CPU milliseconds per file
of each process and the S3 requests per file.
With `--fill-only N`, nothing reads through the mount: the pass asks the mount's worker
for the large object's runs itself (`/v1/locate?stream=1`, as a sequential reader's
readahead does), N at once, and the row is the fill alone: what the worker and the store
manage without the mount and the reader beside them on the same cores.
With `--warm`, the cache is filled once and kept: each pass is a fresh mount (and
worker) over the full cache, as the harness's warm phase. `--peer s3fs` times s3fs
instead (with the harness's options); `user` columns are user-mode CPU alone (the
interpreter's share), `locates` the worker's /v1/locate requests in the pass, `idle`
the CPU seconds the whole machine left unused meanwhile (all cores): what a pass that
waits rather than computes leaves on the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset  # noqa: E402
from procs import WORK, children, cpu_seconds, each_at_once, unmount  # noqa: E402
from servers import S3rver  # noqa: E402


def written_bytes(pid: int) -> int:
    """Bytes the process has handed to write and send calls (its sockets' too): for s3rver, what it served."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


SYSCALLS = ("read", "pread64", "write", "writev", "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "mmap", "munmap")


def threads_cpu(pid: int) -> dict[str, float]:
    """s3rver's CPU seconds so far, split: its main thread (the event loop: parsing, JS,
    socket writes) and the others (libuv's pool reading the files, V8's collecting
    garbage and compiling: all named "node"), each user and system,
    and its context switches (voluntary: it waited; involuntary: it was put off a core)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(("main_user", "main_sys", "others_user", "others_sys", "waits", "preempted"), 0.0)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().split(")")[-1].split()
            with open(f"/proc/{pid}/task/{task}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # a thread that ended meanwhile
            continue
        who = "main" if task == str(pid) else "others"
        out[f"{who}_user"] += int(fields[11]) / tick
        out[f"{who}_sys"] += int(fields[12]) / tick
        out["waits"] += int(status["voluntary_ctxt_switches"])
        out["preempted"] += int(status["nonvoluntary_ctxt_switches"])
    return out


def syscall_counter(pid: int, path: Path) -> subprocess.Popen:
    """perf counting s3rver's system calls of `SYSCALLS` (all its threads) until SIGINT, into `path`."""
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(pid), "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def syscall_counts(path: Path) -> dict[str, int]:
    counts = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    return counts


def idle_seconds() -> float:
    """CPU seconds the whole machine spent idle so far (every core; /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")  # idle + iowait


def fill_only(server: S3rver, cache: Path, mode: str, at_once: int) -> dict:
    """The worker's fill alone, without the mount's reads: the large object asked for as
    streamed runs (`/v1/locate?stream=1`, RUN_PAGES pages each, as a sequential reader's
    readahead asks), `at_once` of them in flight, each answer read to its end. fio's
    figures: {"bw": KiB/s, "runtime": ms, "io_bytes"}."""
    import boto3
    import httpx

    from dorafs.client.prefetch import RUN_PAGES

    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.key,
                      aws_secret_access_key=server.secret, region_name="us-east-1")
    key = f"{mode}/large/big.bin"
    head = s3.head_object(Bucket="bench", Key=key)
    size, page = head["ContentLength"], 1 << 20
    address = (cache / "worker.addr").read_text().strip()
    secret = (cache / "worker.secret").read_text().strip()

    def run(first: int, client) -> None:
        params = {"uri": f"s3://bench/{key}", "version": head["ETag"], "size": size, "index": first,
                  "page_size": page, "count": RUN_PAGES, "stream": 1}
        with client.stream("GET", f"http://{address}/v1/locate", params=params) as answer:
            answer.raise_for_status()
            for _ in answer.iter_raw():
                pass

    began = time.monotonic()
    each_at_once(range(0, -(-size // page), RUN_PAGES), at_once, run,
                 per_thread=lambda: httpx.Client(headers={"Authorization": f"Bearer {secret}"}, timeout=60))
    seconds = time.monotonic() - began
    return {"bw": size / 1024 / seconds, "runtime": seconds * 1000, "io_bytes": size}


def worker_requests(cache: Path, path: str) -> float:
    """Requests the mount's own worker answered on `path` so far (its /metrics, with the
    secret and address the mount keeps in its cache directory)."""
    import urllib.request

    address = (cache / "worker.addr").read_text().strip()
    secret = (cache / "worker.secret").read_text().strip()
    request = urllib.request.Request(f"http://{address}/metrics", headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("dorafs_worker_request_latency_seconds_count") and f'path="{path}"' in line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", dest="options", default="", help="extra -o options for the dorafs mount")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--mode", choices=("full", "quick"), default="full", help="which dataset's large object")
    p.add_argument("--warm", action="store_true", help="keep the cache: fill it once, then time warm remounts")
    p.add_argument("--readers", type=int, default=1, help="fio jobs reading the large object, each its own part "
                   "(4: the harness's seq4)")
    p.add_argument("--bs", default="256k", help="fio's read size (default 256k, as the harness)")
    p.add_argument("--random", metavar="MIB", type=int, help="random reads instead (fio randread): each reader "
                   "this many MiB at random places of the whole object, as the harness's rand4k (64 per reader, "
                   "--bs 4k) and rand256k (256, --bs 256k), with --readers 4")
    p.add_argument("--fill-only", type=int, metavar="N", help="no reads through the mount: ask its worker for the "
                   "large object's runs directly, N at once (the fill alone: the worker and the store)")
    p.add_argument("--small", action="store_true", help="read the small files (4 processes) instead of the large object")
    p.add_argument("--spy", metavar="FILE", help="record the mount and the worker in each timed pass with py-spy (raw, FILE.N.ROLE)")
    p.add_argument("--peer", choices=("s3fs",), help="mount the peer instead (the harness's options): its "
                   "daemon's CPU in the mount column, no worker")
    p.add_argument("--perf", metavar="FILE", help="record the whole machine in each timed pass with perf (FILE.N; "
                   "then `perf report -i FILE.N --sort comm,dso`)")
    p.add_argument("--fio-log", metavar="PREFIX", help="fio's bandwidth every 50 ms of each timed pass, in "
                   "PREFIX.N_bw.*.log (ms, KiB/s): where a pass ramps up, waits or tails off")
    p.add_argument("--s3rver-stat", action="store_true",
                   help="a second line a pass: s3rver's CPU by thread (its event loop, the others) and mode, its context "
                        "switches, and its system calls per MiB read (perf)")
    p.add_argument("--warm-server", type=int, default=0, metavar="N",
                   help="read the large object N times straight from s3rver first, untimed (the harness: once)")
    args = p.parse_args()
    work = WORK / "coldcpu"
    work.mkdir(parents=True, exist_ok=True)
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(exist_ok=True)
    server = S3rver(work)
    try:
        env = dict(os.environ) | server.env
        if args.small:
            names = work / "small-names.txt"
            names.write_text("\n".join(dataset.SPECS[args.mode].small_names()) + "\n")
            print(f"{'pass':>4} {'files/s':>8} {'wall s':>7} {'mount':>7} {'worker':>7} {'s3rver':>7}  (CPU ms per file)"
                  f"  {'S3 req/file':>11}")
        else:
            print(f"{'pass':>4} {'MiB/s':>7} {'wall s':>7} {'mount':>7} {'worker':>7} {'s3rver':>7}  (CPU seconds)"
                  f"  {'worker/GiB':>10} {'user':>5} {'mount/GiB':>9} {'user':>5} {'S3 req':>6} {'locates':>7} {'idle':>5} {'served':>6}")
        if args.warm_server:
            from harness import warm_server
            for _ in range(args.warm_server):
                print(f"s3rver warmed up: the large object read from it in {warm_server(server, dataset.SPECS[args.mode]):.1f} s")
        shutil.rmtree(cache, ignore_errors=True)
        unmount(mnt)  # one a killed run left
        for n in range(-1 if args.warm else 0, args.repeat):  # pass 0 of --warm fills the cache
            if not args.warm:
                shutil.rmtree(cache, ignore_errors=True)
            argv = [sys.executable, "-m", "dorafs.cli.main", "mount", f"s3://bench/{args.mode}", str(mnt), "--foreground",
                    "--cache-dir", str(cache)] + (["-o", args.options] if args.options else [])
            if args.peer == "s3fs":
                cache.mkdir(parents=True, exist_ok=True)
                passwd = work / "s3fs.passwd"
                passwd.write_text(f"{server.key}:{server.secret}\n")
                passwd.chmod(0o600)
                argv = ["s3fs", f"bench:/{args.mode}", str(mnt), "-f", "-o",
                        f"url={server.endpoint},use_path_request_style,passwd_file={passwd},ro,use_cache={cache},"
                        "kernel_cache,max_stat_cache_size=100000,dbglevel=warn"]
            mount = subprocess.Popen(argv, env=env, stdout=open(work / "mount.log", "w"), stderr=subprocess.STDOUT)
            worker = 0
            try:
                deadline = time.monotonic() + 30
                while not os.path.ismount(mnt):
                    if time.monotonic() > deadline or mount.poll() is not None:
                        raise SystemExit(f"coldcpu: the mount did not start (see {work / 'mount.log'})")
                    time.sleep(0.1)
                pids = {"mount": mount.pid, "s3rver": server.proc.pid}
                if not args.peer:
                    pids["worker"] = worker = children(mount.pid)[0]
                spies = []
                if args.spy and n >= 0:
                    for role in ("mount", "worker"):
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(pids[role]), "--rate", "500", "--threads", "--format",
                             "raw", "--output", f"{args.spy}.{n + 1}.{role}", "--nonblocking"] + os.environ.get("SPY_ARGS", "").split(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(1)
                if args.perf and n >= 0:
                    spies.append(subprocess.Popen(["perf", "record", "-a", "-g", "-q", "-o", f"{args.perf}.{n + 1}"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    time.sleep(0.5)
                if args.s3rver_stat:
                    counter = syscall_counter(server.proc.pid, work / "s3rver-syscalls.txt")
                    time.sleep(0.3)
                    split = threads_cpu(server.proc.pid)
                before = {k: cpu_seconds(v) for k, v in pids.items()}
                before_user = {k: cpu_seconds(v, user_only=True) for k, v in pids.items()}
                if args.small:
                    requests = server.requests()
                    out = subprocess.run([sys.executable, str(Path(__file__).parent / "workloads.py"), "smallfiles",
                                          "--root", str(mnt / "small"), "--names", str(names), "--procs", "4"],
                                         capture_output=True, text=True, check=True)
                    spent = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
                    requests = server.requests() - requests
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    files = r["files"]
                    print(f"{n + 1:>4} {files / r['seconds']:>8.1f} {r['seconds']:>7.2f} "
                          + " ".join(f"{spent.get(k, 0.0) * 1000 / files:>7.2f}" for k in ("mount", "worker", "s3rver"))
                          + f"  {requests / files:>11.2f}", flush=True)
                    continue
                requests = server.requests()
                idle = idle_seconds()
                served = written_bytes(server.proc.pid)
                if args.fill_only:
                    read = fill_only(server, cache, args.mode, args.fill_only)
                else:
                    part = dataset.SPECS[args.mode].large_size // args.readers  # each reader its own part, as seq4
                    shape = ([f"--size={part}", f"--offset_increment={part}", "--rw=read"] if not args.random else
                             [f"--io_size={args.random}m", "--rw=randread", "--randrepeat=1", "--randseed=20261121"])
                    out = subprocess.run(["fio", "--name=cold", f"--filename={mnt}/large/big.bin", "--readonly",
                                          f"--bs={args.bs}", "--ioengine=psync", "--output-format=json",
                                          f"--numjobs={args.readers}", *shape, "--group_reporting"]
                                         + ([f"--write_bw_log={args.fio_log}.{n + 1}", "--log_avg_msec=50"]
                                            if args.fio_log and n >= 0 else []),
                                         capture_output=True, text=True, check=True)
                    read = json.loads(out.stdout)["jobs"][0]["read"]
                spent = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
                idle = idle_seconds() - idle
                served = written_bytes(server.proc.pid) - served
                user = {k: cpu_seconds(v, user_only=True) - before_user[k] for k, v in pids.items()}
                spent.setdefault("worker", 0.0)
                user.setdefault("worker", 0.0)
                if args.s3rver_stat:
                    split = {k: v - split[k] for k, v in threads_cpu(server.proc.pid).items()}
                    counter.send_signal(signal.SIGINT)
                    counter.wait(30)
                    mib = read["io_bytes"] / (1 << 20)
                    calls = syscall_counts(work / "s3rver-syscalls.txt")
                    print("      s3rver: " + " ".join(f"{k}={v:.2f}" if "_" in k else f"{k}/MiB={v / mib:.1f}"
                                                     for k, v in split.items())
                          + "  calls/MiB: " + " ".join(f"{k}={v / mib:.1f}" for k, v in calls.items() if v), flush=True)
                locates = "-" if args.peer else f"{worker_requests(cache, '/v1/locate'):.0f}"
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
                label = "fill" if n < 0 else str(n + 1)
                gib = read["io_bytes"] / (1 << 30)
                print(f"{label:>4} {read['bw'] / 1024:>7.0f} {read['runtime'] / 1000:>7.2f} {spent['mount']:>7.2f} "
                      f"{spent['worker']:>7.2f} {spent['s3rver']:>7.2f}  {spent['worker'] / gib:>10.2f} "
                      f"{user['worker'] / gib:>5.2f} {spent['mount'] / gib:>9.2f} {user['mount'] / gib:>5.2f} "
                      f"{server.requests() - requests:>6} {locates:>7} {idle:>5.2f} {served / read['io_bytes']:>6.3f}", flush=True)
            finally:
                unmount(mnt)  # the mount then ends; a SIGTERM alone left the mount behind here
                mount.terminate()
                mount.wait(30)
                unmount(mnt)
                if worker:  # its worker lets go of the cache directory as it exits: the next pass's needs it
                    deadline = time.monotonic() + 30
                    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
                        time.sleep(0.05)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
