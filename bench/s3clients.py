"""Which S3 client should fill pages: CPU and wall time per request, side by side.

    .venv/bin/python bench/s3clients.py [--quick] [--rounds 3] [--servers s3rver,moto]

Starts s3rver and moto's server on loopback (bench/servers.py), uploads test objects under
`bench/s3clients/`, and for each client measures ranged GETs of 128 KiB and 8 MiB and
HEADs, one request at a time and eight at once, on both servers:

- `boto3`            get_object(Range=...) then Body.read(): what the worker does today
- `boto3-readinto`   the same call, the body read with readinto() into a preallocated buffer
- `crt-mem`          awscrt.s3.S3Client, a GET_OBJECT meta-request with a Range header;
                     on_body copies each chunk into a preallocated buffer
- `crt-file`         the same request with recv_filepath: the CRT writes the body to a file
                     itself (this column includes the write to the page cache; the others
                     stop in memory)
- `obstore`          obstore.get(S3Store, key, options={"range": ...}).bytes() (Rust
                     object_store; the synchronous call releases the interpreter)
- `obstore-file`     the same, then the body written to a file with os.write (open with
                     O_TRUNC, write, close): what crt-file does, done by the caller
- `presigned`        dorafs's own long GETs (dorafs/ufs/s3direct.py): a URL boto3
                     presigns, sent over a kept socket, the body received with recv_into
                     straight into a preallocated buffer (its HEADs are boto3's)

boto3 and obstore are synchronous: eight at once is eight threads. The CRT is asynchronous:
eight at once is eight meta-requests in flight (its own event-loop threads do the work).
HEAD is head_object for boto3, a DEFAULT meta-request named HeadObject for the CRT, and
obstore.head.

"CPU ms/req" is this process's CPU time (getrusage: user + system of every thread, the
clients' native threads included; the system share is kept in the JSON) over the requests; the servers' CPU is not in it.
"MiB/s" is bytes over wall time (HEADs: requests/s). Every figure is the median of the
rounds; the clients take turns within a round in a rotating order, so a noisy moment of
the shared machine falls on all of them. "req/op" counts the requests the server logged
per operation (a client that split a range or sent a HEAD first would show > 1).

The clients and the checks live in bench/s3candidates.py.

Before measuring, checks each client does what dorafs relies on, and prints the outcome:
bytes equal to the object's; a GET with If-Match of an older ETag fails as a precondition
(412) where the server honours If-Match (moto; s3rver ignores If-Match on GET, so there the
ETag of the response must be compared, as dorafs.ufs.s3 already does); credentials and the
endpoint taken from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL; a named
profile from AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE; an unknown access key id from
the environment refused (s3rver checks a V4 request's key id, not its signature; moto checks
neither).

Writes bench/results/s3clients-<timestamp>.json (every round) and .md (the medians as a
Markdown table), and prints the tables (rich). A third figure per cell: how late a Python
thread that sleeps 2 ms at a time wakes (p99) while the client works, which stands for the
worker's event loop waiting for the interpreter.
Needs awscrt and obstore in the project's venv (bench/setup.sh installs them) and s3rver
under bench/.cache/node; a server or client that is missing is skipped and said so. Run it
with the venv's interpreter (`.venv/bin/python`), which has boto3, moto and rich.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import REGISTRY, WORK, clean_stale  # noqa: E402
from s3candidates import BUCKET, CLIENTS, MIB, KIB, LARGE, PREFIX, available, content, run_checks  # noqa: E402
from servers import SERVERS, S3Server  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results"
SMALL = 128 * KIB
SMALL_OBJECTS = 64  # 128 KiB objects: ranged GETs of all of one, and HEADs
LARGE_OBJECTS = 2  # 16 MiB objects: ranged GETs of one half
console = Console(width=160)


def small_key(i: int) -> str:
    return f"{PREFIX}/small/{i % SMALL_OBJECTS:03d}"


def large_key(i: int) -> str:
    return f"{PREFIX}/large/{i % LARGE_OBJECTS}"


# -- measuring --------------------------------------------------------------------------------


def upload(server: S3Server) -> None:
    s3 = server.client()
    try:
        s3.create_bucket(Bucket=BUCKET)
    except Exception as exc:  # already there (s3rver keeps its data between runs)
        if "BucketAlready" not in type(exc).__name__ + str(exc):
            raise
    for i in range(SMALL_OBJECTS):
        s3.put_object(Bucket=BUCKET, Key=small_key(i), Body=content(i, SMALL))
    for i in range(LARGE_OBJECTS):
        s3.put_object(Bucket=BUCKET, Key=large_key(i), Body=content(100 + i, 2 * LARGE))


def operations(kind: str, count: int) -> list[tuple]:
    if kind == "HEAD":
        return [("head", small_key(i)) for i in range(count)]
    if kind == "GET 128 KiB":
        return [("get", small_key(i), 0, SMALL) for i in range(count)]
    if kind == "GET 1 MiB":  # dorafs's default page: one of the 16 MiB of an object, in turn
        return [("get", large_key(i // 16), (i % 16) * MIB, MIB) for i in range(count)]
    # 8 MiB: the first or second half of a 16 MiB object, in turn
    return [("get", large_key(i // 2), (i % 2) * LARGE, LARGE) for i in range(count)]


class InterpreterProbe:
    """A Python thread that sleeps PERIOD at a time and records how late it wakes.

    It stands for the worker's event loop: it needs the interpreter to run, so its lateness
    grows with the time the client's threads hold the GIL. Its own CPU (a few µs a wake-up)
    is in every client's figure alike.
    """

    PERIOD = 0.002

    def __init__(self):
        self.late: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            time.sleep(self.PERIOD)
            self.late.append(time.perf_counter() - t - self.PERIOD)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def p99_ms(self) -> float:
        if not self.late:
            return 0.0
        late = sorted(self.late)
        return late[min(len(late) - 1, int(len(late) * 0.99))] * 1e3


def measure(client, server: S3Server, ops: list[tuple], concurrency: int) -> dict:
    requests = server.requests()
    with InterpreterProbe() as probe:
        wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        nbytes = client.batch(ops, concurrency)
        wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"requests": len(ops), "bytes": nbytes, "wall_s": wall, "cpu_s": user + system, "sys_s": system,
            "server_requests": server.requests() - requests, "probe_p99_ms": probe.p99_ms()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests per cell (a smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every cell (default 3, quick 2)")
    p.add_argument("--servers", default="s3rver,moto")
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--markdown", metavar="JSON", help="only print the Markdown tables of an earlier run")
    args = p.parse_args()
    if args.markdown:
        report = json.loads(Path(args.markdown).read_text())
        print(markdown(report["summary"], report["clients"]))
        return
    rounds = args.rounds or (2 if args.quick else 3)
    counts = {"HEAD": 40, "GET 128 KiB": 40, "GET 1 MiB": 16, "GET 8 MiB": 8} if args.quick else \
        {"HEAD": 200, "GET 128 KiB": 120, "GET 1 MiB": 64, "GET 8 MiB": 16}
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    # moto_server and friends from this interpreter's environment, even when PATH lacks it
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for line in clean_stale():
        console.print(f"s3clients: {line}")
    workdir = WORK / "s3clients"
    workdir.mkdir(parents=True, exist_ok=True)
    names = []
    for name in args.clients.split(","):
        why = available(name)
        if why:
            console.print(f"[yellow]s3clients: skipping {name}: {why}")
        else:
            names.append(name)
    servers: dict[str, S3Server] = {}
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
                    "rounds": rounds, "counts": counts, "clients": names, "load_average": os.getloadavg(),
                    "versions": versions(), "checks": {}, "samples": []}
    try:
        for sname in args.servers.split(","):
            cls = SERVERS[sname]
            if not cls.available():
                console.print(f"[yellow]s3clients: skipping {sname}: not installed (bench/setup.sh)")
                continue
            servers[sname] = cls(workdir)
            upload(servers[sname])
        clients = {(s, n): CLIENTS[n](servers[s], workdir) for s in servers for n in names}

        checks = Table(title="What dorafs relies on, tried on each server")
        for col in ("server", "client", "check", "outcome"):
            checks.add_column(col)
        for (sname, name), client in clients.items():
            try:
                outcome = run_checks(name, servers[sname], workdir, client)
            except Exception:
                outcome = {"checks": "FAIL: " + traceback.format_exc(limit=2).splitlines()[-1]}
            report["checks"][f"{sname}/{name}"] = outcome
            for check, value in outcome.items():
                style = "red" if value.startswith("FAIL") else ""
                checks.add_row(sname, name, check, f"[{style}]{value}" if style else value)
        console.print(checks)

        for client in clients.values():  # warm: connections, the CRT's event loop, obstore's runtime
            client.batch(operations("GET 128 KiB", 8), 8)
        cells = [(s, kind, conc) for s in servers for kind in counts for conc in concurrencies]
        for round_ in range(rounds):
            for i, (sname, kind, conc) in enumerate(cells):
                order = names[(round_ + i) % len(names):] + names[:(round_ + i) % len(names)]
                for name in order:
                    sample = measure(clients[sname, name], servers[sname], operations(kind, counts[kind]), conc)
                    sample.update(round=round_, server=sname, op=kind, concurrency=conc, client=name)
                    report["samples"].append(sample)
            console.print(f"s3clients: round {round_ + 1}/{rounds} done "
                          f"(load average {os.getloadavg()[0]:.1f})")
        for client in clients.values():
            client.close()
    finally:
        REGISTRY.teardown()

    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["summary"] = summarise(report["samples"])
    report["fits"] = fits(report["summary"])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"s3clients-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}{'-quick' if args.quick else ''}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report["summary"], names))
    print_table(report["summary"], names)
    console.print(f"s3clients: wrote {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("boto3", "botocore", "awscrt", "obstore", "moto"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "absent"
    return found


def summarise(samples: list[dict]) -> list[dict]:
    """Median over rounds of each (server, op, concurrency, client)."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        groups.setdefault((s["server"], s["op"], s["concurrency"], s["client"]), []).append(s)
    rows = []
    for (server, op, conc, client), group in groups.items():
        cpu = [s["cpu_s"] / s["requests"] * 1e3 for s in group]
        rate = [(s["bytes"] / MIB if op != "HEAD" else s["requests"]) / s["wall_s"] for s in group]
        rows.append({"server": server, "op": op, "concurrency": conc, "client": client,
                     "cpu_ms_per_req": statistics.median(cpu), "cpu_ms_min": min(cpu), "cpu_ms_max": max(cpu),
                     "sys_ms_per_req": statistics.median(s["sys_s"] / s["requests"] * 1e3 for s in group),
                     "rate": statistics.median(rate), "rate_unit": "req/s" if op == "HEAD" else "MiB/s",
                     "server_requests_per_op": statistics.median(s["server_requests"] / s["requests"]
                                                                 for s in group),
                     "probe_p99_ms": statistics.median(s["probe_p99_ms"] for s in group),
                     "rounds": len(group)})
    return rows


