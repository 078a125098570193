"""POSIX answers a local filesystem gives and a dorafs mount gives too: unlinked open
files, over-long names and paths, directory link counts (docs/SEMANTICS.md, Names and
unlinked files). Each through a real mount of a real moto bucket."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

MiB = 1 << 20


@pytest.fixture
def mounted(procs, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="p/.keep", Body=b"")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/p", workers=[worker.address])
    return mount, s3, bucket


def test_unlinked_open_file_stays_readable_through_its_descriptors(procs, s3_server, bucket):
    s3 = s3_server.client()
    worker = procs.worker()
    # A page buffer smaller than the file and no short-circuit reads: the pages come
    # from the worker's cache again after the unlink.
    mount = procs.mount(f"s3://{bucket}/p", workers=[worker.address], options="buffer_size=2MiB,short_circuit=0")
    data = os.urandom(3 * MiB + 1234)
    s3.put_object(Bucket=bucket, Key="p/held.bin", Body=data)
    path = mount.path("held.bin")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 0) == data  # its pages are cached now
        os.unlink(path)
        assert not path.exists()
        assert "held.bin" not in os.listdir(mount.mountpoint)
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == len(data)
        # Every page again, through the mount: the kernel drops what it cached first.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for offset in range(0, len(data), 256 * 1024):
            assert os.pread(fd, 256 * 1024, offset) == data[offset:offset + 256 * 1024]
        assert os.pread(fd, len(data), 0) == data
        with open(f"/proc/self/fd/{fd}", "rb") as again:  # opened anew: the same version
            assert again.read() == data
        with pytest.raises(FileNotFoundError):  # to write it would bring it back: no
            open(f"/proc/self/fd/{fd}", "r+b")
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        os.stat(path)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="p/held.bin")


def test_unlinked_file_being_written_stays_readable_and_writable(mounted):
    mount, s3, bucket = mounted
    path = mount.path("scratch.bin")
    data = os.urandom(2 * MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.unlink(path)
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == len(data)
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"tail", len(data))
        assert os.fstat(fd).st_size == len(data) + 4
        assert os.pread(fd, 4, len(data)) == b"tail"
    finally:
        os.close(fd)
    assert not path.exists()
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="p/scratch.bin")


def test_names_over_name_max_answer_enametoolong(mounted):
    mount, _, _ = mounted
    long_name = "n" * 256
    for call in (os.stat, os.lstat, lambda p: open(p, "rb"), os.listdir):
        with pytest.raises(OSError) as info:
            call(mount.path(long_name))
        assert info.value.errno == errno.ENAMETOOLONG, call
    with pytest.raises(OSError) as info:
        open(mount.path(long_name), "wb")
    assert info.value.errno == errno.ENAMETOOLONG
    # 255 bytes is a name like any other (S3 takes it): missing, then created.
    fine = mount.path("m" * 255)
    with pytest.raises(FileNotFoundError):
        os.stat(fine)
    fine.write_bytes(b"ok")
    assert fine.read_bytes() == b"ok"


def _walk_down(top: int, names: list[str]) -> int:
    """A descriptor of top/names[0]/names[1]/..., opened one level at a time (the whole
    path may be longer than PATH_MAX)."""
    fd = os.dup(top)
    for name in names:
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    return fd


@pytest.fixture
def short_dir():
    """A directory with a short absolute path: the UFS root of a mount whose deepest
    directories must stay within PATH_MAX on the local disk however long the test's own
    temporary directory is (pytest-xdist adds a level to it)."""
    path = Path(tempfile.mkdtemp(prefix="dorafs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_paths_over_path_max_answer_enametoolong(procs, short_dir):
    """A name whose path from the mount root is over PATH_MAX answers ENAMETOOLONG (not
    EINVAL from the worker's URI bound), reached one directory at a time as `openat` does."""
    data = short_dir / "data"
    data.mkdir()
    names = ["d" * 250] * 16  # 4,016 bytes of path, each name within NAME_MAX
    assert len(f"file://{data}/") + 16 * 251 < 4096  # every directory a URI the worker takes
    top = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = top
        for name in names:  # made on the local disk directly, one level at a time
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if fd != top:
                os.close(fd)
            fd = below
        with os.fdopen(os.open("f" * 100, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep")
        os.close(fd)
    finally:
        os.close(top)
    worker = procs.worker()
    mount = procs.mount(f"file://{data}", workers=[worker.address])
    root = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    deep = _walk_down(root, names)
    try:
        with pytest.raises(OSError) as info:  # the path from the mount root: 4,117 bytes
            os.stat("f" * 100, dir_fd=deep)
        assert info.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as info:
            os.mkdir("g" * 100, dir_fd=deep)
        assert info.value.errno == errno.ENAMETOOLONG
    finally:
        os.close(deep)
        os.close(root)


def test_names_over_s3_key_length_answer_enametoolong(mounted):
    """S3 keys stop at 1,024 bytes: a longer one is a name no object has or can have."""
    mount, _, _ = mounted
    name = "k" * 255
    os.makedirs(mount.path(name, name, name))  # a key of 769 bytes with the prefix: fine
    with pytest.raises(OSError) as info:
        os.stat(mount.path(name, name, name, name))  # 1,025 bytes
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        os.mkdir(mount.path(name, name, name, name))
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        open(mount.path(name, name, name, name), "wb")
    assert info.value.errno == errno.ENAMETOOLONG


def test_directory_nlink_counts_its_subdirectories(mounted):
    mount, s3, bucket = mounted
    for key in ("p/top/a/", "p/top/b/x.bin", "p/top/c/", "p/top/file.bin"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    top = mount.path("top")
    assert os.stat(top).st_nlink == 2  # its listing is not known yet
    assert sorted(os.listdir(top)) == ["a", "b", "c", "file.bin"]
    assert os.stat(top).st_nlink == 5  # 2 + a, b, c
    os.mkdir(top / "d")
    assert os.stat(top).st_nlink == 6
    os.rmdir(top / "a")
    assert os.stat(top).st_nlink == 5
    os.rename(top / "c", mount.path("moved"))
    assert os.stat(top).st_nlink == 4
    assert sorted(os.listdir(top)) == ["b", "d", "file.bin"]
    assert os.stat(top).st_nlink == 4
