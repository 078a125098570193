"""FUSE passthrough of wholly cached files (dorafs/fuse/passthrough.py), on a real mount.

A file whose pinned version a worker on this machine holds whole is read by the kernel
from the worker's object file: exact bytes, and no READ request reaches the mount. Every
case that cannot be handed over is read through the mount, also exactly.
"""

from __future__ import annotations

import mmap
import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.cluster import REPO, ProcessSet, _env, is_mounted
from tests.support import free_port, wait_for
from tests.test_operations import scrape
from tests.test_scheduler import admin, cluster

MiB = 1 << 20
# What one posix_fadvise(WILLNEED) has the kernel read ahead whatever the mount's
# read_ahead_kb (set in the background after INIT, so maybe not yet): the kernel's
# default of 128 KiB.
ADVISED = 128 << 10
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="passthrough needs CAP_SYS_ADMIN")
FAST = "status_ttl=0,listing_ttl=0"


def kernel_offers_passthrough() -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int("".join(c for c in release[1] if c.isdigit()) or 0)) >= (6, 9)


pytestmark = [needs_root, pytest.mark.skipif(not kernel_offers_passthrough(), reason="kernel before 6.9")]


def opens(metrics: dict, result: str) -> float:
    return metrics.get(f"dorafs_mount_passthrough_opens_total{{result={result}}}", 0.0)


def reads(metrics: dict) -> float:
    return metrics["dorafs_mount_reads_total"]


def prepared(metrics, worker, sealed: int = 1) -> None:
    """Wait until the worker has sealed `sealed` objects and the mount verified them (a
    file read to its end is prepared in the background after its release)."""
    wait_for(lambda: worker.metrics()["dorafs_worker_whole_objects"] == sealed
             and metrics()["dorafs_mount_object_files_preparing"] == 0, what="the file prepared")


def read_whole(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def setup(procs: ProcessSet, s3_server, bucket):
    """A worker, a mount with metrics, and a put helper."""
    s3 = s3_server.client()
    worker = procs.worker()
    port = free_port()

    def mount(options: str = "passthrough=1"):
        return procs.mount(f"s3://{bucket}/p", workers=[worker.address],
                           options=",".join(o for o in (FAST, f"metrics_listen=127.0.0.1:{port}", options) if o))


    def put(name: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=f"p/{name}", Body=data)

    return worker, mount, put, lambda: scrape(f"127.0.0.1:{port}")


def test_a_cached_file_is_read_by_the_kernel_exactly_and_without_reads_reaching_the_mount(setup):
    worker, mount, put, metrics = setup
    data = os.urandom(3 * MiB + 12345)
    put("a.bin", data)
    m = mount()
    path = m.path("a.bin")
    assert read_whole(path) == data  # read to its end through the mount: now eligible
    # ... and made ready in the background: the worker seals it into one file, the mount
    # verifies it (an open meanwhile reads what the kernel kept of that read).
    prepared(metrics, worker)
    before = metrics()
    assert opens(before, "granted") == 0
    with open(path, "rb") as f:
        assert f.read() == data
        for offset, size in [(0, 1), (MiB - 3, 7), (2 * MiB + 5, 100_000), (len(data) - 10, 100), (len(data), 5)]:
            assert os.pread(f.fileno(), size, offset) == data[offset:offset + size]
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            assert view[:] == data
            assert view[MiB + 17:MiB + 4113] == data[MiB + 17:MiB + 4113]
        after = metrics()
    assert opens(after, "granted") == 1
    assert reads(after) == reads(before), "READ requests reached the mount for a passthrough file"
    assert after["dorafs_mount_passthrough_files"] == 1
    wait_for(lambda: metrics()["dorafs_mount_passthrough_files"] == 0, what="the backing file closed at release")


def test_readahead_advised_on_a_passthrough_file_fills_the_page_cache_its_next_open_reads(setup):
    """posix_fadvise(WILLNEED) on a passthrough descriptor makes the kernel read ahead into
    the FUSE file's own page cache, which no read of that descriptor uses: the mount
    answers it from the held object file, and every read of the descriptor is still the
    kernel's from the backing file, exact. The file's next open is not handed over: it
    reads the advised pages the kernel kept with no request, the rest from the held
    file, exact, and nothing is fetched again."""
    worker, mount, put, metrics = setup
    data = os.urandom(4 * MiB + 999)
    put("w.bin", data)
    m = mount()
    path = m.path("w.bin")
    assert read_whole(path) == data
    prepared(metrics, worker)
    before = metrics()
    advised = "dorafs_mount_passthrough_readahead_total"
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), MiB, ADVISED, os.POSIX_FADV_WILLNEED)
        wait_for(lambda: metrics()[advised] > before[advised], what="the advised readahead answered")
        assert os.pread(f.fileno(), 2 * MiB, MiB) == data[MiB:3 * MiB]
        assert f.read() == data
    after = metrics()
    assert opens(after, "granted") == opens(before, "granted") + 1
    assert after.get("dorafs_mount_errors_total{errno=EIO}") == before.get("dorafs_mount_errors_total{errno=EIO}")
    with open(path, "rb", buffering=0) as f:
        assert os.pread(f.fileno(), ADVISED, MiB) == data[MiB:MiB + ADVISED]
        kept = metrics()
        assert reads(kept) == reads(after), "the advised pages the kernel kept were asked for again"
        assert os.pread(f.fileno(), len(data), 2 * MiB) == data[2 * MiB:]
        assert os.pread(f.fileno(), MiB, 0) == data[:MiB]
    later = metrics()
    assert opens(later, "kernel_pages") == opens(after, "kernel_pages") + 1
    assert reads(later) > reads(kept)
    assert later["dorafs_mount_worker_pages_total"] == after["dorafs_mount_worker_pages_total"]