OPS = ["HEAD", "GET 128 KiB", "GET 1 MiB", "GET 8 MiB"]


def print_table(rows: list[dict], names: list[str]) -> None:
    table = Table(title="S3 clients: CPU ms per request of this process (median of rounds) and wall rate")
    for col in ("server", "op", "at once"):
        table.add_column(col)
    for name in names:
        table.add_column(f"{name}\nCPU ms/req", justify="right")
        table.add_column("MiB/s\n(req/s)", justify="right")
    by = {(r["server"], r["op"], r["concurrency"], r["client"]): r for r in rows}
    for key in sorted({(r["server"], r["op"], r["concurrency"]) for r in rows},
                      key=lambda k: (k[0], OPS.index(k[1]), k[2])):
        cells = []
        for name in names:
            r = by.get(key + (name,))
            if r is None:
                cells += ["-", "-"]
                continue
            flag = "" if r["server_requests_per_op"] <= 1.05 else f" ({r['server_requests_per_op']:.1f} req)"
            cells += [f"{r['cpu_ms_per_req']:.2f}{flag}", f"{r['rate']:.0f}"]
        table.add_row(key[0], key[1], str(key[2]), *cells)
    console.print(table)
    probe = Table(title="How late a Python thread sleeping 2 ms at a time woke (p99, ms): the interpreter the "
                        "client left to others")
    for col in ("server", "op", "at once", *names):
        probe.add_column(col, justify="right" if col in names else "left")
    for key in sorted({(r["server"], r["op"], r["concurrency"]) for r in rows},
                      key=lambda k: (k[0], OPS.index(k[1]), k[2])):
        probe.add_row(key[0], key[1], str(key[2]),
                      *[f"{by[key + (n,)]['probe_p99_ms']:.2f}" if key + (n,) in by else "-" for n in names])
    console.print(probe)
    fitted = {(f["server"], f["concurrency"], f["client"]): f for f in fits(rows)}
    fit = Table(title="A GET's CPU: fixed ms per request + ms per MiB (least squares over the three sizes)")
    for col in ("server", "at once", *names):
        fit.add_column(col, justify="right" if col in names else "left")
    for server, conc in sorted({(k[0], k[1]) for k in fitted}):
        fit.add_row(server, str(conc), *[
            f"{fitted[server, conc, n]['ms_per_request']:.2f} + {fitted[server, conc, n]['ms_per_mib']:.2f}/MiB"
            if (server, conc, n) in fitted else "-" for n in names])
    console.print(fit)


