"""The README's first command, on a small dataset: it mounts, reads cold, warm and hot,
checks every byte, and shows the warm passes making no UFS request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.cluster import REPO


@pytest.mark.skipif(shutil.which("dorafs") is None, reason="needs the installed dorafs command (scripts/setup.sh)")
def test_demo_shows_the_cache_working(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), COLUMNS="120", PYTHONPATH=str(REPO))
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)  # the demo brings its own S3 server
    result = subprocess.run([sys.executable, "scripts/demo.py", "--shards", "2", "--shard-size", "4",
                             "--samples", "20"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "every byte identical across the three passes and with the objects as uploaded" in out
    rows = {m.group(1): int(m.group(2)) for m in
            re.finditer(r"│ (cold|warm|hot)[^│]*│[^│]*│[^│]*│\s*(\d+) │", out)}
    assert rows["cold"] >= 2 + 20  # at least one UFS read per file (a readahead run reads several pages at once)
    assert rows["warm"] == 0 and rows["hot"] == 0, out