def test_two_handles_of_one_version_share_one_backing_file(setup):
    worker, mount, put, metrics = setup
    data = os.urandom(2 * MiB + 1)
    put("b.bin", data)
    m = mount()
    assert read_whole(m.path("b.bin")) == data
    prepared(metrics, worker)
    with open(m.path("b.bin"), "rb") as one, open(m.path("b.bin"), "rb") as two:
        assert one.read() == data and two.read() == data
        now = metrics()
        assert opens(now, "granted") == 2 and now["dorafs_mount_passthrough_files"] == 1
        one.close()
        assert os.pread(two.fileno(), 10, MiB) == data[MiB:MiB + 10]  # the last release closes it, not the first
    wait_for(lambda: metrics()["dorafs_mount_passthrough_files"] == 0, what="the backing file closed")


def test_eviction_refresh_and_an_overwrite_leave_an_open_passthrough_file_unchanged(setup, s3_server, bucket):
    worker, mount, put, metrics = setup
    old = os.urandom(2 * MiB + 99)
    put("c.bin", old)
    m = mount()
    assert read_whole(m.path("c.bin")) == old
    prepared(metrics, worker)
    with open(m.path("c.bin"), "rb") as f:
        assert opens(metrics(), "granted") == 1
        new = os.urandom(len(old))
        put("c.bin", new)  # overwritten in the bucket while open
        # Every cached page of it dropped, as `dorafs-admin free` and `refresh` do.
        r = httpx.post(f"http://{worker.address}/v1/invalidate",
                       params={"uri": f"s3://{bucket}/p/c.bin", "pages": "1"}, timeout=10)
        assert r.status_code == 200 and r.json()["pages"] > 0
        assert f.read() == old
        assert os.pread(f.fileno(), 1000, MiB) == old[MiB:MiB + 1000]
        info = httpx.get(f"http://{worker.address}/v1/info", timeout=10).json()
        # The worker counts the unlinked file the mount holds.
        assert info["held"] == len(old) and info["used"] >= len(old), info
        # The kernel fails any open of an inode it reads through passthrough that is not
        # passthrough too: an open of the new version gets the name a new inode, and the
        # open descriptor reads on from the old one, its version, as after an unlink.
        inode = os.fstat(f.fileno()).st_ino
        with open(m.path("c.bin"), "rb") as g:
            assert g.read() == new
            assert os.fstat(g.fileno()).st_ino != inode
        assert os.pread(f.fileno(), 1000, 2 * MiB) == old[2 * MiB:2 * MiB + 1000]
        assert os.fstat(f.fileno()).st_nlink == 0
        assert os.stat(m.path("c.bin")).st_ino != inode
        assert opens(metrics(), "new_inode") == 1
    assert f.closed
    prepared(metrics, worker)  # the new version, read to its end above
    granted = opens(metrics(), "granted")
    assert read_whole(m.path("c.bin")) == new  # now cached whole: passthrough again
    assert opens(metrics(), "granted") == granted + 1


