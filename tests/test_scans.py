"""Listing a directory ahead of a scan (dorafs/scans.py), in-process."""

from __future__ import annotations

import trio
import trio.testing

from dorafs.scans import ListingPrefetch


def run(test) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_eight_misses_in_one_directory_list_it_once():
    async def main():
        listed = []

        async def fetch(directory: str) -> None:
            await trio.sleep(1)
            listed.append(directory)

        scans = ListingPrefetch(fetch)
        async with trio.open_nursery() as nursery:
            for _ in range(7):
                scans.miss("s3://b/d", nursery)
                scans.miss("s3://b/e", nursery)
            await trio.sleep(5)
            assert listed == []  # seven misses each: not yet a scan
            scans.miss("s3://b/d", nursery)
            for _ in range(8):  # while it is being listed, more misses start nothing
                scans.miss("s3://b/d", nursery)
        assert listed == ["s3://b/d"] and scans.started == 1

    run(main)


def test_listings_run_two_at_a_time_and_a_failure_is_only_logged():
    async def main():
        running, most = 0, 0

        async def fetch(directory: str) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await trio.sleep(1)
            running -= 1
            raise OSError("the listing failed")

        scans = ListingPrefetch(fetch)
        async with trio.open_nursery() as nursery:
            for name in "abcd":
                for _ in range(8):
                    scans.miss(f"s3://b/{name}", nursery)
        assert most == 2 and scans.started == 2  # the other two were dropped, not queued

    run(main)


def test_again_after_lists_a_directory_at_most_once_in_that_time():
    async def main():
        listed = []

        async def fetch(directory: str) -> None:
            listed.append(trio.current_time())

        scans = ListingPrefetch(fetch, again_after=60)
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # a directory larger than a listing brings: misses go on
                for _ in range(8):
                    scans.miss("s3://b/huge", nursery)
                await trio.sleep(10)
            await trio.sleep(60)
            for _ in range(8):
                scans.miss("s3://b/huge", nursery)
        assert len(listed) == 2 and listed[1] - listed[0] >= 60

    run(main)


def test_one_entry_missed_again_and_again_is_one_miss_and_a_miss_can_wait_for_the_listing():
    """A mount stats its own root (or one file) over and over: that is not a scan of the
    directory above it. Two different entries are (after=2, as a mount counts); while
    the listing runs, `listing` hands out the event its end sets."""
    async def main():
        listed = []

        async def fetch(directory: str) -> None:
            await trio.sleep(1)
            listed.append(directory)

        scans = ListingPrefetch(fetch, after=2)
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                scans.miss("s3://b", nursery, "s3://b/root")
            await trio.sleep(5)
            assert listed == [] and scans.listing("s3://b") is None
            scans.miss("s3://b", nursery, "s3://b/other")
            running = scans.listing("s3://b")
            assert running is not None and not running.is_set()
            await running.wait()
            assert listed == ["s3://b"] and scans.listing("s3://b") is None
        assert scans.started == 1

    run(main)
