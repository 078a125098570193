"""Differential test of writes: the same random operations on the mount and on a local
directory must give identical bytes, sizes, listings and errnos.

Hypothesis drives a `RuleBasedStateMachine` over a small namespace (so operations collide:
renames over existing files, rmdir of non-empty directories, writes to missing paths).
Between steps it also changes the bucket behind the mount's back, and applies the same
change to the local directory. The worker trusts nothing it caches (TTL 0) and the
kernel keeps no attributes or names, so every step sees the bucket as it is.
"""

from __future__ import annotations

import itertools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.cluster import ProcessSet

# A small namespace, so that operations collide; "c" may become a file or a directory.
paths = st.sampled_from(["a", "b", "c"]) | st.sampled_from(["c/a", "c/b", "a/a", "c/c/a"])
blobs = st.binary(max_size=3000) | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 70_000), st.integers(0, 255))
offsets = st.integers(0, 3000) | st.integers(0, 80_000)
where = st.floats(0, 1.3) | st.sampled_from([0.0, 1.0])  # a position relative to the file's size

CHECKERS = ThreadPoolExecutor(8, thread_name_prefix="model-check")  # the invariant's reads of the mount


@pytest.fixture(scope="module")
def model_env(s3_server, tmp_path_factory):
    bucket = "writes-model"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("model")
    with ProcessSet(tmp) as procs:
        worker = procs.worker()
        # TTLs of 0: every lookup asks the bucket, so changes made behind the mount's back
        # show at once, as they do in the local directory.
        mount = procs.mount(f"s3://{bucket}/m", workers=[worker.address],
                            options=f"staging_dir={tmp / 'staging'},status_ttl=0,listing_ttl=0,negative_ttl=0")
        yield mount, s3, bucket, tmp / "local"


def outcome(fn, *args):
    """('ok', value) or ('err', errno): what both sides must agree on."""
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", exc.errno)


def write_new(path: Path, data: bytes) -> int:
    with open(path, "wb") as f:
        return f.write(data)


def write_at(path: Path, offset: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


def read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDWR)  # a handle that could write, reading
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def kind_and_size(path: Path) -> tuple[str, int]:
    st_ = os.stat(path)
    return ("dir", 0) if os.path.isdir(path) else ("file", st_.st_size)


class WritesModel(RuleBasedStateMachine):
    env = None
    examples = itertools.count()

    @initialize()
    def fresh_directories(self):
        mount, self.s3, self.bucket, local_root = self.env
        name = f"ex{next(self.examples)}"
        os.mkdir(mount.path(name))
        self.dut = mount.path(name)
        self.ref = local_root / name
        self.ref.mkdir(parents=True)
        self.prefix = f"m/{name}/"

    def both(self, fn, rel: str, *args):
        got = outcome(fn, self.dut / rel, *args)
        want = outcome(fn, self.ref / rel, *args)
        assert got == want, f"{fn.__name__}({rel!r}, ...): mount {got!r}, local {want!r}"
        return got

    def both2(self, fn, a: str, b: str):
        got = outcome(fn, self.dut / a, self.dut / b)
        want = outcome(fn, self.ref / a, self.ref / b)
        assert got == want, f"{fn.__name__}({a!r}, {b!r}): mount {got!r}, local {want!r}"

    @rule(path=paths, data=blobs)
    def create(self, path, data):
        self.both(write_new, path, data)

    def position(self, path: str, where: float) -> int:
        """Offsets inside, at the end of and past the file, as it is in the reference."""
        target = self.ref / path
        return int(where * target.stat().st_size) if target.is_file() else 0

    @rule(path=paths, where=where, data=blobs)
    def write(self, path, where, data):
        self.both(write_at, path, self.position(path, where), data)

    @rule(path=paths, offset=offsets, data=blobs)
    def write_far(self, path, offset, data):
        self.both(write_at, path, offset, data)

    @rule(path=paths, data=blobs)
    def append(self, path, data):
        self.both(append, path, data)

    @rule(path=paths, where=where)
    def truncate(self, path, where):
        self.both(os.truncate, path, self.position(path, where))

    @rule(path=paths)
    def read(self, path):
        self.both(Path.read_bytes, path)

    @rule(path=paths, where=where, size=st.integers(0, 100_000))
    def read_rw(self, path, where, size):
        self.both(read_at, path, self.position(path, where), size)

    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self.both2(os.rename, src, dst)

    @rule(path=paths)
    def unlink(self, path):
        self.both(os.unlink, path)

    @rule(path=paths)
    def mkdir(self, path):
        self.both(os.mkdir, path)

    @rule(path=paths)
    def rmdir(self, path):
        self.both(os.rmdir, path)

    @rule(path=paths | st.just(""))
    def listdir(self, path):
        got = outcome(lambda p: sorted(os.listdir(p)), self.dut / path)
        want = outcome(lambda p: sorted(os.listdir(p)), self.ref / path)
        assert got == want, f"listdir({path!r}): mount {got!r}, local {want!r}"

    @rule(path=paths)
    def stat(self, path):
        self.both(kind_and_size, path)

    # -- the bucket changes behind the mount's back -----------------------------------

    @rule(path=paths, data=blobs)
    def put_out_of_band(self, path, data):
        """Another writer puts an object where the local model can hold a file."""
        target = self.ref / path
        if not target.parent.is_dir() or target.is_dir():
            return
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=data)
        target.write_bytes(data)

    @rule(path=paths)
    def delete_out_of_band(self, path):
        target = self.ref / path
        if not target.is_file():
            return
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + path)
        target.unlink()

    @invariant()
    def same_tree(self):
        """Every directory lists the same names and every file holds the same bytes.

        The mount's side of each check (a listing, a whole file) is made from threads, all
        at once: with TTLs of 0 each is several requests to the bucket, and one after
        another they were most of this test's time."""
        if not hasattr(self, "ref"):
            return
        checks = []
        for root, dirs, files in os.walk(self.ref):
            rel = os.path.relpath(root, self.ref)
            checks.append((rel, sorted(dirs + files), lambda d=self.dut / rel: sorted(os.listdir(d))))
            for name in files:
                checks.append((f"{rel}/{name}", (Path(root) / name).read_bytes(), (self.dut / rel / name).read_bytes))
        got = list(CHECKERS.map(lambda check: check[2](), checks))
        for (what, want, _), mounted in zip(checks, got):
            assert mounted == want, what

    def teardown(self):
        if hasattr(self, "ref"):
            shutil.rmtree(self.ref, ignore_errors=True)


@pytest.mark.timeout(1200)  # shrinking a failure replays many steps through the mount
def test_writes_match_a_local_directory(model_env):
    WritesModel.env = model_env
    run_state_machine_as_test(WritesModel, settings=settings(
        max_examples=int(os.environ.get("MODEL_EXAMPLES", 20)), stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