SIZES_MIB = {"GET 128 KiB": 0.125, "GET 1 MiB": 1.0, "GET 8 MiB": 8.0}


def fits(rows: list[dict]) -> list[dict]:
    """CPU of a GET as a fixed cost per request plus a cost per MiB (least squares over the
    three sizes), per server, concurrency and client."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if r["op"] in SIZES_MIB:
            groups.setdefault((r["server"], r["concurrency"], r["client"]), []).append(
                (SIZES_MIB[r["op"]], r["cpu_ms_per_req"]))
    out = []
    for (server, conc, client), points in groups.items():
        if len(points) < 2:
            continue
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        out.append({"server": server, "concurrency": conc, "client": client,
                    "ms_per_request": my - slope * mx, "ms_per_mib": slope})
    return out


def markdown(rows: list[dict], names: list[str]) -> str:
    """The medians as the three Markdown tables bench/README.md quotes."""
    by = {(r["server"], r["op"], r["concurrency"], r["client"]): r for r in rows}
    keys = sorted({(r["server"], r["op"], r["concurrency"]) for r in rows},
                  key=lambda k: (k[0], OPS.index(k[1]), k[2]))
    figures = [("CPU ms per request of the client process (system share in brackets)",
                lambda r: f"{r['cpu_ms_per_req']:.2f} ({r['sys_ms_per_req']:.2f})"),
               ("Wall rate: MiB/s for GETs, requests/s for HEADs", lambda r: f"{r['rate']:,.0f}"),
               ("p99 lateness of a Python thread sleeping 2 ms at a time (ms)",
                lambda r: f"{r['probe_p99_ms']:.1f}")]
    out = []
    for title, cell in figures:
        out += [f"{title}:", "", "| server | op | at once | " + " | ".join(names) + " |",
                "|" + "---|" * (3 + len(names))]
        for key in keys:
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                       + " | ".join(cell(by[key + (n,)]) if key + (n,) in by else "-" for n in names) + " |")
        out.append("")
    fitted = {(f["server"], f["concurrency"], f["client"]): f for f in fits(rows)}
    out += ["A GET's CPU as fixed ms per request + ms per MiB (least squares over 128 KiB, 1 MiB, 8 MiB):", "",
            "| server | at once | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for server, conc in sorted({(k[0], k[1]) for k in fitted}):
        out.append(f"| {server} | {conc} | " + " | ".join(
            f"{fitted[server, conc, n]['ms_per_request']:.2f} + {fitted[server, conc, n]['ms_per_mib']:.2f}/MiB"
            if (server, conc, n) in fitted else "-" for n in names) + " |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
