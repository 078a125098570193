"""Bounded retries for UFS calls: progress timeouts, capped exponential backoff with full
jitter, and a deadline that grows with the bytes a call moves.

Subtleties:
- Slow is not broken. An attempt fails when it stops making progress: a connect that
  does not complete, or no byte for `timeout` (botocore's connect and read timeouts are
  per socket operation, so they measure exactly that; a streamed body also reports each
  chunk to a `Progress`, whose watchdog on the loop abandons an attempt that stalls).
  The only bound on a whole call is `deadline_for(nbytes)`: `deadline` plus the bytes
  asked for at `min_rate`, so a large transfer through a slow store is never cut short
  while bytes keep coming, and a trickle still ends.
- Only transient failures are retried: throttling (S3 503 SlowDown), other 5xx answers,
  timeouts and broken connections. An answer that says something about the object (412
  changed version, 404, 403, 416) is final at once: retrying a 412 would only hide a
  change from a reader that must see ESTALE.
- A retried streamed read goes on from the bytes the failed attempt delivered (the
  caller reads `progress.done`), so a broken connection costs what was in flight, not
  the whole transfer.
- A streaming thread tells the loop of its bytes (a wakeup of the loop each time) when
  a waiter's bytes are in, or at least every TELL_EVERY while they come; the stall
  watchdog counts silence from the last delivery, told or not.
- An attempt runs in a thread that cannot be cancelled, so when the deadline passes or
  the watchdog fires mid-attempt the caller is answered (UfsError, EIO) and the thread is
  abandoned to finish on its own socket timeout; `Progress.abandon` makes sure it can no
  longer write into the caller's buffer.
- Time spent waiting for a thread of the adapter's limiter is queueing, not a stall: the
  watchdog starts when the attempt's thread does.
- Backoff before attempt n (n >= 1) is uniform in [0, min(cap, base * 2**n)] ("full
  jitter"): many workers throttled at once do not retry in lockstep.
- Before retrying, a caller may ask whether the failed attempt took effect after all
  (`settled`): a write whose answer was lost is looked up, never sent again blindly.
- The final failure carries the cause of the last attempt and how many were made.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from dorafs.errors import UfsError

log = logging.getLogger(__name__)

T = TypeVar("T")
TELL_EVERY = 0.05  # seconds: a streaming thread wakes the loop at least this often while bytes come


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries per call, the first included
    deadline: float = 4.0  # seconds for a call that moves no data; grows with the bytes moved
    timeout: float = 2.0  # no progress for this long (connect, or no byte): the attempt stalled
    min_rate: float = 64 * 1024  # bytes/s: a transfer slower than this on average is given up
    base: float = 0.1  # first backoff cap, doubling per retry
    cap: float = 1.0  # largest backoff

    def backoff(self, retry: int) -> float:
        return random.uniform(0, min(self.cap, self.base * (2 ** retry)))

    def deadline_for(self, nbytes: int) -> float:
        """The bound on a whole call (retries included) that moves `nbytes`."""
        return self.deadline + max(0, nbytes) / self.min_rate

    def idle_for(self, nbytes: int) -> float:
        """How long a server may work on `nbytes` before its answer starts (S3's
        CompleteMultipartUpload, a copy): the socket idle bound of such a request."""
        return self.timeout + max(0, nbytes) / self.min_rate


class Attempt:
    """What one failed attempt means: retry it or not, and a one-line cause."""

    def __init__(self, retry: bool, cause: str):
        self.retry = retry
        self.cause = cause


class Abandoned(Exception):
    """Raised in an abandoned attempt's thread when it tries to deliver more bytes."""


