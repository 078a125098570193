"""dorafs/memory.py: with glibc's thresholds fixed, buffers of many sizes made and freed
one after another reuse memory already faulted in (each in a fresh interpreter, so the
setting stays in that process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHURN = """
import json, random, resource, sys
from dorafs.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
rng = random.Random(21)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = []
for _ in range(300):  # blocks of runs of 1-8 pages of 1 MiB, at most 16 held, as the page buffer does
    held.append(bytearray(rng.choice([1, 2, 3, 5, 8]) << 20))
    if len(held) > 16:
        held.pop(0)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _churn(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_freed_buffers_are_reused_without_faulting_memory_in_again():
    kept = _churn("keep")
    if not kept["kept"]:
        pytest.skip("not glibc: mallopt is not there")
    default = _churn("default")
    # 300 buffers of 3.8 MiB on average are about 290,000 pages; at most 16 held at once
    # are about 16,000: what is faulted in once, then reused.
    assert kept["faults"] * 2 < default["faults"], (kept, default)
    assert kept["faults"] < 40_000, kept
