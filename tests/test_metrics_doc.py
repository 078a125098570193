"""Every metric named in docs/METRICS.md is on its process's /metrics after a read."""

from __future__ import annotations

import os
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import REPO
from tests.support import free_port, wait_for


def documented() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in (REPO / "docs" / "METRICS.md").read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), set())
        elif current is not None and (m := re.match(r"\| `(dorafs_\w+)` \| (\w+) \|", line)):
            current.add(m.group(1))
    return sections


def families(address: str) -> set[str]:
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_documented_metric_is_served(procs, s3_server, bucket):
    s3_server.client().put_object(Bucket=bucket, Key="md/f.bin", Body=os.urandom(2 << 20))
    registry = procs.registry()
    worker = procs.worker(registry=registry.url)
    wait_for(lambda: registry.workers(), what="the worker to register")
    port = free_port()
    mount = procs.mount(f"s3://{bucket}/md", registry=registry.url, options=f"metrics_listen=127.0.0.1:{port}")
    assert len(mount.path("f.bin").read_bytes()) == 2 << 20
    docs = documented()
    assert set(docs) == {"worker", "registry", "mount"}
    served = {"worker": families(worker.address), "registry": families(registry.address),
              "mount": families(f"127.0.0.1:{port}")}
    for process, names in docs.items():
        assert len(names) >= 5
        missing = sorted(n for n in names if n not in served[process] and f"{n}_bucket" not in served[process])
        assert not missing, f"{process} does not serve {missing}"
    undocumented = sorted(n for n in served["worker"] if n.startswith("dorafs_worker_") and not any(
        n == d or n.startswith(d + "_") or d == n + "_total" or n == d.removesuffix("_total") + "_created"
        for d in docs["worker"]))
    assert not undocumented, f"worker metrics missing from docs/METRICS.md: {undocumented}"
