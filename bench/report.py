"""Tables, targets, the JSON record and the PNG chart of one run.

Ratios are "how many times better dorafs is": value ratios for higher-is-better units
(MiB/s, IOPS, files/s), inverse ratios for lower-is-better ones (ms, s). So > 1 always
means dorafs wins, < 1 that it loses.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table


@dataclass
class Result:
    row: str
    phase: str
    system: str
    value: float | None
    unit: str
    higher_better: bool
    detail: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)  # peak RSS per process role during the run
    s3_requests: int | None = None
    wall_s: float = 0.0
    error: str | None = None


def better(a: float | None, b: float | None, higher_better: bool) -> float | None:
    """How many times better `a` is than `b`."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b if higher_better else b / a


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    if unit == "s":
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


class Report:
    def __init__(self, results: list[Result], systems: list[str], peers: list[str], dorafs: str,
                 natives: dict[str, float], order: list[tuple[str, str]], titles: dict[str, str]):
        self.results = results
        self.systems = systems
        self.peers = peers
        self.dorafs = dorafs
        self.natives = natives
        self.order = order
        self.titles = titles
        self.by = {(r.row, r.phase, r.system): r for r in results}

    def value(self, row, phase, system):
        r = self.by.get((row, phase, system))
        return None if r is None or r.error else r.value

    def best_peer(self, row, phase) -> tuple[str | None, float | None]:
        best, best_v = None, None
        for p in self.peers:
            r = self.by.get((row, phase, p))
            if r is None or r.error or r.value is None:
                continue
            if best_v is None or better(r.value, best_v, r.higher_better) > 1:
                best, best_v = p, r.value
        return best, best_v

    def ratios(self, row, phase, system=None) -> dict:
        system = system or self.dorafs
        r = self.by.get((row, phase, system))
        if r is None:
            return {}
        peer, peer_v = self.best_peer(row, phase)
        return {
            "best_peer": peer,
            "vs_best_peer": better(self.value(row, phase, system), peer_v, r.higher_better),
            "vs_ceiling": better(self.value(row, phase, system), self.value(row, phase, "ceiling"), r.higher_better),
            "vs_native": better(self.value(row, phase, system), self.natives.get(row), r.higher_better),
            # the "native" system: the same files read from the cache disk, no FUSE
            "vs_native_files": better(self.value(row, phase, system), self.value(row, phase, "native"),
                                      r.higher_better),
        }

    # -- the table --------------------------------------------------------------------

    def table(self, title: str) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column("scenario")
        t.add_column("phase")
        t.add_column("unit")
        for s in self.systems:
            t.add_column(s, justify="right")
        if self.natives:
            t.add_column("local file", justify="right")
        t.add_column(f"{self.dorafs}/best peer", justify="right")
        t.add_column(f"{self.dorafs}/ceiling", justify="right")
        if "native" in self.systems:
            t.add_column(f"{self.dorafs}/native", justify="right")
        t.add_column(f"{self.dorafs} RSS MiB", justify="right")
        for row, phase in self.order:
            any_r = next((self.by[k] for k in self.by if k[0] == row and k[1] == phase), None)
            if any_r is None:
                continue
            cells = []
            for s in self.systems:
                r = self.by.get((row, phase, s))
                cells.append("—" if r is None else ("[red]error[/red]" if r.error else fmt(r.value, r.unit)))
            if self.natives:
                cells.append(fmt(self.natives.get(row), any_r.unit) if row in self.natives else "")
            rat = self.ratios(row, phase)
            if row in self.natives:
                vs = fmt_ratio(rat.get("vs_native"))
                peer_cell = f"{fmt_ratio(rat.get('vs_best_peer'))} ({vs} native)"
            else:
                peer_cell = fmt_ratio(rat.get("vs_best_peer"))
            d = self.by.get((row, phase, self.dorafs))
            rss = "—"
            if d is not None and d.rss_mib:
                rss = "+".join(f"{v:.0f}" for v in d.rss_mib.values() if v is not None)
            cells += [peer_cell, fmt_ratio(rat.get("vs_ceiling"))]
            if "native" in self.systems:
                cells.append(fmt_ratio(rat.get("vs_native_files")))
            cells.append(rss)
            unit = any_r.unit + ("" if any_r.higher_better else " ↓")
            t.add_row(row, phase, unit, *cells)
        return t

    def plain_table(self) -> str:
        """The table as Markdown (for bench/README.md)."""
        head = ["scenario", "phase", "unit", *self.systems] + (["local file"] if self.natives else []) + \
               [f"{self.dorafs}/best peer", f"{self.dorafs}/ceiling"] + \
               ([f"{self.dorafs}/native"] if "native" in self.systems else []) + [f"{self.dorafs} RSS MiB (mount+worker)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, phase in self.order:
            any_r = next((self.by[k] for k in self.by if k[0] == row and k[1] == phase), None)
            if any_r is None:
                continue
            cells = [row, phase, any_r.unit + ("" if any_r.higher_better else " (lower is better)")]
            for s in self.systems:
                r = self.by.get((row, phase, s))
                cells.append("—" if r is None else ("error" if r.error else fmt(r.value, r.unit)))
            if self.natives:
                cells.append(fmt(self.natives.get(row), any_r.unit) if row in self.natives else "")
            rat = self.ratios(row, phase)
            peer = fmt_ratio(rat.get("vs_best_peer"))
            if row in self.natives:
                peer += f" ({fmt_ratio(rat.get('vs_native'))} native)"
            d = self.by.get((row, phase, self.dorafs))
            rss = "+".join(f"{v:.0f}" for v in (d.rss_mib or {}).values() if v is not None) if d else "—"
            cells += [peer, fmt_ratio(rat.get("vs_ceiling"))]
            if "native" in self.systems:
                cells.append(fmt_ratio(rat.get("vs_native_files")))
            cells.append(rss or "—")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    # -- rounds ---------------------------------------------------------------------------

    def round_rows(self) -> list[tuple[str, str, str, list, float | None]]:
        """(row, phase, system, its ratio to the best peer in each round, their median),
        for dorafs and a baseline beside it."""
        out = []
        for row, phase in self.order:
            for system in self.systems:
                d = self.by.get((row, phase, system))
                ratios = (d.detail or {}).get("round_ratios") if d is not None else None
                if not ratios:
                    continue
                known = [r for r in ratios if r is not None]
                out.append((row, phase, system, ratios, statistics.median(known) if known else None))
        return out

    def rounds_table(self) -> Table:
        t = Table(title="× the best peer, each round (passes run side by side)", title_justify="left")
        t.add_column("scenario")
        t.add_column("phase")
        t.add_column("system")
        t.add_column("each round", justify="right")
        t.add_column("median", justify="right")
        t.add_column("rounds ≥ 1", justify="right")
        for row, phase, system, ratios, median in self.round_rows():
            t.add_row(row, phase, system, "  ".join(fmt_ratio(r) for r in ratios), fmt_ratio(median),
                      f"{sum(1 for r in ratios if r is not None and r >= 1)} of {len(ratios)}")
        return t

    def plain_rounds(self) -> str:
        lines = ["| scenario | phase | system | × the best peer, each round | median | rounds ≥ 1 |",
                 "|---|---|---|---|---|---|"]
        for row, phase, system, ratios, median in self.round_rows():
            lines.append(f"| {row} | {phase} | {system} | {', '.join(fmt_ratio(r) for r in ratios)} | "
                         f"{fmt_ratio(median)} | {sum(1 for r in ratios if r is not None and r >= 1)} of {len(ratios)} |")
        return "\n".join(lines)

    # -- the targets of issue 3 -------------------------------------------------------

    def targets(self) -> list[dict]:
        out = []

        def add(name, measured, goal, ok):
            out.append({"target": name, "measured": measured, "goal": goal,
                        "met": None if ok is None else bool(ok)})

        def check(label, row, phase, key, goal):
            r = self.ratios(row, phase).get(key)
            add(label, None if r is None else round(r, 3), goal, None if r is None else r >= goal)

        check("warm sequential, 1 reader, vs best peer", "seq1", "warm", "vs_best_peer", 1.5)
        check("warm sequential, 1 reader, vs FUSE ceiling", "seq1", "warm", "vs_ceiling", 0.6)
        check("cold sequential, 1 reader, vs best peer", "seq1", "cold", "vs_best_peer", 1.5)
        check("cold sequential, 4 readers, vs best peer", "seq4", "cold", "vs_best_peer", 1.5)
        check("warm small files vs best peer", "small", "warm", "vs_best_peer", 2.0)
        check("DataLoader epoch 2 (after a cold epoch 1) vs best peer", "loader-e2", "cold", "vs_best_peer", 2.0)
        check("DataLoader epoch 2 (remounted, warm) vs best peer", "loader-e2", "warm", "vs_best_peer", 2.0)
        check("warm random 4 KiB IOPS vs best peer", "rand4k", "warm", "vs_best_peer", 2.0)
        check("re-read with the kernel cache vs a native local read", "reread", "kept", "vs_native", 0.7)
        for phase in ("cold", "warm"):
            r = self.by.get(("open64", phase, self.dorafs))
            rss = None if r is None or r.error else (r.rss_mib or {}).get("mount")
            add(f"mount RSS with 64 files open and read ({phase}), MiB", None if rss is None else round(rss),
                "< 512", None if rss is None else rss < 512)
        return out

    def targets_table(self) -> Table:
        t = Table(title="targets of issue 3 (ratios: > 1 = dorafs better)", title_justify="left")
        t.add_column("target")
        t.add_column("measured", justify="right")
        t.add_column("goal", justify="right")
        t.add_column("met")
        for x in self.targets():
            m = x["measured"]
            t.add_row(x["target"], "—" if m is None else (f"{m}" if isinstance(m, int) else f"{m:.2f}"),
                      f"≥ {x['goal']}" if not isinstance(x["goal"], str) else x["goal"],
                      {True: "[green]yes[/green]", False: "[red]no[/red]", None: "—"}[x["met"]])
        return t

    # -- files ------------------------------------------------------------------------

    def save_json(self, path: Path, meta: dict, passes: list[list[Result]] | None = None) -> None:
        """The report as JSON; with `passes`, every round's own results too (each pass's
        value, wall time, S3 requests and the S3 server's CPU), beside the medians."""
        data = {
            "meta": meta,
            "scenarios": self.titles,
            "results": [asdict(r) for r in self.results],
            "native": self.natives,
            "ratios": [{"row": row, "phase": phase, **self.ratios(row, phase)} for row, phase in self.order],
            "targets": self.targets(),
        }
        if passes is not None:
            data["passes"] = [[asdict(r) for r in results] for results in passes]
        path.write_text(json.dumps(data, indent=1, default=str))

    def save_png(self, path: Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, groups = [], []
        for row, phase in self.order:
            peer, peer_v = self.best_peer(row, phase)
            if peer_v is None and row not in self.natives:
                continue
            ref = self.natives.get(row) if row in self.natives else peer_v
            any_r = next((self.by[k] for k in self.by if k[0] == row and k[1] == phase), None)
            if any_r is None or ref is None:
                continue
            labels.append(f"{row}\n{phase}")
            groups.append([better(self.value(row, phase, s), ref, any_r.higher_better) for s in self.systems])
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(labels) + 3), 9),
                                      gridspec_kw={"height_ratios": [3, 1.3]})
        width = 0.8 / max(1, len(self.systems))
        colors = {"dorafs": "#d62728", "dorafs-w": "#ff7f0e", "dorafs-base": "#e377c2", "s3fs": "#1f77b4", "rclone": "#2ca02c",
                  "ceiling": "#7f7f7f"}
        for i, s in enumerate(self.systems):
            xs = [j + (i - (len(self.systems) - 1) / 2) * width for j in range(len(labels))]
            ys = [g[i] if g[i] is not None else 0 for g in groups]
            ax.bar(xs, ys, width, label=s, color=colors.get(s))
        ax.set_yscale("log")
        ax.axhline(1, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("× best peer (reread: × native)\nhigher is better, log scale")
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=len(self.systems))
        ax.grid(axis="y", which="both", alpha=0.3)
        # peak RSS of the dorafs mount per scenario
        rss_labels, rss_vals = [], []
        for row, phase in self.order:
            r = self.by.get((row, phase, self.dorafs))
            if r is not None and r.rss_mib.get("mount") is not None:
                rss_labels.append(f"{row}\n{phase}")
                rss_vals.append(r.rss_mib["mount"])
        ax2.bar(range(len(rss_vals)), rss_vals, color=colors.get(self.dorafs, "#d62728"))
        ax2.axhline(512, color="black", lw=0.8, ls="--")
        ax2.set_xticks(range(len(rss_labels)))
        ax2.set_xticklabels(rss_labels, fontsize=7)
        ax2.set_ylabel(f"{self.dorafs} mount\npeak RSS, MiB")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def merge_rounds(rounds: list[list[Result]], peers: list[str], dorafs: str) -> list[Result]:
    """One result per (row, phase, system) from several rounds of the same runs: the
    median of the rounds that gave a value (an error only when none did), with every
    round's value in `detail["rounds"]`; dorafs's result (and a baseline's) also gets, per round, its ratio
    to the best peer *of that round* (`detail["round_ratios"]`): a pass and the peers'
    passes minutes apart on a shared machine differ by more than the systems do, so the
    ratios of passes run side by side are what to compare."""
    by: dict[tuple, list[Result]] = {}
    for results in rounds:
        for r in results:
            by.setdefault((r.row, r.phase, r.system), []).append(r)
    merged = []
    for (row, phase, system), runs in by.items():
        good = [r for r in runs if not r.error and r.value is not None]
        if not good:
            merged.append(runs[-1])
            continue
        first = good[0]
        detail = dict(first.detail, rounds=[None if r.error else r.value for r in runs])
        if system.startswith("dorafs"):  # dorafs, and a baseline checkout beside it
            ratios = []
            for results in rounds:
                mine = next((r for r in results if (r.row, r.phase, r.system) == (row, phase, system)), None)
                theirs = [r.value for r in results if (r.row, r.phase) == (row, phase) and r.system in peers
                          and not r.error and r.value is not None]
                if mine is None or mine.error or mine.value is None or not theirs:
                    ratios.append(None)
                    continue
                peer = max(theirs) if first.higher_better else min(theirs)
                ratio = better(mine.value, peer, first.higher_better)
                ratios.append(None if ratio is None else round(ratio, 3))
            detail["round_ratios"] = ratios
        rss = {role: max((r.rss_mib or {}).get(role) or 0.0 for r in good) for role in first.rss_mib}
        requests = [r.s3_requests for r in good if r.s3_requests is not None]
        merged.append(Result(row, phase, system, statistics.median(r.value for r in good), first.unit,
                             first.higher_better, detail, rss,
                             int(statistics.median(requests)) if requests else None,
                             round(statistics.median(r.wall_s for r in good), 3), None))
    return merged


def finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))
