"""The client core's writing and namespace policy, in process, against a real file://
UFS in a temporary directory (no mount, no worker: the client answers from the UFS).

The mounted tests (test_writes.py, test_posix.py, test_semantics.py, test_commits.py)
show the same policy through the kernel; these show it at its own API, in URIs.
"""

from __future__ import annotations

import errno

import pytest
import trio

from dorafs.client import DoraClient
from dorafs.client.namespace import Namespace
from dorafs.client.writes import Staging, Writes
from dorafs.config import MountConfig
from dorafs.errors import Exists, InvalidRequest, IsADirectory, NotADirectory, NotEmpty, NotFound
from dorafs.membership import StaticMembership
from dorafs.ufs import UfsSet
from dorafs.ufs.base import CommitConflict


class Here:
    """The mount's side of `Local`: what it writes and reads, by path."""

    def __init__(self):
        self.writing: set[str] = set()
        self.reading: set[str] = set()
        self.replaced_paths: list[str] = []

    def pending(self, path):
        return path in self.writing

    def pending_under(self, path):
        return any(p.startswith(path + "/") for p in self.writing)

    def read_here(self, path):
        return path in self.reading

    def replaced(self, path):
        self.replaced_paths.append(path)


def run(tmp_path, body):
    root = tmp_path / "ufs"
    root.mkdir()
    config = MountConfig(staging_dir=tmp_path / "staging", upload_part_size=5 << 20)

    async def main():
        ufs = UfsSet()
        client = DoraClient(config, StaticMembership([]), ufs)
        staging = Staging(config, ufs)
        uploads = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await nursery.start(staging.run)
                writes = Writes(client, staging, counted=lambda result, size: uploads.append((result, size)))
                await body(Namespace(client), writes, f"file://{root}", root, uploads)
                nursery.cancel_scope.cancel()
        finally:
            await ufs.aclose()

    trio.run(main)


def test_namespace_changes_are_checked_against_the_ufs_and_what_the_mount_writes(tmp_path):
    async def body(ns: Namespace, writes, base, root, uploads):
        here = Here()
        status = await ns.make_dir(f"{base}/d", "d", here)
        assert status.is_dir and status.name == "d" and (root / "d").is_dir()
        with pytest.raises(Exists):
            await ns.make_dir(f"{base}/d", "d", here)
        here.writing.add("new")  # created through the mount, not uploaded yet
        with pytest.raises(Exists):
            await ns.make_dir(f"{base}/new", "new", here)
        with pytest.raises(Exists):
            await ns.make_file(f"{base}/new", "new", here)
        assert not (root / "new").exists()
        await ns.make_file(f"{base}/d/f", "d/f", here)
        assert (root / "d" / "f").read_bytes() == b""
        with pytest.raises(IsADirectory):
            await ns.existing_file(f"{base}/d", "d")
        assert await ns.existing_file(f"{base}/nothing", "nothing") is None
        with pytest.raises(NotEmpty):
            await ns.remove_dir(f"{base}/d", "d", here)
        with pytest.raises(NotADirectory):
            await ns.remove_dir(f"{base}/d/f", "d/f", here)
        with pytest.raises(IsADirectory):
            await ns.unlink(f"{base}/d", "d", here)
        await ns.unlink(f"{base}/d/f", "d/f", here)
        assert not (root / "d" / "f").exists()
        with pytest.raises(NotFound):
            await ns.unlink(f"{base}/d/f", "d/f", here)
        await ns.unlink(f"{base}/new", "new", here)  # only pending here: nothing to remove, no error
        here.writing = {"d/pending"}
        with pytest.raises(NotEmpty):  # the UFS has nothing under d, the mount has
            await ns.remove_dir(f"{base}/d", "d", here)
        here.writing = set()
        await ns.remove_dir(f"{base}/d", "d", here)
        assert not (root / "d").exists()

    run(tmp_path, body)


