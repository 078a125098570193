"""The FUSE session: one /dev/fuse descriptor served on trio.

A pool of worker tasks, each with its own request buffer (max_write plus room for the
headers, anonymous memory the kernel fills only as far as a request goes), takes turns
reading the nonblocking device: a worker reads a request and handles it; if handling
it waits for anything, the next idle worker reads meanwhile. At most one of them waits
for the descriptor to become readable, the other idle ones park. So at most `workers`
requests are served at once, and a worker that reads a request while the device is busy
never passes through the scheduler. A reply is one `writev` of the out header and the payload buffers the
operation returned (views of the read path's own buffers, written before anything else
runs).

Subtleties:
- INIT comes first and is answered before the pool starts: the session asks only for
  what the kernel offered (`negotiate`), and keeps what was agreed in `negotiated` (the
  passthrough work reads `kernel_flags` and `max_stack_depth` there).
- FORGET and BATCH_FORGET get no reply. INTERRUPT names a request by its unique id: the
  cancel scope of the worker serving it is cancelled, the operation's work stops at its
  next checkpoint, and the request is answered EINTR. An INTERRUPT for a request already answered is dropped.
- The end: reading the device fails with ENODEV once the file system is unmounted (the
  kernel sends DESTROY only for block-device mounts, so it may never come), or reads
  end of file (a socket in tests). Then every worker is cancelled and `serve` returns.
- Notifications to the kernel (invalidate an inode, an entry) are written from a thread
  of a task the session owns: the kernel may hold a lock that a request this session has
  yet to answer would release, so a handler must never wait for one.
- A worker that has served requests for `BUSY_SECONDS` without waiting for anything
  yields to the scheduler before reading the next: operations that never wait (a
  buffered read, a staged write) would otherwise keep the mount's other tasks (a part
  upload a later write waits for, readahead, heartbeats) from running for as long as
  requests keep coming. Not after every request: a lone reader's next request is not
  there yet when its answer is written, so the worker waits for the device and passes
  through the scheduler anyway; a second pass per request was pure cost. (Yielding every
  other request instead failed the streamed multipart write test once in eight runs;
  yielding between reading a request and serving it, so a later request may be served
  first, made a cold sequential read of bench/harness.py take 79 S3 requests, not 50.)
- No exception ends the loop: an operation's `FUSEError` is its errno, anything else
  is logged once and answered EIO. A reply the kernel no longer wants (ENOENT: the
  request was interrupted or its process died) is dropped.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import types
from dataclasses import dataclass
from time import monotonic

import trio

from dorafs.fuse import protocol as p
from dorafs.fuse.dispatch import Dispatcher, error_name
from dorafs.fuse.types import FUSEError

log = logging.getLogger("dorafs.fuse.session")

_unpack_in = p.IN_HEADER.struct.unpack_from
_IN_SIZE = p.IN_HEADER.size
_pack_out = p.OUT_HEADER.struct.pack
_OUT_SIZE = p.OUT_HEADER.size

PAGE = 4096
HEADROOM = 4096  # in header + the largest fixed argument struct, rounded up to a page
# A worker serving requests that never wait yields to the scheduler once this long has
# passed since it last did (see "Subtleties").
BUSY_SECONDS = 0.0005
# After a request that had to be waited for, a worker polls the device this long before
# it sleeps in epoll: a lone reader's next request comes within tens of microseconds, and
# being woken from epoll (the scheduler, an idle core's wake-up) cost more than that on an
# idle machine (bench/README.md, "Held object files and a cheaper wait").
SPIN_SECONDS = 0.00005

# What dorafs asks of the kernel, where offered. Not WRITEBACK_CACHE (writes must reach
# the mount as they are made), not READDIRPLUS_AUTO (every readdir is a readdirplus, so
# lookup counts are kept the same way whatever the kernel guesses). DIRECT_IO_ALLOW_MMAP:
# a file opened with direct_io can still be mapped shared (numpy, pyarrow and Python's
# mmap map files MAP_SHARED), through the kernel's page cache (6.6+).
WANTED = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.EXPORT_SUPPORT | p.BIG_WRITES | p.AUTO_INVAL_DATA
          | p.DO_READDIRPLUS | p.ASYNC_DIO | p.PARALLEL_DIROPS | p.MAX_PAGES | p.INIT_EXT
          | p.DIRECT_IO_ALLOW_MMAP)


@dataclass(frozen=True)
class Negotiated:
    """What the INIT exchange settled."""

    major: int
    minor: int  # the protocol version both speak: the smaller of the two
    kernel_minor: int
    kernel_flags: int  # everything the kernel offered (flags | flags2 << 32)
    flags: int  # what this session asked for and the kernel offered
    max_readahead: int
    max_write: int
    max_pages: int
    max_stack_depth: int = 0  # only with PASSTHROUGH

    def granted(self, flag: int) -> bool:
        return bool(self.flags & flag)


def negotiate(body: bytes | memoryview, *, wanted: int = WANTED, max_write: int = 1 << 20,
              max_stack_depth: int = 0) -> tuple[bytes, Negotiated | None]:
    """The reply payload to an INIT request's arguments, and what it settles (None when
    the kernel speaks a newer major version and will send INIT again)."""
    raw = bytes(body[:p.INIT_IN.size]).ljust(p.INIT_IN.size, b"\0")
    major, minor, max_readahead, flags, flags2 = p.INIT_IN.struct.unpack(raw)
    if major < p.KERNEL_VERSION:
        raise FUSEError(errno.EPROTO)
    if major > p.KERNEL_VERSION:  # answer with ours alone; the kernel asks again
        return p.INIT_OUT.struct.pack(p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION, *[0] * 11)[:8], None
    offered = flags | (flags2 << 32 if flags & p.INIT_EXT else 0)
    granted = wanted & offered
    if not granted & p.PASSTHROUGH:
        max_stack_depth = 0
    max_pages = max(1, max_write // PAGE) if granted & p.MAX_PAGES else 32
    max_write = min(max_write, max_pages * PAGE)
    agreed = min(minor, p.KERNEL_MINOR_VERSION)
    reply = p.INIT_OUT.struct.pack(
        p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION, max_readahead, granted & 0xFFFFFFFF,
        0, 0,  # max_background, congestion_threshold: the kernel's defaults
        max_write, 1,  # time_gran: nanoseconds
        max_pages if granted & p.MAX_PAGES else 0, 0, granted >> 32, max_stack_depth, 0)
    if minor < 5:
        reply = reply[:p.INIT_OUT_COMPAT_SIZE]
    elif minor < 23:
        reply = reply[:p.INIT_OUT_COMPAT_22_SIZE]
    return reply, Negotiated(p.KERNEL_VERSION, agreed, minor, offered, granted, max_readahead,
                             max_write, max_pages, max_stack_depth)


class _Slot:
    """A worker's cancel scope, and whether a request it served was interrupted."""

    __slots__ = ("scope", "interrupted")

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        self.interrupted = False


