"""In-process tests of the UFS retry policy (dorafs/ufs/retry.py) and S3's classification.

The same policy against a real S3 server behind a fault-injecting proxy is in
tests/test_faults.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import trio
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from dorafs.errors import UfsError
from dorafs.ufs.retry import RetryPolicy, call_with_retries
from dorafs.ufs.s3 import classify


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("exc, retry", [
    (client_error(503, "SlowDown"), True),
    (client_error(500, "InternalError"), True),
    (client_error(429, "TooManyRequests"), True),
    (client_error(400, "RequestTimeout"), True),
    (client_error(412, "PreconditionFailed"), False),
    (client_error(404, "NoSuchKey"), False),
    (client_error(403, "AccessDenied"), False),
    (client_error(416, "InvalidRange"), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (NoCredentialsError(), False),
    (ValueError("not a UFS failure"), None),
])
def test_classify(exc, retry):
    verdict = classify(exc)
    assert (verdict.retry if verdict is not None else None) == retry


def test_backoff_is_jittered_and_capped():
    policy = RetryPolicy(base=0.1, cap=1.0)
    for retry in range(1, 8):
        pauses = [policy.backoff(retry) for _ in range(200)]
        assert all(0 <= p <= min(1.0, 0.1 * 2 ** retry) for p in pauses)
        assert len(set(pauses)) > 100  # jittered, not a fixed schedule


def _run(policy, outcomes, classify_fn=classify):
    calls = []

    def attempt():
        calls.append(time.monotonic())
        outcome = outcomes[min(len(calls), len(outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def main():
        return await call_with_retries(policy, "S3 get_object s3://b/k", attempt, classify_fn)

    return trio.run(main), calls


def test_transient_failures_then_success():
    result, calls = _run(RetryPolicy(attempts=4, deadline=5, base=0.01), [client_error(503, "SlowDown")] * 3 + ["ok"])
    assert result == "ok" and len(calls) == 4


def test_attempts_run_out_with_the_cause():
    with pytest.raises(UfsError) as failure:
        _run(RetryPolicy(attempts=3, deadline=5, base=0.01), [client_error(500, "InternalError")])
    assert "InternalError" in str(failure.value) and "after 3 attempts" in str(failure.value)
    assert failure.value.errno == 5  # EIO


def test_version_mismatch_is_not_retried():
    with pytest.raises(ClientError):
        _run(RetryPolicy(attempts=4, deadline=5, base=0.01), [client_error(412, "PreconditionFailed"), "ok"])


def test_deadline_ends_a_hanging_attempt():
    release = threading.Event()

    def hang():
        release.wait(10)
        return "late"

    async def main():
        return await call_with_retries(RetryPolicy(attempts=4, deadline=0.5), "S3 get_object s3://b/k", hang,
                                       classify)

    started = time.monotonic()
    try:
        with pytest.raises(UfsError, match="deadline"):
            trio.run(main)
        assert time.monotonic() - started < 3
    finally:
        release.set()


# -- progress, not wall time ------------------------------------------------------------------

def _stream(progress, buffer, pieces, pause, hold=None):
    """An attempt's thread: deliver `pieces` bytes one at a time, `pause` s apart, from
    where the call stands; with `hold`, stop after the first and wait on it."""
    ticket = progress.begin()
    while progress.done < len(buffer) and pieces:
        def store(at):
            buffer[at] = 1
            return 1
        progress.deliver(ticket, store)
        pieces -= 1
        if hold is not None:
            hold.wait(10)
            progress.deliver(ticket, store)  # raises Abandoned once the loop gave up on it
        time.sleep(pause)
    return progress.done


def test_a_slow_transfer_that_keeps_moving_outlives_the_deadline_of_an_empty_call():
    from dorafs.ufs.retry import Progress

    policy = RetryPolicy(attempts=1, deadline=0.3, timeout=0.5, min_rate=10)  # 20 bytes: 2.3 s in all

    async def main():
        progress = Progress()
        buffer = bytearray(20)
        started = trio.current_time()
        done = await call_with_retries(policy, "S3 get_object s3://b/k",
                                       lambda: _stream(progress, buffer, 20, 0.05), classify,
                                       nbytes=len(buffer), progress=progress)
        return done, trio.current_time() - started

    done, elapsed = trio.run(main)
    assert done == 20 and elapsed > 0.9  # three times the 0.3 s an empty call would get


def test_a_stalled_attempt_is_abandoned_and_the_retry_goes_on_from_its_bytes():
    from dorafs.ufs.retry import Abandoned, Progress

    policy = RetryPolicy(attempts=3, deadline=5, timeout=0.3, base=0.01)
    hold = threading.Event()
    outcomes = []

    async def main():
        progress = Progress()
        buffer = bytearray(10)
        attempts = []

        def attempt():
            attempts.append(progress.done)
            try:
                return _stream(progress, buffer, 10, 0.0, hold=hold if len(attempts) == 1 else None)
            except Abandoned as exc:
                outcomes.append(exc)
                raise

        started = trio.current_time()
        done = await call_with_retries(policy, "S3 get_object s3://b/k", attempt, classify,
                                       nbytes=len(buffer), progress=progress)
        return done, attempts, trio.current_time() - started

    try:
        done, attempts, elapsed = trio.run(main)
    finally:
        hold.set()
    assert done == 10
    assert attempts == [0, 1]  # the retry started from the byte the stalled attempt had delivered
    assert 0.3 <= elapsed < 2
    deadline = time.monotonic() + 5
    while not outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcomes and isinstance(outcomes[0], Abandoned)  # the abandoned thread wrote nothing more


def test_a_lost_answer_that_took_effect_is_not_sent_again():
    calls = []

    def attempt():
        calls.append(1)
        raise ReadTimeoutError(endpoint_url="http://x")

    async def settled(exc):
        return {"ETag": '"landed"'}

    async def main():
        return await call_with_retries(RetryPolicy(attempts=4, deadline=5, base=0.01), "S3 put_object s3://b/k",
                                       attempt, classify, settled=settled)

    assert trio.run(main) == {"ETag": '"landed"'}
    assert len(calls) == 1