class Progress:
    """Bytes a streamed call has delivered so far, reported by its thread, watched by the loop.

    The thread calls `begin()` when its attempt starts (a ticket) and `deliver(ticket, n)`
    after each chunk it stored; a ticket is refused once its attempt was abandoned. On
    the loop, `wait_for(n)` returns once `n` bytes are in or the call ended. A `sink`,
    if set, is called in the thread after each delivery with the bytes delivered so far
    (the worker writes the pages they complete there: worker/pagestore.py `RunWriter`).
    """

    def __init__(self) -> None:
        self.done = 0  # bytes delivered, across attempts
        self.buffer: bytearray | None = None  # where a streaming adapter puts them
        self.sink: Callable[[int], None] | None = None  # called in the thread after each delivery, with `done`
        self.finished = False  # the call returned or failed
        self._lock = threading.Lock()
        self._ticket = 0
        self._token = trio.lowlevel.current_trio_token()
        self._scope: trio.CancelScope | None = None
        self._stall = math.inf
        self._waiters: list[tuple[int, trio.Event]] = []  # (bytes wanted, set when in), under the lock
        self._want = math.inf  # the fewest bytes a waiter wants
        self._last = time.perf_counter()  # when the thread last delivered
        self._told = -math.inf  # when it last told the loop

    # -- the attempt's thread -----------------------------------------------------------

    def begin(self) -> int:
        with self._lock:
            self._ticket += 1
            ticket = self._ticket
            self._last = self._told = time.perf_counter()
        self._soon(self._alive)
        return ticket

    def deliver(self, ticket: int, store: Callable[[int], int]) -> int:
        """Run `store(done)` (which puts bytes at offset `done` and returns how many)
        unless the attempt was abandoned; then tell the loop, if a waiter's bytes are
        in or it has not been told for TELL_EVERY (each telling wakes the loop)."""
        with self._lock:
            if ticket != self._ticket:
                raise Abandoned()
            n = store(self.done)
            self.done += n
            now = self._last = time.perf_counter()
            tell = self.done >= self._want or now >= self._told + TELL_EVERY
            if tell:
                self._told = now
        if tell:
            self._soon(self._alive)
        if self.sink is not None:
            self.sink(self.done)
        return n

    def _soon(self, fn: Callable[[], None]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    # -- the loop -----------------------------------------------------------------------

    def _alive(self) -> None:
        if self._scope is not None:  # silence counts from the last delivery, told or not
            self._scope.deadline = trio.current_time() - (time.perf_counter() - self._last) + self._stall
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            ready = [event for want, event in self._waiters if self.done >= want or self.finished]
            if ready:
                self._waiters = [(want, event) for want, event in self._waiters if event not in ready]
                self._want = min((want for want, _ in self._waiters), default=math.inf)
        for event in ready:
            event.set()

    def watch(self, scope: trio.CancelScope | None, stall: float) -> None:
        """Cancel `scope` when an attempt started and then delivered nothing for `stall` s."""
        self._scope, self._stall = scope, stall

    def abandon(self) -> None:
        with self._lock:
            self._ticket += 1

    def finish(self) -> None:
        self.finished = True
        self._scope = None
        self._wake()

    async def wait_for(self, nbytes: int) -> int:
        """Wait until `nbytes` are delivered or the call ended; the bytes delivered."""
        if self.done < nbytes and not self.finished:
            event = trio.Event()
            with self._lock:  # so the thread sees the waiter, or the waiter sees the bytes
                waiting = self.done < nbytes
                if waiting:
                    self._waiters.append((nbytes, event))
                    self._want = min(self._want, nbytes)
            if waiting:
                await event.wait()
        return self.done


async def call_with_retries(policy: RetryPolicy, what: str, run: Callable[[], T],
                            classify: Callable[[BaseException], Attempt | None],
                            limiter: trio.CapacityLimiter | None = None, *, nbytes: int = 0,
                            progress: Progress | None = None,
                            settled: Callable[[BaseException], Awaitable[T | None]] | None = None) -> T:
    """Run blocking `run()` in a thread, retrying transient failures within the policy.

    `classify(exc)` returns an `Attempt` for failures it knows (None: not a UFS failure,
    re-raised as is). A non-retryable failure is re-raised unchanged for the caller to
    interpret (412 -> StaleVersion...); retries exhausted raise `UfsError`.

    `nbytes` is what the call moves (it stretches the deadline); with `progress` the
    attempt reports its bytes and is abandoned when it stalls for `policy.timeout`, and
    when the caller is cancelled (a readahead of a file that closed): its thread stops
    at its next piece instead of streaming the rest for nobody.
    `settled(exc)`, given, is awaited after a transient failure: a non-None result means
    the failed attempt took effect after all, and is returned instead of retrying.
    """
    start = trio.current_time()
    limit = policy.deadline_for(nbytes)
    deadline = start + limit
    last: BaseException | None = None
    cause = ""
    attempt = 0
    try:
        while attempt < policy.attempts:
            if attempt:
                pause = policy.backoff(attempt)
                if trio.current_time() + pause >= deadline:
                    break
                await trio.sleep(pause)
            attempt += 1
            with trio.move_on_at(deadline) as scope:
                try:
                    with trio.CancelScope() as stall:
                        if progress is not None:
                            progress.watch(stall, policy.timeout)
                        return await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=limiter)
                except Exception as exc:
                    verdict = classify(exc)
                    if verdict is None or not verdict.retry:
                        raise
                    last, cause = exc, verdict.cause
                    log.debug("%s: attempt %d failed (%s)", what, attempt, cause)
                    if settled is not None:
                        done = await settled(exc)
                        if done is not None:
                            log.info("%s: attempt %d failed (%s) but had taken effect", what, attempt, cause)
                            return done
                    continue
                finally:
                    if progress is not None:
                        progress.watch(None, math.inf)
                if stall.cancelled_caught:
                    if progress is not None:
                        progress.abandon()
                    last, cause = TimeoutError(), f"stalled: no progress within the {policy.timeout:g}s timeout"
                    log.debug("%s: attempt %d stalled", what, attempt)
                    continue
            if scope.cancelled_caught:
                if progress is not None:
                    progress.abandon()
                last, cause = TimeoutError(), f"not done within the {limit:.3g}s deadline"
                break
    finally:
        if progress is not None:
            progress.abandon()  # a thread still streaming (the caller was cancelled) stops at its next piece
            progress.finish()
    elapsed = trio.current_time() - start
    raise UfsError(f"{what}: {cause} (after {attempt} attempt{'s' if attempt != 1 else ''}, {elapsed:.1f}s)") \
        from last
