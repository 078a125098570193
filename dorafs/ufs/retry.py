"""Bounded retries for UFS calls: capped exponential backoff with full jitter, a deadline.

Subtleties:
- Only transient failures are retried: throttling (S3 503 SlowDown), other 5xx answers,
  timeouts and broken connections. An answer that says something about the object (412
  changed version, 404, 403, 416) is final at once: retrying a 412 would only hide a
  change from a reader that must see ESTALE.
- The whole call, retries included, ends by `deadline`. An attempt runs in a thread that
  cannot be cancelled, so when the deadline passes mid-attempt the caller is answered
  (UfsError, EIO) and the thread is abandoned to finish on its own read timeout. The
  worker's deadline is shorter than the client's `worker_timeout` (docs/HA.md), so a
  slow UFS comes back as an error answer, not as a worker that looks dead.
- Backoff before attempt n (n >= 1) is uniform in [0, min(cap, base * 2**n)] ("full
  jitter"): many workers throttled at once do not retry in lockstep.
- The final failure carries the cause of the last attempt and how many were made.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from dorafs.errors import UfsError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries per call, the first included
    deadline: float = 4.0  # seconds for the whole call; below the client's 5 s worker_timeout
    timeout: float = 2.0  # per attempt: connect and read (socket idle) timeout
    base: float = 0.1  # first backoff cap, doubling per retry
    cap: float = 1.0  # largest backoff

    def backoff(self, retry: int) -> float:
        return random.uniform(0, min(self.cap, self.base * (2 ** retry)))


class Attempt:
    """What one failed attempt means: retry it or not, and a one-line cause."""

    def __init__(self, retry: bool, cause: str):
        self.retry = retry
        self.cause = cause


async def call_with_retries(policy: RetryPolicy, what: str, run: Callable[[], T],
                            classify: Callable[[BaseException], Attempt | None],
                            limiter: trio.CapacityLimiter | None = None) -> T:
    """Run blocking `run()` in a thread, retrying transient failures within the policy.

    `classify(exc)` returns an `Attempt` for failures it knows (None: not a UFS failure,
    re-raised as is). A non-retryable failure is re-raised unchanged for the caller to
    interpret (412 -> StaleVersion...); retries exhausted raise `UfsError`.
    """
    start = trio.current_time()
    deadline = start + policy.deadline
    last: BaseException | None = None
    cause = ""
    attempt = 0
    while attempt < policy.attempts:
        if attempt:
            pause = policy.backoff(attempt)
            if trio.current_time() + pause >= deadline:
                break
            await trio.sleep(pause)
        attempt += 1
        with trio.move_on_after(deadline - trio.current_time()) as scope:
            try:
                return await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=limiter)
            except Exception as exc:
                verdict = classify(exc)
                if verdict is None or not verdict.retry:
                    raise
                last, cause = exc, verdict.cause
                log.debug("%s: attempt %d failed (%s)", what, attempt, cause)
        if scope.cancelled_caught:
            last, cause = TimeoutError(), f"no answer within the {policy.deadline:g}s deadline"
            break
    elapsed = trio.current_time() - start
    raise UfsError(f"{what}: {cause} (after {attempt} attempt{'s' if attempt != 1 else ''}, {elapsed:.1f}s)") \
        from last
