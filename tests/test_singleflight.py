"""In-process tests of SingleFlight (dorafs/singleflight.py), on trio's autojump clock."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from dorafs.singleflight import SingleFlight


def run(fn):
    return trio.run(fn, clock=MockClock(autojump_threshold=0))


class Counted:
    """An async fetch that counts its executions and takes a while."""

    def __init__(self, value="value", error: BaseException | None = None, delay: float = 1.0):
        self.calls = 0
        self.value, self.error, self.delay = value, error, delay

    async def __call__(self):
        self.calls += 1
        await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return f"{self.value}-{self.calls}"


def test_concurrent_callers_share_one_execution():
    async def main():
        flights = SingleFlight()
        fetch = Counted()
        results = []

        async def call():
            results.append(await flights.do("k", fetch))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(call)
            await wait_all_tasks_blocked()
            assert "k" in flights and len(flights) == 1
        assert fetch.calls == 1
        assert sorted(results) == [("value-1", False)] + [("value-1", True)] * 9
        assert "k" not in flights and len(flights) == 0

        # Nothing is cached: a later call runs again.
        assert await flights.do("k", fetch) == ("value-2", False)

    run(main)


def test_different_keys_run_separately():
    async def main():
        flights = SingleFlight()
        fetches = {k: Counted(k) for k in "abc"}
        results = {}

        async def call(k):
            results[k] = await flights.do(k, fetches[k])

        async with trio.open_nursery() as nursery:
            for k in "abc":
                nursery.start_soon(call, k)
        assert results == {k: (f"{k}-1", False) for k in "abc"}
        assert all(f.calls == 1 for f in fetches.values())

    run(main)


def test_errors_propagate_to_all_waiters():
    async def main():
        flights = SingleFlight()
        fetch = Counted(error=ValueError("boom"))
        errors = []

        async def call():
            with pytest.raises(ValueError, match="boom") as info:
                await flights.do("k", fetch)
            errors.append(info.value)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(call)
        assert fetch.calls == 1 and len(errors) == 5
        assert len(flights) == 0
        # The failure is not remembered.
        fetch.error = None
        assert await flights.do("k", fetch) == ("value-2", False)

    run(main)


def test_cancelled_leader_does_not_fail_waiters():
    async def main():
        flights = SingleFlight()
        fetch = Counted()
        results = []
        leader_scope = trio.CancelScope()

        async def leader():
            with leader_scope:
                await flights.do("k", fetch)
            assert leader_scope.cancelled_caught

        async def waiter():
            results.append(await flights.do("k", fetch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await wait_all_tasks_blocked()
            for _ in range(3):
                nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
            leader_scope.cancel()
        # One waiter took over and ran the fetch again; the others shared its result.
        assert fetch.calls == 2
        assert sorted(results) == [("value-2", False), ("value-2", True), ("value-2", True)]
        assert len(flights) == 0

    run(main)


def test_cancelled_waiter_does_not_disturb_the_others():
    async def main():
        flights = SingleFlight()
        fetch = Counted()
        results = []
        scope = trio.CancelScope()

        async def waiter(scope=None):
            with scope or trio.CancelScope():
                results.append(await flights.do("k", fetch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
            nursery.start_soon(waiter, scope)
            nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
            scope.cancel()
        assert fetch.calls == 1
        assert sorted(results) == [("value-1", False), ("value-1", True)]

    run(main)


def test_cancelled_leader_with_a_nursery_inside_does_not_fail_waiters():
    async def main():
        flights = SingleFlight()
        calls = 0

        async def fetch():  # e.g. a hedged or parallel fetch
            nonlocal calls
            calls += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 1)
                await trio.sleep(1)
            return "value"

        leader_scope = trio.CancelScope()
        outcome = []

        async def leader():
            with leader_scope:
                await flights.do("k", fetch)

        async def waiter():
            try:
                outcome.append(await flights.do("k", fetch))
            except BaseException as exc:  # noqa: BLE001 - record exactly what leaked
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leader)
            await wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await wait_all_tasks_blocked()
            leader_scope.cancel()
        assert outcome == [("value", False)], f"waiter got {outcome!r}"
        assert calls == 2

    run(main)
