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


# Deterministic examples: the moved fraction is checked on sampled keys (binomial noise),
# so a fixed set of examples keeps CI stable.
@settings(max_examples=10, deadline=None, derandomize=True)
@given(n=st.integers(3, 50), data=st.data())
def test_adding_a_worker_moves_only_its_keys(n, data):
    workers = data.draw(st.lists(st.sampled_from(POOL), min_size=n + 1, max_size=n + 1, unique=True))
    old, new = workers[:n], workers[n]
    ring = HashRing(old)
    sample = KEYS[:8000]
    before = [ring.owner(k) for k in sample]

    ring.add(new)
    after = [ring.owner(k) for k in sample]
    moved = [k for k, b, a in zip(sample, before, after) if b != a]
    assert all(a == new for b, a in zip(before, after) if b != a), "a key moved between old workers"
    assert all(a == new for a in after if a not in old)
    share = len(moved) / len(sample)
    assert share <= 1.3 / (n + 1), f"{share:.4f} of keys moved, expected about {1 / (n + 1):.4f}"
    assert share >= 0.6 / (n + 1), f"only {share:.4f} of keys moved, expected about {1 / (n + 1):.4f}"


def exact_shares(ring: HashRing) -> dict[str, float]:
    """Fraction of all keys each worker owns, computed exactly from the ring's points.

    A key goes to the worker whose point is nearest (clockwise) to any of its k probes.
    With d(x) the distance from x to its successor and F(t) the fraction of the ring
    where d < t, the nearest probe's distance exceeds t with probability (1 - F(t))^k,
    and a worker wins at distance t in proportion to how many of its arcs are longer
    than t. Between two consecutive arc lengths F is linear, so the integral is exact:
    share(w) = sum over intervals of n_w * ((1 - F0)^k - (1 - F1)^k) / m, where m arcs
    are longer than t there and n_w of them are w's.
    """
    points = list(ring._points.items())
    arcs = sorted((((point - points[i - 1][0]) % (1 << 64) or (1 << 64)) / (1 << 64), worker)
                  for i, (point, worker) in enumerate(points))
    k, total = ring.probes, len(arcs)
    shares = dict.fromkeys(ring.workers, 0.0)
    below = previous = running = 0.0  # arcs shorter than t; the last length; sum so far
    for j, (length, worker) in enumerate(arcs):
        m = total - j
        f0, f1 = below + previous * m, below + length * m
        running += ((1 - f0) ** k - max(0.0, 1 - f1) ** k) / m
        shares[worker] += running  # arc j counts in every interval up to its own length
        below += length
        previous = length
    return shares


def _balance(ring: HashRing) -> tuple[float, float]:
    shares = exact_shares(ring)
    n = len(ring)
    return min(shares.values()) * n, max(shares.values()) * n


# Measured (exact shares, DEFAULT_VNODES=160, DEFAULT_PROBES=12), worst over the id sets
# tried: 10 workers ±4.2%, 100 workers ±5.5%, 1000 workers ±6.4%. One probe (the plain
# ring) gave 1.16, 1.23 and 1.26 max/mean.
@pytest.mark.parametrize("n, examples", [(10, 10), (100, 5), (1000, 2)])
def test_load_within_ten_percent_of_the_mean(n, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(salt=st.text("abcdefghij", min_size=1, max_size=8))
    def check(salt):
        ring = HashRing(_ids(n, salt))
        shares = exact_shares(ring)
        assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
        low, high = min(shares.values()) * n, max(shares.values()) * n
        assert 0.9 <= low and high <= 1.1, f"load {low:.3f}..{high:.3f} of the mean at {n} workers"

    check()


def test_exact_shares_match_real_keys():
    """The formula above is what lookups do: sampled keys follow the computed shares."""
    ring = HashRing(_ids(20))
    shares = exact_shares(ring)
    count = 60_000
    counts = dict.fromkeys(ring.workers, 0)
    for i in range(count):
        counts[ring.owner(f"s3://bucket/data/shard-{i:06d}.parquet")] += 1
    for worker, share in shares.items():
        expected = count * share
        assert abs(counts[worker] - expected) <= 5 * math.sqrt(expected) + 1
    # And one probe reduces to the plain ring: each worker owns the arcs ending at its points.
    plain = HashRing(_ids(20), probes=1)
    arcs = dict.fromkeys(plain.workers, 0)
    points = list(plain._points.items())
    for i, (point, worker) in enumerate(points):
        arcs[worker] += (point - points[i - 1][0]) % (1 << 64)
    for worker, share in exact_shares(plain).items():
        assert math.isclose(share, arcs[worker] / (1 << 64), rel_tol=1e-6)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(n=st.sampled_from([10, 30, 100]), salt=st.text("xyz", min_size=1, max_size=4), data=st.data())
def test_adding_or_removing_one_worker_moves_at_most_1_1_over_n(n, salt, data):
    workers = _ids(n + 1, salt)
    ring = HashRing(workers[:n])
    grown = HashRing(workers)
    # Adding: only the new worker's keys move, and they are its exact share.
    added = exact_shares(grown)[workers[n]]
    assert added <= 1.1 / n, f"adding one worker to {n} moves {added:.4f} of keys"
    # Removing any one of the N: only its keys move.
    gone = data.draw(st.sampled_from(workers[:n]))
    removed = exact_shares(ring)[gone]
    assert removed <= 1.1 / n, f"removing one of {n} workers moves {removed:.4f} of keys"
    sample = KEYS[:3000]
    before = [ring.owner(k) for k in sample]
    after = [grown.owner(k) for k in sample]
    assert all(a == workers[n] for b, a in zip(before, after) if a != b)
    shrunk = HashRing([w for w in workers[:n] if w != gone])
    assert all(b == gone for b, s in zip(before, (shrunk.owner(k) for k in sample)) if b != s)


@settings(max_examples=60, deadline=None)
@given(workers=worker_sets, key=keys, data=st.data())
def test_removing_a_worker_deletes_it_from_every_candidate_list(workers, key, data):
    """The fallback for a departed owner is the candidate that served during failover."""
    ring = HashRing(workers)
    gone = data.draw(st.sampled_from(workers))
    rest = HashRing([w for w in workers if w != gone])
    assert rest.candidates(key) == [w for w in ring.candidates(key) if w != gone]


def test_empty_ring():
    ring = HashRing()
    assert len(ring) == 0
    assert ring.candidates("anything") == []
    assert ring.candidates("anything", 3) == []
    assert ring.owner("anything") is None


def test_single_worker_owns_everything():
    ring = HashRing(["only"])
    assert {ring.owner(k) for k in KEYS[:1000]} == {"only"}
    assert ring.candidates("x", 5) == ["only"]