def test_rename_keeps_the_kinds_apart_and_replaces_only_what_may_be(tmp_path):
    async def body(ns: Namespace, writes, base, root, uploads):
        here = Here()
        (root / "a" / "sub").mkdir(parents=True)
        (root / "a" / "x").write_bytes(b"x")
        (root / "full").mkdir()
        (root / "full" / "y").write_bytes(b"y")
        (root / "empty").mkdir()
        (root / "file").write_bytes(b"f")
        with pytest.raises(InvalidRequest):
            await ns.rename(f"{base}/a", "a", f"{base}/a/sub/a", "a/sub/a", here)
        with pytest.raises(NotEmpty):
            await ns.rename(f"{base}/a", "a", f"{base}/full", "full", here)
        with pytest.raises(NotADirectory):
            await ns.rename(f"{base}/a", "a", f"{base}/file", "file", here)
        with pytest.raises(IsADirectory):
            await ns.rename(f"{base}/file", "file", f"{base}/empty", "empty", here)
        with pytest.raises(Exists):
            await ns.rename(f"{base}/file", "file", f"{base}/a/x", "a/x", here, noreplace=True)
        here.writing.add("pending")
        with pytest.raises(Exists):  # a file being created here counts as there
            await ns.rename(f"{base}/file", "file", f"{base}/pending", "pending", here, noreplace=True)
        with pytest.raises(NotFound):
            await ns.rename(f"{base}/nothing", "nothing", f"{base}/z", "z", here)
        assert here.replaced_paths == []  # nothing changed by a refused rename
        renamed = await ns.rename(f"{base}/a", "a", f"{base}/empty", "empty", here)
        assert renamed.is_dir and renamed.replaced
        assert (root / "empty" / "x").read_bytes() == b"x" and (root / "empty" / "sub").is_dir()
        assert not (root / "a").exists()
        renamed = await ns.rename(f"{base}/file", "file", f"{base}/empty/x", "empty/x", here)
        assert not renamed.is_dir and renamed.replaced and here.replaced_paths == ["empty", "empty/x"]
        assert (root / "empty" / "x").read_bytes() == b"f" and not (root / "file").exists()

    run(tmp_path, body)


def test_writes_stage_the_version_they_read_and_commit_only_over_it(tmp_path):
    async def body(ns: Namespace, writes: Writes, base, root, uploads):
        uri = f"{base}/f"
        new = await writes.stage(uri, None, load=False)
        await writes.write(new, 0, b"hello")
        first = await writes.commit(new, uri)
        assert (root / "f").read_bytes() == b"hello" and uploads == [("ok", 5)]
        assert await writes.commit(new, uri) is None  # nothing changed since
        await new.close()

        # Staged from the first version: it appends where the file ends, whatever the offset.
        writer = await writes.stage(uri, first.version, load=True, path="f")
        writer.handles += 1
        await writes.write(writer, 0, b"!", append=True)
        assert writer.read(0, 10) == b"hello!"
        # Someone else changes the file meanwhile: the commit refuses to overwrite it.
        (root / "f").write_bytes(b"theirs")
        with pytest.raises(CommitConflict) as failure:
            await writes.commit(writer, uri)
        assert failure.value.errno == errno.ESTALE and uploads[-1] == ("failed", 0)
        assert (root / "f").read_bytes() == b"theirs"
        # The last handle's release does not retry a failed upload; it drops the staged bytes.
        dropped = []
        await writes.release(writer, uri, upload=True, dropped=lambda: dropped.append(True))
        assert dropped == [True] and (root / "f").read_bytes() == b"theirs" and len(uploads) == 2

        # A new file is committed only while nothing is at its name.
        late = await writes.stage(f"{base}/g", None, load=False)
        await writes.write(late, 0, b"mine")
        (root / "g").write_bytes(b"first")
        with pytest.raises(CommitConflict):
            await writes.commit(late, f"{base}/g")
        assert (root / "g").read_bytes() == b"first"
        await late.close()

        with pytest.raises(IsADirectory):
            (root / "d").mkdir()
            await writes.stage(f"{base}/d", "v", load=True, path="d")

    run(tmp_path, body)


def test_the_error_boundary_keeps_the_errno_an_oserror_carries(caplog):
    """An OSError (the staging disk, the system) reaches the application as its own errno,
    logged once; a domain error as its errno; anything else as EIO."""
    from dorafs.fuse.errors import fuse_operation
    from dorafs.fuse.types import FUSEError

    @fuse_operation
    async def failing(exc):
        raise exc

    async def answer(exc) -> int:
        with pytest.raises(FUSEError) as failure:
            await failing(exc)
        return failure.value.errno

    async def main():
        assert await answer(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
        assert await answer(PermissionError(errno.EACCES, "denied")) == errno.EACCES
        assert await answer(NotEmpty("d")) == errno.ENOTEMPTY
        assert await answer(KeyError(7)) == errno.EIO

    trio.run(main)
    assert sum("Disk quota exceeded" in r.getMessage() for r in caplog.records) == 1
