"""The repository holds source, not what the set-up installs: no vendored dependency tree,
virtual environment or cache is tracked by git."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENDORED = ("node_modules", ".venv", "venv", ".cache", "site-packages", "__pycache__")


def test_no_vendored_tree_is_tracked():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    tracked = [p for p in listed.decode().split("\0") if p]
    vendored = [p for p in tracked if set(Path(p).parts) & set(VENDORED)]
    assert not vendored, f"{len(vendored)} tracked files under {VENDORED}, e.g. {vendored[:3]}"