def test_an_open_for_writing_beside_passthrough_opens_gets_a_new_inode(setup, s3_server, bucket):
    worker, mount, put, metrics = setup
    old = os.urandom(2 * MiB + 5)
    put("w.bin", old)
    m = mount()
    assert read_whole(m.path("w.bin")) == old
    prepared(metrics, worker)
    with open(m.path("w.bin"), "rb") as f:
        assert opens(metrics(), "granted") == 1
        with open(m.path("w.bin"), "r+b") as w:  # written through the mount meanwhile
            w.seek(MiB)
            w.write(b"written")
        assert f.read() == old  # the passthrough descriptor reads its version on
        assert opens(metrics(), "new_inode") == 1
    new = old[:MiB] + b"written" + old[MiB + 7:]
    assert read_whole(m.path("w.bin")) == new
    body = s3_server.client().get_object(Bucket=bucket, Key="p/w.bin")["Body"].read()
    assert body == new


def test_every_fallback_reads_exact_bytes_through_the_mount(setup):
    worker, mount, put, metrics = setup
    data = os.urandom(3 * MiB + 7)
    put("d.bin", data)
    small = os.urandom(100_000)  # under passthrough_min_size: always through the mount
    put("small.bin", small)
    m = mount("passthrough=1,readahead_pages=0")
    with open(m.path("d.bin"), "rb") as f:  # only its first page gets cached
        assert f.read(1000) == data[:1000]
    with open(m.path("d.bin"), "rb") as f:
        assert opens(metrics(), "not_cached") >= 1
        assert f.read() == data
    prepared(metrics, worker)
    before = reads(metrics())
    with open(m.path("d.bin"), "rb") as f:  # now whole: passthrough
        assert opens(metrics(), "granted") == 1
        assert f.read() == data
    assert reads(metrics()) == before
    assert read_whole(m.path("small.bin")) == small
    assert read_whole(m.path("small.bin")) == small
    assert opens(metrics(), "small") == 2


def test_passthrough_off_reads_through_the_mount(setup):
    worker, mount, put, metrics = setup
    data = os.urandom(MiB + 3)
    put("e.bin", data)
    m = mount("passthrough=0")
    assert read_whole(m.path("e.bin")) == data
    assert read_whole(m.path("e.bin")) == data
    with open(m.path("e.bin"), "rb") as f:
        assert f.read() == data
        now = metrics()
    assert opens(now, "off") == 3 and opens(now, "granted") == 0
    assert now["dorafs_mount_passthrough_files"] == 0


