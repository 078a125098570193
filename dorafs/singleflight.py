"""Single-flight: concurrent calls for one key share one execution and its outcome."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio


class _Flight:
    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class SingleFlight:
    def __init__(self):
        self._flights: dict[Hashable, _Flight] = {}
        self.contains = self._flights.__contains__  # `key in flights` without a Python frame (hot paths)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Run `fn` once for `key`; returns (value, shared) where shared means we waited.

        If the leader is cancelled, a waiter takes over rather than inheriting the
        cancellation, so one cancelled reader never fails the others.
        """
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if _is_cancellation(flight.error):
                continue
            if flight.error is not None:
                raise flight.error
            return flight.value, True
        flight = self._flights[key] = _Flight()
        try:
            flight.value = await fn()
            return flight.value, False
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()


def _is_cancellation(error: BaseException | None) -> bool:
    """The leader was cancelled (possibly inside a nursery of its own), not failed."""
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):  # trio.MultiError is one too
        return any(_is_cancellation(e) for e in error.exceptions)
    return False
