"""The Grafana dashboard (docs/grafana/dorafs.json) uses only metrics that are documented
in docs/METRICS.md, under the process that serves them, and that the daemons and a
mount really serve after a read."""

from __future__ import annotations

import json
import os
import re

from tests.cluster import REPO
from tests.support import free_port, wait_for
from tests.test_metrics_doc import documented, families

DASHBOARD = REPO / "docs" / "grafana" / "dorafs.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def used_metrics() -> dict[str, set[str]]:
    """Metric names each panel's queries use, by panel title."""
    used = {}
    for panel in panels():
        names = set()
        for target in panel["targets"]:
            names.update(re.findall(r"\bdorafs_[a-z0-9_]+", target["expr"]))
        used[panel["title"]] = names
    return used


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and not name.endswith("_total"):
            return name.removesuffix(suffix)
    return name


def process_of(name: str) -> str:
    return name.split("_")[1]  # dorafs_<worker|registry|mount>_...


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    titles = " ".join(p["title"].lower() for p in panels())
    for topic in ("hit ratio", "bytes by path", "ufs latency", "evictions", "degraded", "per worker"):
        assert topic in titles, f"no panel on {topic}"


def test_every_metric_a_panel_uses_is_documented():
    docs = documented()
    for title, names in used_metrics().items():
        assert names, f"panel {title!r} uses no dorafs metric"
        for name in names:
            base = base_name(name)
            section = docs.get(process_of(base), set())
            assert base in section, f"panel {title!r} uses {name}, not in docs/METRICS.md ## {process_of(base)}"
            if name != base:  # a histogram's series: documented as a histogram
                row = next(line for line in (REPO / "docs" / "METRICS.md").read_text().splitlines()
                           if line.startswith(f"| `{base}` |"))
                assert "| histogram |" in row, f"{name}: {base} is not a histogram"


def test_every_metric_a_panel_uses_is_served(procs, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="dash/f.bin", Body=os.urandom(2 << 20))
    registry = procs.registry()
    worker = procs.worker(registry=registry.url)
    wait_for(lambda: registry.workers(), what="the worker to register")
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/dash", registry=registry.url, options=f"metrics_listen=127.0.0.1:{port}")
    assert len(mount.path("f.bin").read_bytes()) == 2 << 20
    served = {"worker": families(worker.address), "registry": families(registry.address),
              "mount": families(f"127.0.0.1:{port}")}
    missing = sorted(name for names in used_metrics().values() for name in names
                     if name not in served[process_of(name)])
    assert not missing, f"the dashboard queries metrics no process serves: {missing}"