@types.coroutine
def _watched(coro, on_wait):
    """Run `coro` as `await` would, calling `on_wait()` when it first suspends.

    Most requests (a buffered or cached read, a staged write, a kept status) finish
    without waiting for anything; only one that waits needs another worker to watch the
    device meanwhile. Waking one for every request cost a pass of that worker through
    the scheduler, only to park again. The first step is taken here; from the first
    suspension on, trio's traps and what they resume with pass through unchanged, as
    they do through `await`.
    """
    try:
        trap = coro.send(None)
    except StopIteration as done:
        return done.value
    on_wait()
    while True:
        try:
            sent = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = coro.send(sent)
            except StopIteration as done:
                return done.value


def _queued_soon(poll: select.poll) -> bool:
    """Is a request queued on the device now, or within SPIN_SECONDS?"""
    end = monotonic() + SPIN_SECONDS
    while not poll.poll(0):
        if monotonic() >= end:
            return False
    return True


class SessionError(Exception):
    """The session could not start (the kernel never sent a usable INIT)."""


class Session:
    """Serves FUSE requests from `fd` with the methods of `operations` (see dispatch.py)."""

    def __init__(self, operations, fd: int, *, workers: int = 64, max_write: int = 1 << 20,
                 wanted: int = WANTED, max_stack_depth: int = 0, debug: bool = False):
        self.fd = fd
        self.dispatcher = Dispatcher(operations)
        self.operations = operations
        self.workers = workers
        self.max_write = max_write
        self.wanted = wanted
        self.max_stack_depth = max_stack_depth  # with PASSTHROUGH in `wanted`: 1 (backing files on a disk)
        self.debug = debug
        self.negotiated: Negotiated | None = None
        self.bufsize = max_write + HEADROOM
        self.requests = 0  # requests read, for statistics
        self.interrupted = 0
        self._handlers = self.dispatcher.handlers
        self._running: dict[int, _Slot] = {}  # unique id -> the worker serving it
        self._idle = trio.lowlevel.ParkingLot()
        self._waiting = False  # a worker is in wait_readable
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._notify_limiter = trio.CapacityLimiter(2)
        self.ended = trio.Event()
        self.end_reason = ""

    # -- the loop ----------------------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Answer INIT, report `negotiated` through `task_status`, then serve until the
        file system is unmounted or `terminate` is called."""
        os.set_blocking(self.fd, False)
        try:
            with trio.CancelScope() as self._scope:
                if not await self._init():
                    raise SessionError(f"FUSE session not started: {self.end_reason}")
                task_status.started(self.negotiated)
                async with trio.open_nursery() as self._nursery:
                    for _ in range(self.workers):
                        self._nursery.start_soon(self._worker)
        finally:
            self._nursery = None
            self.ended.set()
            log.debug("session ended: %s", self.end_reason or "terminated")

    def terminate(self, reason: str = "terminated") -> None:
        """Stop serving: in-flight requests are cancelled, `serve` returns."""
        self.end_reason = self.end_reason or reason
        if self._scope is not None:
            self._scope.cancel()

    async def _receive(self, buf) -> int:
        """One request into `buf`, waiting for one if needed; 0 at the end."""
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # ENOENT: the request was interrupted before it was read
                if exc.errno == errno.ENODEV:
                    return 0
                raise

    async def _init(self) -> bool:
        buf = bytearray(self.bufsize)
        while True:
            n = await self._receive(buf)
            if n == 0:
                self.end_reason = "the device closed before INIT"
                return False
            h = p.IN_HEADER.struct.unpack_from(buf)
            if h[1] != p.INIT:
                self._reply(h[2], errno.EIO)
                continue
            try:
                reply, settled = negotiate(memoryview(buf)[p.IN_HEADER.size:n], wanted=self.wanted,
                                           max_write=self.max_write, max_stack_depth=self.max_stack_depth)
            except FUSEError as exc:
                log.error("the kernel speaks FUSE %d.x, dorafs %d.%d: not served",
                          p.INIT_IN.struct.unpack_from(buf, p.IN_HEADER.size)[0],
                          p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION)
                self._reply(h[2], exc.errno)
                self.end_reason = "protocol version"
                return False
            self._reply(h[2], 0, reply)
            if settled is not None:
                self.negotiated = settled
                log.info("FUSE %d.%d (kernel %d.%d), max_write %d, max_pages %d; granted %s; "
                         "kernel also offered %s", settled.major, settled.minor, settled.major,
                         settled.kernel_minor, settled.max_write, settled.max_pages,
                         " ".join(p.flag_names(settled.flags)),
                         " ".join(p.flag_names(settled.kernel_flags & ~settled.flags)))
                return True

    async def _worker(self) -> None:
        buf = mmap.mmap(-1, self.bufsize)
        view = memoryview(buf)
        fd = self.fd
        idle = self._idle
        take = self._take
        # After serving a request that had to be waited for, the next one is usually
        # not there yet either (a lone reader asks again only once answered): then
        # poll(0), which costs a third of a `readv` that fails with EAGAIN (raising the
        # exception is the cost), is asked for up to SPIN_SECONDS before waiting in
        # epoll. After a request that was already queued, more are likely queued:
        # `readv` at once.
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        after_wait = False  # the request being served was read right after a wait
        while True:
            # One cancel scope serves this worker's requests until one of them is
            # interrupted (entering a scope per request would cost more than the rest of
            # the request's bookkeeping together); then the next request gets a new one.
            with trio.CancelScope() as scope:
                slot = _Slot(scope)
                rested = monotonic()  # when it last went through the scheduler
                while not slot.interrupted:
                    if monotonic() - rested > BUSY_SECONDS:
                        # Served requests without waiting for anything for a while: let
                        # the mount's other tasks (uploads, readahead, heartbeats) run
                        # before reading the next one; never between reading a request
                        # and serving it, which would let a later request overtake it.
                        await trio.lowlevel.checkpoint()
                        rested = monotonic()
                    n = take(buf) if not after_wait or _queued_soon(poll) else -1
                    after_wait = False
                    if n < 0:  # nothing queued: wait for a request
                        if self._waiting:
                            await idle.park()
                            while self._waiting:  # woken while another still watches the
                                await idle.park()  # device (it got the request): no read to try
                        else:
                            self._waiting = True
                            try:
                                await trio.lowlevel.wait_readable(fd)
                            finally:
                                self._waiting = False
                        rested = monotonic()
                        n = take(buf)
                        if n < 0:  # another worker took it
                            continue
                        after_wait = True
                    if n == 0:
                        return
                    self.requests += 1
                    await _watched(self._handle(view, n, slot), self._someone_watch)

    def _take(self, buf) -> int:
        """A queued request into `buf`: its length; -1 if none is queued; 0 when the
        session ends (then it is terminated)."""
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                return -1
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):
                    continue  # ENOENT: the request was interrupted before it was read
                if exc.errno != errno.ENODEV:
                    log.error("reading the FUSE device failed: %s; the session ends", exc)
                self.terminate("unmounted" if exc.errno == errno.ENODEV else str(exc))
                return 0
            if n == 0:
                self.terminate("end of file on the FUSE device")
            return n

    def _someone_watch(self) -> None:
        """A worker's request waits: another one must watch the device meanwhile."""
        if not self._waiting and len(self._idle):
            self._idle.unpark()

    async def _handle(self, view: memoryview, n: int, slot: _Slot) -> None:
        h = _unpack_in(view)
        opcode, unique = h[1], h[2]
        body = view[_IN_SIZE:n]
        handler = self._handlers.get(opcode)
        if handler is None:
            await self._special(h, body)
            return
        if self.debug:
            log.debug("request %d: %s node %d", unique, p.OPCODE_NAMES.get(opcode, opcode), h[3])
        payload = None
        error = 0
        self._running[unique] = slot
        try:
            payload = await handler(h, body)
        except FUSEError as exc:
            error = exc.errno
        except Exception:
            log.exception("%s failed unexpectedly; answering EIO", p.OPCODE_NAMES.get(opcode, opcode))
            error = errno.EIO
        finally:
            del self._running[unique]
            if slot.interrupted:  # answered EINTR, whatever the work did after
                self.interrupted += 1
                self._reply(unique, errno.EINTR)
        if slot.interrupted:
            return
        if self.debug:
            log.debug("reply %d: %s", unique, error_name(error))
        self._reply(unique, error, payload if not error else None)

    async def _special(self, h: tuple, body: memoryview) -> None:
        """Requests that are not operations of the adapter."""
        opcode, unique = h[1], h[2]
        try:
            if opcode == p.FORGET:
                (nlookup,) = p.FORGET_IN.struct.unpack_from(body)
                await self.dispatcher.forget([(h[3], nlookup)])
            elif opcode == p.BATCH_FORGET:
                (count,) = p.BATCH_FORGET_IN.struct.unpack_from(body)
                one = p.FORGET_ONE.struct
                items = [one.unpack_from(body, p.BATCH_FORGET_IN.size + i * one.size) for i in range(count)]
                await self.dispatcher.forget(items)
            elif opcode == p.INTERRUPT:
                (target,) = p.INTERRUPT_IN.struct.unpack_from(body)
                slot = self._running.get(target)
                if slot is not None:
                    log.debug("request %d interrupted", target)
                    slot.interrupted = True
                    slot.scope.cancel()
            elif opcode == p.DESTROY:
                self._reply(unique, 0)
                self.terminate("DESTROY")
            else:
                if self.debug:
                    log.debug("request %d: opcode %s not served (ENOSYS)", unique,
                              p.OPCODE_NAMES.get(opcode, opcode))
                self._reply(unique, errno.ENOSYS)
        except Exception:  # FORGETs answer nothing, so their errors are only logged
            log.exception("%s failed unexpectedly", p.OPCODE_NAMES.get(opcode, opcode))

    def _reply(self, unique: int, error: int, payload=None) -> None:
        if payload is None:
            parts = (_pack_out(_OUT_SIZE, -error, unique),)
        elif type(payload) is tuple:
            parts = (_pack_out(_OUT_SIZE + sum(map(len, payload)), -error, unique), *payload)
        else:
            parts = (_pack_out(_OUT_SIZE + len(payload), -error, unique), payload)
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted or its caller is gone; the kernel no
            # longer waits for this answer. ENODEV: unmounted meanwhile.
            level = logging.DEBUG if exc.errno in (errno.ENOENT, errno.ENODEV) else logging.WARNING
            log.log(level, "reply to request %d not taken: %s", unique, exc)

    # -- notifications -----------------------------------------------------------------

    def invalidate_inode(self, inode: int, attr_only: bool = False) -> None:
        """Have the kernel drop its cached attributes of `inode` and, unless `attr_only`,
        its cached pages; soon, from a thread, never waiting for it here."""
        payload = p.NOTIFY_INVAL_INODE_OUT.struct.pack(inode, -1 if attr_only else 0, 0)
        self._notify_soon(p.NOTIFY_INVAL_INODE, payload, f"inode {inode}")

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Have the kernel forget the name `name` in directory `parent`."""
        payload = p.NOTIFY_INVAL_ENTRY_OUT.struct.pack(parent, len(name), 0) + name + b"\0"
        self._notify_soon(p.NOTIFY_INVAL_ENTRY, payload, f"entry {name!r} of inode {parent}")

    def _notify_soon(self, code: int, payload: bytes, what: str) -> None:
        if self._nursery is None:
            return
        message = p.OUT_HEADER.struct.pack(p.OUT_HEADER.size + len(payload), code, 0) + payload

        async def send() -> None:
            try:
                await trio.to_thread.run_sync(os.write, self.fd, message, limiter=self._notify_limiter,
                                              abandon_on_cancel=True)
            except OSError as exc:  # ENOENT: the kernel already forgot it
                log.debug("kernel invalidation of %s: %s", what, exc)

        try:
            self._nursery.start_soon(send)
        except RuntimeError:  # the session is ending (its nursery closed): nothing to tell any more
            log.debug("kernel invalidation of %s: the session has ended", what)

    def statistics(self) -> dict:
        return {"requests": self.requests, "in_flight": len(self._running), "interrupted": self.interrupted}
