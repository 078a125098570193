"""In-process tests of the consistent-hash ring (dorafs/ring.py)."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dorafs.ring import HashRing

# Worker ids as the worker makes them (16 hex chars), but reproducible.
def _ids(n: int, salt: str = "worker") -> list[str]:
    return [hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()[:16] for i in range(n)]


POOL = _ids(60)
KEYS = [f"s3://bucket/data/shard-{i:06d}.parquet" for i in range(20_000)]

# Arbitrary ids for structural properties (no lone surrogates: ids are UTF-8 encoded).
worker_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
worker_sets = st.lists(worker_names, min_size=1, max_size=12, unique=True)
keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(workers=worker_sets, key=keys)
def test_candidates_distinct_complete_and_led_by_owner(workers, key):
    ring = HashRing(workers)
    found = ring.candidates(key)
    assert len(found) == len(set(found)) == len(workers)
    assert set(found) == set(workers)
    assert found[0] == ring.owner(key)
    for limit in range(len(workers) + 2):
        assert ring.candidates(key, limit) == found[:limit]


@settings(max_examples=50, deadline=None)
@given(data=st.data(), workers=worker_sets, key_list=st.lists(keys, min_size=1, max_size=20))
def test_stable_across_rebuilds_in_any_order(data, workers, key_list):
    ring = HashRing(workers)
    shuffled = data.draw(st.permutations(workers))
    rebuilt = HashRing()
    for worker in shuffled:
        rebuilt.add(worker)
        rebuilt.add(worker)  # adding twice is a no-op
    assert rebuilt.workers == ring.workers
    for key in key_list:
        assert rebuilt.candidates(key) == ring.candidates(key)
        assert rebuilt.owner(key) == ring.owner(key)


# Deterministic examples: this is a statistical bound (the new worker's share has a
# relative spread of ~1/sqrt(vnodes) ~ 8%), so a fixed set of examples keeps CI stable.
@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(3, 50), data=st.data())
def test_adding_a_worker_moves_only_its_keys_and_removing_restores(n, data):
    workers = data.draw(st.lists(st.sampled_from(POOL), min_size=n + 1, max_size=n + 1, unique=True))
    old, new = workers[:n], workers[n]
    ring = HashRing(old)
    before = [ring.owner(k) for k in KEYS]

    ring.add(new)
    after = [ring.owner(k) for k in KEYS]
    moved = [k for k, b, a in zip(KEYS, before, after) if b != a]
    assert all(a == new for b, a in zip(before, after) if b != a), "a key moved between old workers"
    assert all(a == new for a in after if a not in old)
    share = len(moved) / len(KEYS)
    assert share <= 1.3 / (n + 1), f"{share:.4f} of keys moved, expected about {1 / (n + 1):.4f}"
    assert share >= 0.6 / (n + 1), f"only {share:.4f} of keys moved, expected about {1 / (n + 1):.4f}"

    ring.remove(new)
    assert [ring.owner(k) for k in KEYS] == before
    ring.remove(new)  # removing twice is a no-op
    assert len(ring) == n


def _exact_shares(ring: HashRing) -> dict[str, float]:
    """Fraction of the 64-bit ring each worker owns: a point owns the arc (previous, point]."""
    points = list(ring._points.items())
    size = 1 << 64
    shares = dict.fromkeys(ring.workers, 0)
    for i, (point, worker) in enumerate(points):
        shares[worker] += (point - points[i - 1][0]) % size
    return {w: s / size for w, s in shares.items()}


# Measured with these ids (_ids(n)), DEFAULT_VNODES = 160:
#   10 workers: max/mean 1.159 (min/mean 0.898); 100,000 keys give 1.157
#  100 workers: max/mean 1.230 (min/mean 0.795); 100,000 keys give 1.262 (sampling noise)
# Over 100 random id sets: 10 workers median 1.13, worst 1.23; 100 workers median 1.21,
# p90 1.27, worst 1.36 (17% of id sets exceed 1.25); 1000 workers median 1.27.
@pytest.mark.parametrize("n", [10, 100])
def test_load_balance(n):
    ring = HashRing(_ids(n))
    shares = _exact_shares(ring)
    assert math.isclose(sum(shares.values()), 1.0)
    ratio = max(shares.values()) * n
    assert ratio <= 1.25, f"max/mean load {ratio:.3f} at {n} workers"

    # Real keys follow the arcs: each worker's key count is within binomial noise of its share.
    count = 100_000
    counts = dict.fromkeys(ring.workers, 0)
    for i in range(count):
        counts[ring.owner(f"s3://bucket/data/shard-{i:06d}.parquet")] += 1
    for worker, share in shares.items():
        expected = count * share
        assert abs(counts[worker] - expected) <= 5 * math.sqrt(expected) + 1


def test_empty_ring():
    ring = HashRing()
    assert len(ring) == 0
    assert ring.candidates("anything") == []
    assert ring.candidates("anything", 3) == []
    assert ring.owner("anything") is None
    ring.add("a")
    ring.remove("a")
    assert ring.candidates("anything") == [] and ring.owner("anything") is None
    assert len(ring._points) == 0


def test_single_worker_owns_everything():
    ring = HashRing(["only"])
    assert {ring.owner(k) for k in KEYS[:1000]} == {"only"}
    assert ring.candidates("x", 5) == ["only"]
