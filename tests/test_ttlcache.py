"""In-process tests of the TTL + LRU metadata cache (dorafs/ttlcache.py)."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from dorafs.ttlcache import MISSING, TtlCache


def run(fn):
    clock = MockClock()
    trio.run(fn, clock, clock=clock)


def test_entries_expire_after_their_ttl():
    async def main(clock):
        cache = TtlCache(10)
        cache.put("a", 1, 10.0)
        cache.put("b", 2, 2.0)
        assert cache.get("a") == 1 and cache.get("b") == 2
        clock.jump(1.9)
        assert cache.get("b") == 2
        clock.jump(0.2)
        assert cache.get("b") is MISSING
        assert len(cache) == 1  # the expired entry is gone, not just hidden
        assert cache.get("a") == 1
        clock.jump(8.0)
        assert cache.get("a") is MISSING
        assert len(cache) == 0

    run(main)


def test_put_again_renews_the_ttl():
    async def main(clock):
        cache = TtlCache(10)
        cache.put("k", "old", 5.0)
        clock.jump(4.0)
        cache.put("k", "new", 5.0)
        clock.jump(4.0)
        assert cache.get("k") == "new"
        clock.jump(1.5)
        assert cache.get("k") is MISSING

    run(main)


def test_zero_ttl_never_stores_and_removes_an_old_value():
    async def main(clock):
        cache = TtlCache(10)
        cache.put("k", 1, 0)
        assert cache.get("k") is MISSING and len(cache) == 0
        cache.put("k", 1, 10)
        cache.put("k", 2, 0)  # "do not cache" must not leave the stale value behind
        assert cache.get("k") is MISSING and len(cache) == 0

    run(main)


def test_negative_ttl_never_expires():
    async def main(clock):
        cache = TtlCache(10)
        cache.put("k", "forever", -1)
        clock.jump(10**9)
        assert cache.get("k") == "forever"

    run(main)


def test_falsy_values_are_cached():
    async def main(clock):
        cache = TtlCache(10)
        for i, value in enumerate([None, 0, "", [], False]):
            cache.put(i, value, 5)
            assert cache.get(i) == value and cache.get(i) is not MISSING

    run(main)


def test_lru_bound():
    async def main(clock):
        cache = TtlCache(3)
        for k in "abc":
            cache.put(k, k.upper(), 100)
        assert cache.get("a") == "A"  # b is now the least recently used
        cache.put("d", "D", 100)
        assert len(cache) == 3
        assert cache.get("b") is MISSING
        assert [cache.get(k) for k in "acd"] == ["A", "C", "D"]
        cache.put("c", "C2", 100)  # updating moves to the recent end: a is the oldest now
        cache.put("e", "E", 100)
        assert cache.get("a") is MISSING
        assert [cache.get(k) for k in "cde"] == ["C2", "D", "E"]
        for i in range(100):
            cache.put(i, i, -1)
            assert len(cache) <= 3

    run(main)


def test_pop():
    async def main(clock):
        cache = TtlCache(3)
        cache.put("k", 1, 10)
        cache.pop("k")
        cache.pop("missing")
        assert cache.get("k") is MISSING and len(cache) == 0

    run(main)


def test_works_outside_trio():
    cache = TtlCache(2)
    cache.put("k", 1, 60)
    assert cache.get("k") == 1
    cache.put("k", 1, 0)
    assert cache.get("k") is MISSING
