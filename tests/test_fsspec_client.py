"""The fsspec client (dorafs/fsspec_client.py): `dorafs://` read through a registry
cluster of real workers on loopback against the real S3 server, in this test process,
which mounts nothing. Bytes are checked against what was put in the bucket."""

from __future__ import annotations

import errno
import io
import os
import random
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import httpx
import pytest

from dorafs.fsspec_client import DoraFileSystem
from dorafs.membership import WorkerInfo
from dorafs.routing import build_routing
from tests.cluster import ProcessSet
from tests.support import wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A registry and three workers (1 MiB pages), shared by the read-only tests here."""
    with ProcessSet(tmp_path_factory.mktemp("fsspec-cluster")) as procs:
        registry = procs.registry()
        workers = [procs.worker(registry=registry.url) for _ in range(3)]
        wait_for(lambda: len(registry.workers()) == 3, what="three workers registered")
        yield registry, workers


@pytest.fixture(scope="module")
def shared_bucket(s3_server):
    name = f"fsspec-{os.getpid()}-{secrets.token_hex(3)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def filesystem(registry, **options) -> DoraFileSystem:
    fs = fsspec.filesystem("dorafs", registry=registry.url, skip_instance_cache=True, **options)
    assert isinstance(fs, DoraFileSystem)
    return fs


def put(s3, bucket: str, key: str, data: bytes) -> bytes:
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return data


def test_lists_and_reads_exact_bytes(cluster, shared_bucket, s3_server):
    registry, _ = cluster
    s3, b = s3_server.client(), shared_bucket
    big = put(s3, b, "data/big.bin", os.urandom(3 * MiB + 12345))
    small = put(s3, b, "data/small.txt", b"hello dorafs\n")
    deep = put(s3, b, "data/sub/deep.bin", os.urandom(MiB))
    fs = filesystem(registry)
    try:
        listing = {e["name"]: e for e in fs.ls(f"dorafs://{b}/data")}
        assert set(listing) == {f"{b}/data/big.bin", f"{b}/data/small.txt", f"{b}/data/sub"}
        assert listing[f"{b}/data/big.bin"]["size"] == len(big)
        assert listing[f"{b}/data/sub"]["type"] == "directory"
        assert sorted(fs.find(f"{b}/data")) == [f"{b}/data/big.bin", f"{b}/data/small.txt", f"{b}/data/sub/deep.bin"]
        assert fs.ls(f"{b}/data/small.txt", detail=False) == [f"{b}/data/small.txt"]
        info = fs.info(f"dorafs://{b}/data/big.bin")
        assert (info["type"], info["size"]) == ("file", len(big)) and info["version"]

        assert fs.cat(f"{b}/data/big.bin") == big
        assert fs.cat(f"{b}/data/small.txt") == small
        assert fs.cat(f"{b}/data/sub/deep.bin") == deep
        for start, end in [(0, 4096), (MiB - 100, MiB + 100), (2 * MiB + 7, 3 * MiB + 12345),
                           (len(big) - 10, len(big) + 100), (-4096, None), (5, 5)]:
            assert fs.cat_file(f"{b}/data/big.bin", start, end) == big[start:end], (start, end)

        with fs.open(f"{b}/data/big.bin") as f:  # seek and read across page boundaries
            f.seek(MiB - 3)
            assert f.read(10) == big[MiB - 3:MiB + 7]
            f.seek(-5, io.SEEK_END)
            assert f.read() == big[-5:]
            f.seek(0)
            assert f.read() == big
        with fsspec.open(f"dorafs://{b}/data/small.txt", "rb", registry=registry.url) as f:
            assert f.read() == small

        with pytest.raises(FileNotFoundError):
            fs.info(f"{b}/data/missing")
        with pytest.raises(FileNotFoundError):
            fs.cat(f"{b}/nothing/here")
        with pytest.raises(IsADirectoryError):
            fs.open(f"{b}/data/sub")
        for write in (lambda: fs.open(f"{b}/data/new", "wb"), lambda: fs.rm(f"{b}/data/small.txt"),
                      lambda: fs.mkdir(f"{b}/newdir"), lambda: fs.pipe(f"{b}/data/x", b"x")):
            with pytest.raises(OSError) as caught:
                write()
            assert caught.value.errno == errno.EROFS and "read-only" in str(caught.value)
        assert s3.list_objects_v2(Bucket=b, Prefix="data/new").get("KeyCount") == 0

        stats = fs.statistics()
        assert stats["worker_pages"] >= 5 and stats["ufs_fallback_pages"] == 0, stats
        assert stats["short_circuit_pages"] > 0, stats  # the workers' page files are readable here
        assert stats["ufs_fallback_metadata"] == 0, stats
    finally:
        fs.close()

    over_http = filesystem(registry, short_circuit=False)  # the same bytes from worker bodies
    try:
        assert over_http.cat(f"{b}/data/big.bin") == big
        assert over_http.cat_file(f"{b}/data/big.bin", MiB - 1, MiB + 1) == big[MiB - 1:MiB + 1]
        stats = over_http.statistics()
        assert stats["short_circuit_pages"] == 0 and stats["worker_pages"] >= 4, stats
    finally:
        over_http.close()


def test_threads_share_one_filesystem(cluster, shared_bucket, s3_server):
    registry, _ = cluster
    data = put(s3_server.client(), shared_bucket, "threads/f.bin", os.urandom(4 * MiB))
    fs = filesystem(registry)
    rng = random.Random(7)
    ranges = [(o, o + rng.randrange(1, 300_000)) for o in (rng.randrange(len(data)) for _ in range(200))]
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: fs.cat_file(f"{shared_bucket}/threads/f.bin", *r), ranges))
        assert all(g == data[s:e] for g, (s, e) in zip(got, ranges))

        def whole(_):
            with fs.open(f"{shared_bucket}/threads/f.bin", block_size=64 * 1024) as f:
                return f.read()

        with ThreadPoolExecutor(4) as pool:
            assert all(g == data for g in pool.map(whole, range(4)))
    finally:
        fs.close()


def test_pandas_and_pyarrow_read_parquet(cluster, shared_bucket, s3_server):
    import pandas as pd
    import pyarrow.parquet as pq

    registry, _ = cluster
    frame = pd.DataFrame({"i": range(200_000), "x": [i * 0.5 for i in range(200_000)],
                          "s": [f"row-{i}" for i in range(200_000)]})
    buf = io.BytesIO()
    frame.to_parquet(buf, row_group_size=50_000)
    assert len(buf.getvalue()) > MiB  # several pages, several row groups
    put(s3_server.client(), shared_bucket, "tables/t.parquet", buf.getvalue())

    url = f"dorafs://{shared_bucket}/tables/t.parquet"
    read = pd.read_parquet(url, storage_options={"registry": registry.url})
    pd.testing.assert_frame_equal(read, frame)

    fs = filesystem(registry)
    try:
        table = pq.read_table(f"{shared_bucket}/tables/t.parquet", filesystem=fs, columns=["s"])
        assert table.column("s").to_pylist() == list(frame["s"])
        assert pq.ParquetFile(fs.open(f"{shared_bucket}/tables/t.parquet")).metadata.num_row_groups == 4
    finally:
        fs.close()


class _Shards:
    """A map-style dataset of files read through one dorafs filesystem."""

    def __init__(self, fs, paths):
        self.fs, self.paths = fs, paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return i, self.fs.cat_file(self.paths[i]), os.getpid(), self.fs.statistics()["worker_pages"]


def test_pytorch_dataloader_with_two_worker_processes(cluster, shared_bucket, s3_server):
    from torch.utils.data import DataLoader

    registry, _ = cluster
    s3 = s3_server.client()
    expected = {f"{shared_bucket}/shards/{i:03d}.bin": put(s3, shared_bucket, f"shards/{i:03d}.bin",
                                                           os.urandom(random.randrange(1000, 300_000)))
                for i in range(24)}
    fs = filesystem(registry)
    try:
        paths = sorted(fs.find(f"{shared_bucket}/shards"))  # the parent uses the client before forking
        assert paths == sorted(expected)
        loader = DataLoader(_Shards(fs, paths), batch_size=4, num_workers=2, collate_fn=list)
        seen, pids = {}, set()
        for batch in loader:
            for i, data, pid, worker_pages in batch:
                seen[paths[i]] = data
                pids.add(pid)
                assert worker_pages > 0  # that process read through the workers itself
        assert seen == expected
        assert len(pids) == 2 and os.getpid() not in pids
        assert fs.cat_file(paths[0]) == expected[paths[0]]  # the parent's own client still serves
    finally:
        fs.close()


def _owner(registry, uri: str, workers):
    routing = build_routing({w["id"]: WorkerInfo.from_dict(w) for w in registry.workers()})
    address = routing.candidates(uri)[0].address
    return next(w for w in workers if w.address == address)


def test_a_worker_killed_mid_read_fails_over(procs, bucket, s3_server):
    registry = procs.registry()
    workers = [procs.worker(registry=registry.url) for _ in range(3)]
    wait_for(lambda: len(registry.workers()) == 3, what="three workers registered")
    data = put(s3_server.client(), bucket, "k/f.bin", os.urandom(6 * MiB + 3))
    # Page by page from the workers' HTTP answers, no readahead: each page is asked for
    # when read, so the pages after the kill must come from someone else.
    fs = filesystem(registry, short_circuit=False, readahead_pages=0)
    try:
        owner = _owner(registry, f"s3://{bucket}/k/f.bin", workers)
        got = bytearray()
        with fs.open(f"{bucket}/k/f.bin", block_size=256 * 1024) as f:
            while chunk := f.read(256 * 1024):
                got += chunk
                if len(got) == 2 * MiB:
                    owner.kill()
                if len(got) == 4 * MiB:  # and then every worker: the store itself serves
                    for w in workers:
                        if w.alive():
                            w.kill()
        assert bytes(got) == data
        stats = fs.statistics()
        assert stats["failovers"] >= 1, stats
        assert len(stats["by_worker"]) >= 2, stats  # another worker served after the owner died
        assert stats["ufs_fallback_pages"] >= 1, stats  # the last pages came from the store
    finally:
        fs.close()


def test_an_overwrite_never_mixes_versions_in_one_open_file(cluster, shared_bucket, s3_server):
    registry, _ = cluster
    s3 = s3_server.client()
    old = put(s3, shared_bucket, "v/f.bin", os.urandom(4 * MiB))
    new = os.urandom(4 * MiB)
    fs = filesystem(registry, status_ttl=0, readahead_pages=0)  # every open asks the store
    try:
        with fs.open(f"{shared_bucket}/v/f.bin", block_size=MiB) as f:
            assert f.read(MiB) == old[:MiB]
            put(s3, shared_bucket, "v/f.bin", new)
            got, error = bytearray(old[:MiB]), None
            try:
                while chunk := f.read(MiB):
                    got += chunk
            except OSError as exc:
                error = exc
        assert bytes(got) == old[:len(got)], "bytes of another version in one open file"
        assert error is not None and error.errno == errno.ESTALE, \
            "the pages not yet cached were fetched from a store that no longer has the pinned version"
        assert fs.cat(f"{shared_bucket}/v/f.bin") == new  # a new open pins the new version
    finally:
        fs.close()


def test_configured_from_the_environment_and_the_config_file(cluster, shared_bucket, s3_server,
                                                           tmp_path, monkeypatch):
    registry, workers = cluster
    data = put(s3_server.client(), shared_bucket, "cfg/f.bin", os.urandom(100_000))
    monkeypatch.setenv("DORAFS_MOUNT_REGISTRY", registry.url)
    fs = fsspec.filesystem("dorafs", skip_instance_cache=True)
    try:
        assert fs.cat(f"{shared_bucket}/cfg/f.bin") == data
    finally:
        fs.close()
    monkeypatch.delenv("DORAFS_MOUNT_REGISTRY")
    config = tmp_path / "dorafs.toml"
    config.write_text(f"[mount]\nworkers = [{', '.join(repr(w.address) for w in workers)}]\n"
                      "page_size = '1MiB'\n".replace("'", '"'))
    fs = fsspec.filesystem("dorafs", config=str(config), skip_instance_cache=True)
    try:
        assert fs.cat(f"dorafs://{shared_bucket}/cfg/f.bin") == data
        assert fs.statistics()["ufs_fallback_pages"] == 0
    finally:
        fs.close()
    with pytest.raises(ValueError, match="name the workers"):
        fsspec.filesystem("dorafs", skip_instance_cache=True)
    with pytest.raises(ValueError, match="worker_timeout"):
        fsspec.filesystem("dorafs", registry=registry.url, worker_timeout="soon", skip_instance_cache=True)


def test_the_cluster_secret(procs, bucket, s3_server, tmp_path):
    secret = secrets.token_hex(32)
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    worker = procs.worker(extra=["--secret-file", str(secret_file)])
    assert httpx.get(f"http://{worker.address}/v1/info", timeout=5).status_code == 401
    data = put(s3_server.client(), bucket, "s/f.bin", os.urandom(200_000))
    fs = fsspec.filesystem("dorafs", workers=[worker.address], secret_file=str(secret_file),
                           skip_instance_cache=True)
    try:
        assert fs.cat(f"{bucket}/s/f.bin") == data
        assert fs.statistics()["worker_pages"] >= 1 and fs.statistics()["ufs_fallback_pages"] == 0
    finally:
        fs.close()


def test_a_forked_child_reads_with_its_own_loop(cluster, shared_bucket, s3_server):
    registry, _ = cluster
    data = put(s3_server.client(), shared_bucket, "fork/f.bin", os.urandom(MiB + 5))
    fs = filesystem(registry)
    try:
        assert fs.cat_file(f"{shared_bucket}/fork/f.bin", 0, 10) == data[:10]
        assert fs.ls(f"{shared_bucket}/fork", detail=False) == [f"{shared_bucket}/fork/f.bin"]
        kept_hits = fs.runtime.client.statuses.hits
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: any failure is a non-zero exit
            try:
                ok = fs.cat(f"{shared_bucket}/fork/f.bin") == data and fs.statistics()["pid"] == os.getpid()
                # its first open took the status the parent kept, asking no worker
                ok = ok and fs.runtime.client.statuses.hits > kept_hits
                os.write(write, b"ok" if ok else b"bad")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as r:
            answer = r.read()
        os.waitpid(pid, 0)
        assert answer == b"ok"
        assert fs.cat(f"{shared_bucket}/fork/f.bin") == data and fs.statistics()["pid"] == os.getpid()
        assert threading.active_count() >= 2  # the parent's loop thread is still there
    finally:
        fs.close()