def test_dorafs_admin_load_makes_a_dataset_eligible_at_once(procs, s3_server, bucket):
    s3 = s3_server.client()
    files = {f"set/f{i}.bin": os.urandom(MiB + i * 1000) for i in range(4)}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    registry, workers = cluster(procs, n=1)
    assert admin(registry, "load", f"s3://{bucket}/set").returncode == 0
    port = free_port()
    m = procs.mount(f"s3://{bucket}", registry=registry.url, options=f"ro,metrics_listen=127.0.0.1:{port}")
    before = scrape(f"127.0.0.1:{port}")
    for key, body in files.items():
        assert read_whole(m.path(key)) == body
    after = scrape(f"127.0.0.1:{port}")
    assert opens(after, "granted") == len(files)
    assert reads(after) == reads(before)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_an_unprivileged_mount_reads_through_the_mount_without_passthrough(s3_server, bucket):
    """`dorafs mount` as a user (fusermount3 mounts it): passthrough is not asked for (the
    kernel would refuse its backing files), every open is read through the mount."""
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not open to every user")
    data = os.urandom(2 * MiB + 5)
    s3_server.client().put_object(Bucket=bucket, Key="u/f.bin", Body=data)
    user = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="dorafs-unpriv-"))
    os.chmod(base, 0o755)
    for sub in ("mnt", "home"):
        (base / sub).mkdir()
        os.chown(base / sub, user.pw_uid, user.pw_gid)
    mnt = base / "mnt"
    # The system's interpreter of this Python version, with this environment's packages: the
    # environment's own may sit under a directory the user cannot enter (~root/.pyenv).
    python = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    if not os.path.exists(python):
        pytest.skip(f"needs {python}")
    path = os.pathsep.join([str(REPO), *site.getsitepackages()])
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    port = free_port()
    log = open(base / "mount.log", "wb")
    proc = subprocess.Popen(
        as_user + [python, "-m", "dorafs.cli.main", "mount", f"s3://{bucket}/u", str(mnt), "--foreground",
                   "-o", f"ro,passthrough=1,metrics_listen=127.0.0.1:{port}"],
        cwd=REPO, env=_env() | {"HOME": str(base / "home"), "XDG_CACHE_HOME": str(base / "home"), "PYTHONPATH": path},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, timeout=30, what="the user's mount")
        assert is_mounted(mnt), (base / "mount.log").read_text()[-2000:]
        line = next(line for line in Path("/proc/self/mounts").read_text().splitlines() if f" {mnt} " in line)
        assert f"user_id={user.pw_uid}" in line
        for _ in range(3):  # the second and third find it wholly cached
            out = subprocess.run(as_user + ["cat", str(mnt / "f.bin")], capture_output=True, timeout=60)
            assert out.stdout == data, out.stderr
        now = scrape(f"127.0.0.1:{port}")
        assert opens(now, "not_granted") == 3 and opens(now, "granted") == 0
        assert reads(now) > 0
    finally:
        if is_mounted(mnt):
            subprocess.run(as_user + ["fusermount3", "-u", str(mnt)], capture_output=True, timeout=20)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            if is_mounted(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        log.close()
        text = (base / "mount.log").read_text()
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0, text[-2000:]
    assert "Traceback" not in text and "passthrough" in text, text[-2000:]


def test_passthrough_is_on_by_default_on_a_writable_mount(setup):
    worker, mount, put, metrics = setup
    data = os.urandom(MiB + 17)
    put("default.bin", data)
    m = mount("")  # no passthrough option, not read-only
    assert read_whole(m.path("default.bin")) == data
    prepared(metrics, worker)
    before = reads(metrics())
    assert read_whole(m.path("default.bin")) == data
    now = metrics()
    assert opens(now, "granted") == 1 and reads(now) == before


def test_a_cold_open_reads_past_the_kernels_page_cache_and_maps_through_it(setup):
    """A cold open of a file later opens get by passthrough is direct_io: a piece read
    twice reaches the mount twice (the kernel keeps none of it: its bytes are cached once,
    in the worker's file). Mapped shared, it reads through the kernel's page cache, and
    while that mapping lives an open of the sealed version is not handed over (the kernel
    would fail it): it reads the held file through the mount, exactly."""
    worker, mount, put, metrics = setup
    data = os.urandom(2 * MiB + 333)
    put("cold.bin", data)
    m = mount("")
    path = m.path("cold.bin")
    with open(path, "rb") as f:
        before = reads(metrics())
        assert os.pread(f.fileno(), 4096, MiB) == data[MiB:MiB + 4096]
        assert os.pread(f.fileno(), 4096, MiB) == data[MiB:MiB + 4096]
        assert reads(metrics()) == before + 2, "the kernel kept the pages of a cold open"
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:  # MAP_SHARED: DIRECT_IO_ALLOW_MMAP
            assert view[:] == data
            with open(path, "rb") as g:  # asks the worker for the whole file: it is sealed meanwhile
                assert g.read() == data
            prepared(metrics, worker)
            granted = opens(metrics(), "granted")
            with open(path, "rb") as h:  # held, not passed through beside the mapping
                assert h.read() == data
                assert os.pread(h.fileno(), 100, 2 * MiB) == data[2 * MiB:2 * MiB + 100]
            assert opens(metrics(), "granted") == granted
            assert opens(metrics(), "cached_open") >= 1
            assert view[MiB - 5:MiB + 5] == data[MiB - 5:MiB + 5]
    wait_for(lambda: metrics()["dorafs_mount_passthrough_files"] == 0, what="every handle released")
    before = reads(metrics())
    assert read_whole(path) == data  # mapping and handles gone: passthrough again
    assert opens(metrics(), "granted") == granted + 1 and reads(metrics()) == before


def test_a_process_reading_in_small_pieces_gets_the_page_cache_for_its_next_opens(setup):
    """Without the page cache every read is a request to the mount: a process seen reading
    a cold file in small sequential pieces gets the kernel's page cache (and readahead) in
    its next cold opens, and every byte it reads is exact either way."""
    worker, mount, put, metrics = setup
    first, second = os.urandom(2 * MiB + 1), os.urandom(2 * MiB + 2)
    put("one.bin", first)
    put("two.bin", second)
    m = mount("")
    with open(m.path("one.bin"), "rb", buffering=0) as f:
        got = b"".join(f.read(16384) for _ in range(32))  # direct: each read a request
        assert got == first[:len(got)]
    _read_twice_then_whole(m.path("two.bin"), second, MiB, metrics)


def _read_twice_then_whole(path, data: bytes, offset: int, metrics) -> None:
    """Open `path`, read the 4 KiB at `offset` twice: the mount sees one read, the second
    comes from the kernel's page cache; then the whole file, exact."""
    with open(path, "rb", buffering=0) as f:
        before = reads(metrics())
        assert os.pread(f.fileno(), 4096, offset) == data[offset:offset + 4096]
        assert os.pread(f.fileno(), 4096, offset) == data[offset:offset + 4096]
        assert reads(metrics()) == before + 1, "the second piece did not come from the kernel's page cache"
        assert f.read() == data


def test_a_file_read_in_small_pieces_gets_the_page_cache_in_every_next_open(setup):
    """Another process (a tool run once per file) read a cold file in small sequential
    pieces: the file's next cold open, by this process, uses the kernel's page cache."""
    worker, mount, put, metrics = setup
    data = os.urandom(3 * MiB + 3)
    put("pieces.bin", data)
    m = mount("readahead_pages=0")  # the child's reads leave the file's last pages uncached
    child = ("import sys\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    sys.stdout.buffer.write(b''.join(f.read(8192) for _ in range(64)))\n")
    out = subprocess.run([sys.executable, "-c", child, m.path("pieces.bin")], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == data[:8192 * 64], out.stderr[-2000:]
    _read_twice_then_whole(m.path("pieces.bin"), data, 2 * MiB, metrics)  # not whole yet: a cold open


def test_a_reader_of_a_files_end_first_gets_the_page_cache_for_its_next_opens_and_the_files(setup):
    """A reader of a format whose index is at the end (Parquet, ORC, zip) reads the
    file's end first and then pieces of it, coming back to some: the next cold opens of
    its process, and of that file by anyone, use the kernel's page cache, where a piece
    read twice reaches the mount once. The open that read the footer stays direct, and
    so does an open whose first read is away from the end; every byte is exact."""
    worker, mount, put, metrics = setup
    table, other, shared = os.urandom(3 * MiB + 5), os.urandom(2 * MiB + 7), os.urandom(3 * MiB + 9)
    fresh = os.urandom(2 * MiB + 11)
    for name, data in (("table", table), ("other", other), ("shared", shared), ("fresh", fresh)):
        put(f"{name}.parquet", data)
    m = mount("")
    child = ("import os, sys\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    size = os.fstat(f.fileno()).st_size\n"
             "    sys.stdout.buffer.write(os.pread(f.fileno(), 65536, size - 65536))\n")
    out = subprocess.run([sys.executable, "-c", child, m.path("shared.parquet")], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == shared[-65536:], out.stderr[-2000:]
    _read_twice_then_whole(m.path("shared.parquet"), shared, MiB, metrics)  # the file's next cold open

    with open(m.path("table.parquet"), "rb", buffering=0) as f:
        before = reads(metrics())
        assert os.pread(f.fileno(), 4096, MiB) == table[MiB:MiB + 4096]  # not at the end: no footer
        assert os.pread(f.fileno(), 65536, len(table) - 65536) == table[-65536:]
        assert os.pread(f.fileno(), 4096, MiB) == table[MiB:MiB + 4096]
        assert reads(metrics()) == before + 3, "a cold open whose first read is not its end kept the page cache"
    with open(m.path("other.parquet"), "rb", buffering=0) as f:
        before = reads(metrics())
        assert os.pread(f.fileno(), 65536, len(other) - 65536) == other[-65536:]  # footer first
        assert os.pread(f.fileno(), 4096, MiB) == other[MiB:MiB + 4096]
        assert os.pread(f.fileno(), 4096, MiB) == other[MiB:MiB + 4096]
        assert reads(metrics()) == before + 3, "the open that read its footer first kept the page cache"
    _read_twice_then_whole(m.path("fresh.parquet"), fresh, MiB, metrics)  # this process's next cold open


def test_a_file_its_readers_read_through_the_page_cache_keeps_those_pages_at_its_next_opens(setup):
    """A process reads a file footer first (Parquet), then another file: both files are
    read through the kernel's page cache (the first by anyone after that footer, the
    other by that process). Once their worker holds them whole, their next opens of
    that version (a second epoch) are not handed over: they read the pages the kernel
    kept, no request reaching the mount, and what the kernel dropped comes from the held
    object file; every byte exact. A file read plainly is handed over as before."""
    worker, mount, put, metrics = setup
    table, other, plain = os.urandom(3 * MiB + 5), os.urandom(2 * MiB + 3), os.urandom(2 * MiB + 7)
    put("table.parquet", table)
    put("other.parquet", other)
    put("plain.bin", plain)
    m = mount("")
    child = ("import os, sys\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    size = os.fstat(f.fileno()).st_size\n"
             "    sys.stdout.buffer.write(os.pread(f.fileno(), 65536, size - 65536))\n"
             "with open(sys.argv[2], 'rb', buffering=0) as f:\n"
             "    sys.stdout.buffer.write(f.read())\n")
    out = subprocess.run([sys.executable, "-c", child, m.path("table.parquet"), m.path("other.parquet")],
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == table[-65536:] + other, out.stderr[-2000:]
    assert read_whole(m.path("table.parquet")) == table  # through the page cache, to its end
    assert read_whole(m.path("plain.bin")) == plain
    prepared(metrics, worker, sealed=3)
    before = metrics()
    for _ in range(2):
        for name, data in (("table.parquet", table), ("other.parquet", other)):
            with open(m.path(name), "rb", buffering=0) as f:
                assert f.read() == data
    after = metrics()
    assert opens(after, "kernel_pages") == opens(before, "kernel_pages") + 4
    assert opens(after, "granted") == opens(before, "granted")
    assert reads(after) == reads(before), "the next opens did not read the pages the kernel kept"
    with open(m.path("table.parquet"), "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), MiB, MiB, os.POSIX_FADV_DONTNEED)  # the kernel lets a page go
        assert os.pread(f.fileno(), MiB, MiB) == table[MiB:2 * MiB]
    held = metrics()
    assert held["dorafs_mount_object_file_reads_total"] > after["dorafs_mount_object_file_reads_total"]
    assert held["dorafs_mount_worker_pages_total"] == after["dorafs_mount_worker_pages_total"]
    assert read_whole(m.path("plain.bin")) == plain
    assert opens(metrics(), "granted") == opens(held, "granted") + 1


def test_a_footer_first_readers_first_open_leaves_the_pages_it_advised_for_the_next_opens(setup):
    """A process's first open of a file is direct (nothing known of it yet); it reads the
    footer first, then advises the kernel of a chunk before reading it (as pyarrow does),
    then the rest. The readahead it advised fills the kernel's pages of the file, of that
    one version: once the worker holds the file whole, the next open keeps them and reads
    that chunk with no request; every byte exact."""
    worker, mount, put, metrics = setup
    data = os.urandom(4 * MiB + 77)
    put("solo.parquet", data)
    m = mount("")
    child = ("import os, sys\n"
             "MiB = 1 << 20\n"
             "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    size = os.fstat(f.fileno()).st_size\n"
             "    out = [os.pread(f.fileno(), 65536, size - 65536)]\n"
             f"    os.posix_fadvise(f.fileno(), MiB, {ADVISED}, os.POSIX_FADV_WILLNEED)\n"
             f"    out.append(os.pread(f.fileno(), {ADVISED}, MiB))\n"
             "    out.append(os.pread(f.fileno(), size, 0))\n"
             "sys.stdout.buffer.write(b''.join(out))\n")
    out = subprocess.run([sys.executable, "-c", child, m.path("solo.parquet")], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == data[-65536:] + data[MiB:MiB + ADVISED] + data, out.stderr[-2000:]
    prepared(metrics, worker)
    before = metrics()
    with open(m.path("solo.parquet"), "rb", buffering=0) as f:
        assert os.pread(f.fileno(), ADVISED, MiB) == data[MiB:MiB + ADVISED]
        kept = metrics()
        assert f.read() == data
    assert opens(kept, "kernel_pages") == opens(before, "kernel_pages") + 1
    assert reads(kept) == reads(before), "the chunk the first open advised was asked for again"


def test_direct_io_0_keeps_the_kernels_page_cache_in_a_cold_open(setup):
    """`-o direct_io=0`: a cold open of a file later opens get by passthrough still reads
    through the kernel's page cache, so a piece read twice reaches the mount once."""
    worker, mount, put, metrics = setup
    data = os.urandom(2 * MiB + 77)
    put("kept.bin", data)
    m = mount("direct_io=0")
    _read_twice_then_whole(m.path("kept.bin"), data, MiB, metrics)
