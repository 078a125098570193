"""dorafs's FUSE session: INIT negotiation, requests, interrupts, forgets, the end.

In-process tests play the kernel on the other end of a socket pair (SOCK_SEQPACKET keeps
each request and reply one message, as /dev/fuse does). Mounted tests use the toy file
system of tests/fusetoy.py (mount(2) as root, fusermount3 as `nobody`) and a real dorafs
mount.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio

from dorafs.fuse import protocol as p
from dorafs.fuse.mounting import is_mounted
from dorafs.fuse.session import BUSY_SECONDS, WANTED, Session, negotiate
from tests.cluster import REPO
from tests.fusetoy import FILES, ToyOperations
from tests.support import free_port, wait_for

# INIT as this machine's kernel (6.18, protocol 7.45) sent it to a mount, byte for byte.
RECORDED_INIT_7_45 = bytes.fromhex(
    "680000001a0000000200000000000000000000000000000000000000000000000000000000000000"
    "070000002d00000000000200fbffff73fd0500000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000")
_FLAGS_7_45 = 0x73FFFFFB | 0x5FD << 32
# Older kernels, as they would send it: what each offered is the 7.45 set cut to the
# flags that existed then, and the request as long as fuse_init_in was.
OLDER = {
    "7.31 (Linux 5.4)": (31, _FLAGS_7_45 & ((1 << 26) - 1), p.INIT_IN_COMPAT_SIZE),
    "7.27 (no max_pages)": (27, _FLAGS_7_45 & ((1 << 22) - 1), p.INIT_IN_COMPAT_SIZE),
    "7.22 (no readdirplus choice, short reply)": (22, _FLAGS_7_45 & ((1 << 15) - 1), p.INIT_IN_COMPAT_SIZE),
    "7.36 (flags2, no passthrough)": (36, _FLAGS_7_45 & ((1 << 34) - 1), p.INIT_IN.size),
    "7.45 offering async reads alone": (45, p.ASYNC_READ, p.INIT_IN.size),
}


def request(opcode: int, unique: int, nodeid: int = 0, body: bytes = b"") -> bytes:
    size = p.IN_HEADER.size + len(body)
    return p.IN_HEADER.struct.pack(size, opcode, unique, nodeid, 0, 0, 1234, 0) + body


def init_request(minor: int, flags: int, size: int) -> bytes:
    body = p.INIT_IN.struct.pack(7, minor, 128 << 10, flags & 0xFFFFFFFF, flags >> 32)[:size]
    return request(p.INIT, 1, 0, body)


def reply_of(message: bytes) -> tuple[int, int, bytes]:
    size, error, unique = p.OUT_HEADER.struct.unpack_from(message)
    assert size == len(message)
    return unique, -error, message[p.OUT_HEADER.size:]


# -- INIT ---------------------------------------------------------------------------------

def _check_init_reply(payload: bytes, offered: int, minor: int) -> int:
    expected = p.INIT_OUT.size if minor >= 23 else p.INIT_OUT_COMPAT_22_SIZE
    assert len(payload) == expected
    major, ours, _, lo = p.INIT_OUT.struct.unpack_from(payload.ljust(p.INIT_OUT.size, b"\0"))[:4]
    hi = p.INIT_OUT.struct.unpack_from(payload.ljust(p.INIT_OUT.size, b"\0"))[10]
    asked = lo | hi << 32
    assert (major, ours) == (7, p.KERNEL_MINOR_VERSION)
    assert asked & ~offered == 0, f"asked for what was not offered: {p.flag_names(asked & ~offered)}"
    assert asked & (p.WRITEBACK_CACHE | p.READDIRPLUS_AUTO | p.PASSTHROUGH) == 0
    assert asked == WANTED & offered
    return asked


def test_init_answer_to_this_kernel_asks_for_large_reads_and_records_the_offer():
    body = RECORDED_INIT_7_45[p.IN_HEADER.size:]
    payload, settled = negotiate(body)
    asked = _check_init_reply(payload, _FLAGS_7_45, 45)
    assert asked & p.DO_READDIRPLUS and asked & p.ASYNC_READ and asked & p.PARALLEL_DIROPS
    fields = dict(zip(p.INIT_OUT.names(), p.INIT_OUT.struct.unpack(payload)))
    assert fields["max_pages"] == 256 and fields["max_write"] == 1 << 20  # a read is a whole 1 MiB page
    assert fields["max_stack_depth"] == 0  # no passthrough asked for yet
    assert settled.minor == 45 and settled.kernel_flags == _FLAGS_7_45
    assert settled.kernel_flags & p.PASSTHROUGH and not settled.granted(p.PASSTHROUGH)
    assert settled.max_write == 1 << 20 and settled.max_pages == 256


@pytest.mark.parametrize("kernel", sorted(OLDER), ids=str)
def test_init_answer_to_kernels_that_offer_less(kernel):
    minor, offered, size = OLDER[kernel]
    message = init_request(minor, offered, size)

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            session = Session(ToyOperations(), ours.fileno(), workers=2)
            theirs.send(message)
            async with trio.open_nursery() as nursery:
                settled = await nursery.start(session.serve)
                unique, error, payload = reply_of(theirs.recv(1 << 16))
                session.terminate()
            return settled, unique, error, payload

    settled, unique, error, payload = trio.run(main)
    assert (unique, error) == (1, 0)
    asked = _check_init_reply(payload, offered, minor)
    assert settled.minor == minor and settled.flags == asked
    if offered & p.MAX_PAGES:
        assert settled.max_pages == 256 and settled.max_write == 1 << 20
    else:  # the kernel keeps its default of 32 pages a request
        assert settled.max_write == 128 << 10
        if minor >= 23:
            assert p.INIT_OUT.struct.unpack(payload)[8] == 0  # max_pages left out
    assert bool(asked & p.DO_READDIRPLUS) == bool(offered & p.DO_READDIRPLUS)


def test_a_newer_major_version_is_answered_with_ours_and_init_asked_again():
    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            session = Session(ToyOperations(), ours.fileno(), workers=2)
            theirs.send(request(p.INIT, 1, 0, p.INIT_IN.struct.pack(8, 0, 0, 0, 0)))
            theirs.send(RECORDED_INIT_7_45)
            async with trio.open_nursery() as nursery:
                settled = await nursery.start(session.serve)
                first, second = reply_of(theirs.recv(1 << 16)), reply_of(theirs.recv(1 << 16))
                session.terminate()
            return settled, first, second

    settled, first, second = trio.run(main)
    assert first[1] == 0 and first[2] == p.INIT_OUT.struct.pack(7, 45, *[0] * 11)[:8]
    assert second[0] == 2 and settled.minor == 45


# -- requests -------------------------------------------------------------------------

class Failing(ToyOperations):
    async def statfs(self, ctx):
        raise RuntimeError("a bug in an operation")


def test_requests_forgets_interrupts_and_errors_over_a_socketpair(caplog):
    ops = Failing()
    hello, slow = ops.inodes[b"hello"], ops.inodes[b"slow"]

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kernel = trio.socket.from_stdlib_socket(theirs)
        replies: dict[int, tuple[int, bytes]] = {}

        async def answer(unique):
            while unique not in replies:
                u, error, payload = reply_of(await kernel.recv(1 << 21))
                replies[u] = (error, payload)
            return replies.pop(unique)

        with ours, theirs:
            session = Session(ops, ours.fileno(), workers=4)
            await kernel.send(RECORDED_INIT_7_45)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                await answer(2)
                await kernel.send(request(p.LOOKUP, 10, p.ROOT_ID, b"hello\0"))
                error, entry = await answer(10)
                fields = dict(zip(p.ENTRY_OUT.names(), p.ENTRY_OUT.struct.unpack(entry)))
                assert error == 0 and fields["nodeid"] == hello and fields["attr.size"] == len(FILES[b"hello"])
                assert fields["entry_valid"] == 60
                await kernel.send(request(p.LOOKUP, 11, p.ROOT_ID, b"nothing\0"))
                assert (await answer(11))[0] == errno.ENOENT
                await kernel.send(request(p.OPEN, 12, hello, p.OPEN_IN.struct.pack(os.O_RDONLY, 0)))
                error, opened = await answer(12)
                fh = p.OPEN_OUT.struct.unpack(opened)[0]
                await kernel.send(request(p.READ, 13, hello, p.READ_IN.struct.pack(fh, 6, 100, 0, 0, 0)))
                assert await answer(13) == (0, b"world\n")
                await kernel.send(request(99, 14, hello))  # an opcode nobody knows
                assert await answer(14) == (errno.ENOSYS, b"")
                await kernel.send(request(p.STATFS, 15, p.ROOT_ID))  # an operation's bug: EIO
                assert await answer(15) == (errno.EIO, b"")
                await kernel.send(request(p.LOOKUP, 101, p.ROOT_ID, b"hello\0"))
                assert (await answer(101))[0] == 0 and ops.lookups == {hello: 2}
                # FORGETs have no answer: the next answer is the next request's.
                await kernel.send(request(p.FORGET, 16, hello, p.FORGET_IN.struct.pack(1)))
                batch = p.BATCH_FORGET_IN.struct.pack(1) + p.FORGET_ONE.struct.pack(hello, 1)
                await kernel.send(request(p.BATCH_FORGET, 17, 0, batch))
                await kernel.send(request(p.GETATTR, 18, hello, p.GETATTR_IN.struct.pack(0, 0)))
                u, error, _ = reply_of(await kernel.recv(1 << 16))
                assert (u, error) == (18, 0)
                assert ops.lookups == {}  # both lookups of hello were forgotten
                # A read that waits until interrupted: INTERRUPT cancels its work, EINTR.
                await kernel.send(request(p.OPEN, 19, slow, p.OPEN_IN.struct.pack(os.O_RDONLY, 0)))
                fh = p.OPEN_OUT.struct.unpack((await answer(19))[1])[0]
                await kernel.send(request(p.READ, 20, slow, p.READ_IN.struct.pack(fh, 0, 4096, 0, 0, 0)))
                await wait_until(lambda: ops.reads == 2)
                assert session.statistics()["in_flight"] == 1
                await kernel.send(request(p.INTERRUPT, 21, 0, p.INTERRUPT_IN.struct.pack(20)))
                assert await answer(20) == (errno.EINTR, b"")
                assert ops.cancelled_reads == 1 and session.statistics()["in_flight"] == 0
                await kernel.send(request(p.INTERRUPT, 22, 0, p.INTERRUPT_IN.struct.pack(20)))  # answered: dropped
                await kernel.send(request(p.GETATTR, 23, p.ROOT_ID, p.GETATTR_IN.struct.pack(0, 0)))
                assert (await answer(23))[0] == 0 and not replies
                theirs.shutdown(socket.SHUT_RDWR)  # the device goes away: the session ends by itself
            return session

    session = trio.run(main)
    assert session.end_reason and session.statistics()["interrupted"] == 1
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["STATFS failed unexpectedly; answering EIO"]


async def wait_until(predicate, timeout=5.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.001)


# -- mounted --------------------------------------------------------------------------

class Toy:
    """tests/fusetoy.py mounted in a child process, as `user` if given (then with the
    system's Python, which every user can run, and the project's packages on its path)."""

    def __init__(self, mountpoint: Path, user: str | None = None):
        self.mountpoint = mountpoint
        argv = [sys.executable, "-m", "tests.fusetoy", str(mountpoint)]
        env = dict(os.environ)
        if user:
            site = next(Path(REPO, ".venv", "lib").glob("python3*/site-packages"))
            argv = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups",
                    "/usr/bin/python3", "-m", "tests.fusetoy", str(mountpoint)]
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{site}", "HOME": "/"}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.settled = self.next_event(15)
        assert self.settled.get("serving"), self.settled

    def _read(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"exit": True})

    def next_event(self, timeout=10) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no word from the toy file system; stderr: {self.proc.stderr.read1()!r}")

    def stop(self) -> dict:
        """Unmount (with fusermount3, as a user would) and return its last words."""
        if is_mounted(str(self.mountpoint)):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            if is_mounted(str(self.mountpoint)):
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        last = {}
        while not self.events.empty():
            event = self.events.get()
            if "ended" in event:
                last = event
        return last


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts with mount(2); runs a reader as another user")


@needs_root
def test_a_signal_interrupts_a_read_and_stops_its_work(tmp_path):
    (tmp_path / "mnt").mkdir()
    toy = Toy(tmp_path / "mnt")
    try:
        reader = subprocess.Popen([sys.executable, "-c", (
            "import os, signal, sys\n"
            "def stop(*a): raise SystemExit(7)\n"
            "signal.signal(signal.SIGUSR1, stop)\n"
            f"fd = os.open({str(tmp_path / 'mnt' / 'slow')!r}, os.O_RDONLY)\n"
            "os.pread(fd, 4096, 0)\n")])
        try:
            assert toy.next_event() == {"slow_read": "started"}
            reader.send_signal(signal.SIGUSR1)
            assert toy.next_event() == {"slow_read": "cancelled"}  # the request's work stopped
            assert reader.wait(10) == 7  # and the reader got its signal handled, not a hung read
        finally:
            reader.kill()
            reader.wait()
    finally:
        last = toy.stop()
    assert last["interrupted"] == 1 and last["cancelled_reads"] == 1 and last["ended"] == "unmounted"


@needs_root
def test_unprivileged_mount_through_fusermount3():
    user = "nobody"
    if not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and the system's python3")
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        pytest.skip("/dev/fuse is not open to every user (scripts/setup.sh makes it 0666, as udev does)")
    base = Path(tempfile.mkdtemp(prefix="dorafs-unpriv-"))
    mnt = base / "mnt"
    mnt.mkdir()
    os.chmod(base, 0o755)
    os.chown(mnt, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    toy = None
    try:
        toy = Toy(mnt, user=user)
        line = next(line for line in Path("/proc/self/mounts").read_text().splitlines() if f" {mnt} " in line)
        assert f"user_id={pwd.getpwnam(user).pw_uid}" in line and "fuse.toy" in line
        as_user = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups"]
        out = subprocess.run(as_user + ["cat", str(mnt / "hello")], capture_output=True, timeout=20)
        assert out.stdout == FILES[b"hello"], out.stderr
        # The user unmounts it; the session sees the device end (ENODEV) and stops.
        subprocess.run(as_user + ["fusermount3", "-u", str(mnt)], check=True, timeout=20)
        assert toy.proc.wait(15) == 0
        assert toy.stop()["ended"] == "unmounted"
    finally:
        if toy is not None:
            toy.stop()
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_lookup_counts_return_to_the_root_after_ls_and_drop_caches(procs, s3_server, bucket):
    s3 = s3_server.client()
    for key in ["a/1", "a/2", "a/b/3", "a/b/c/4", "top", "other/5"]:
        s3.put_object(Bucket=bucket, Key=f"lc/{key}", Body=key.encode())
    port = free_port()
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/lc", workers=[worker.address], options=f"metrics_listen=127.0.0.1:{port}")
    from tests.test_operations import scrape

    listing = subprocess.run(["ls", "-lR", str(mount.mountpoint)], capture_output=True, text=True, check=True)
    assert "4" in listing.stdout and listing.stdout.count("\n-") + listing.stdout.count("\nd") >= 9
    assert mount.path("a", "b", "c", "4").read_bytes() == b"a/b/c/4"
    held = scrape(f"127.0.0.1:{port}")["dorafs_mount_inodes"]
    assert held >= 10  # the root, 3 directories under a, other, and 5 files... as the kernel holds them
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel drops its dentries and inodes: FORGETs
    wait_for(lambda: scrape(f"127.0.0.1:{port}")["dorafs_mount_inodes"] == 1, timeout=20,
             what="the mount's inode table back to the root alone")
    assert sorted(os.listdir(mount.path("a"))) == ["1", "2", "b"]  # and it still serves


def test_requests_back_to_back_leave_room_for_the_mounts_other_tasks():
    """Operations that never wait, arriving faster than they are served, must not keep the
    mount's other tasks (a part upload a later write waits for) from running for longer
    than BUSY_SECONDS. Each request here holds the loop for 0.6 of that (a busy loop: the
    machine's load can only make it longer), so a yield is due after every second one."""
    ticks = 0
    seen: list[int] = []

    class Counting(ToyOperations):
        async def getattr(self, ino, ctx):
            seen.append(ticks)
            until = time.monotonic() + 0.6 * BUSY_SECONDS
            while time.monotonic() < until:
                pass
            return self._attr(ino)

    async def main():
        nonlocal ticks
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            session = Session(Counting(), ours.fileno(), workers=1)
            theirs.send(RECORDED_INIT_7_45)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                theirs.recv(1 << 16)
                for unique in range(10, 60):  # all queued before the session reads one
                    theirs.send(request(p.GETATTR, unique, p.ROOT_ID, p.GETATTR_IN.struct.pack(0, 0)))

                async def background():
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await trio.sleep(0)

                nursery.start_soon(background)
                await wait_until(lambda: len(seen) == 50)
                nursery.cancel_scope.cancel()

    trio.run(main)
    # A yield after every second request; trio runs the tasks of one pass through the
    # scheduler in either order, so the background's tick may come before or after the
    # worker's two requests of a pass: at most four requests in a row see the same tick.
    assert all(later > earlier for earlier, later in zip(seen, seen[4:])), seen


def test_notifications_reach_the_kernel_as_the_protocol_defines_them():
    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        kernel = trio.socket.from_stdlib_socket(theirs)
        with ours, theirs:
            session = Session(ToyOperations(), ours.fileno(), workers=2)
            await kernel.send(RECORDED_INIT_7_45)
            async with trio.open_nursery() as nursery:
                await nursery.start(session.serve)
                await kernel.recv(1 << 16)  # the INIT answer
                session.invalidate_inode(7)
                session.invalidate_inode(8, attr_only=True)
                session.invalidate_entry(p.ROOT_ID, b"gone")
                got = []
                with trio.fail_after(10):
                    while len(got) < 3:
                        got.append(await kernel.recv(1 << 16))
                nursery.cancel_scope.cancel()
        return got

    messages = trio.run(main)
    by_code = {}
    for message in messages:
        size, code, unique = p.OUT_HEADER.struct.unpack_from(message)
        assert size == len(message) and unique == 0  # unique 0: a notification, not an answer
        by_code.setdefault(code, []).append(message[p.OUT_HEADER.size:])
    inodes = sorted(p.NOTIFY_INVAL_INODE_OUT.struct.unpack(m) for m in by_code[p.NOTIFY_INVAL_INODE])
    assert inodes == [(7, 0, 0), (8, -1, 0)]  # offset -1: attributes only, no pages
    (entry,) = by_code[p.NOTIFY_INVAL_ENTRY]
    parent, namelen, flags = p.NOTIFY_INVAL_ENTRY_OUT.struct.unpack_from(entry)
    assert (parent, namelen, flags) == (p.ROOT_ID, 4, 0)
    assert entry[p.NOTIFY_INVAL_ENTRY_OUT.size:] == b"gone\0"


def test_a_name_deleted_in_the_bucket_is_forgotten_by_the_kernel_and_can_be_created_again(
        procs, s3_server, bucket):
    """The kernel keeps a name for entry_timeout (60 s here). When the mount finds the
    object gone, it tells the kernel to forget the name, so creating it again through the
    mount creates it rather than opening the kernel's old entry."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="gone/f", Body=b"before")
    worker = procs.worker()
    mount = procs.mount(f"s3://{bucket}/gone", workers=[worker.address], options=(
        f"staging_dir={procs.tmp / 'staging'},status_ttl=0,listing_ttl=0,negative_ttl=0,"
        "attr_timeout=0,entry_timeout=60"))
    path = mount.path("f")
    assert path.read_bytes() == b"before"
    s3.delete_object(Bucket=bucket, Key="gone/f")
    with pytest.raises(FileNotFoundError):
        os.stat(path)  # the kernel's entry is still there; its attributes are asked for

    def create() -> bool:  # O_CREAT: a CREATE once the kernel forgot the name (soon: the
        try:               # notification is sent from a thread), an OPEN of its entry before
            with open(path, "wb") as f:
                f.write(b"after")
        except FileNotFoundError:
            return False
        return True

    wait_for(create, timeout=10, what="the name created again through the mount")
    assert s3.get_object(Bucket=bucket, Key="gone/f")["Body"].read() == b"after"
    assert path.read_bytes() == b"after"

