"""The mount's status memo (dorafs/client/statuses.py): how long a status is kept."""

from __future__ import annotations

import math

from dorafs.client.statuses import StatusMemo
from dorafs.ufs import FileStatus

F = FileStatus(name="f", is_dir=False, size=3, version="v1")


def kept_for(memo: StatusMemo, age: float | None, *, now: float = 100.0) -> float:
    """How long `memo` keeps a status `age` seconds old (0 if not at all), to 0.01 s."""
    memo.put("s3://b/f", F, age, now)
    if memo.get("s3://b/f", now) is None:
        return 0.0
    if memo.get("s3://b/f", now + 1e6) is not None:
        return math.inf
    memo.put("s3://b/f", F, age, now)
    low, high = 0.0, 1e6
    while high - low > 0.01:
        mid = (low + high) / 2
        memo.put("s3://b/f", F, age, now)
        if memo.get("s3://b/f", now + mid) is None:
            high = mid
        else:
            low = mid
    return low


def test_a_status_is_kept_until_the_status_ttl_counted_from_the_ufs_read():
    assert abs(kept_for(StatusMemo(10, None), 0) - 10) < 0.02
    assert abs(kept_for(StatusMemo(10, None), 7) - 3) < 0.02  # the worker read it 7 s ago
    assert kept_for(StatusMemo(10, None), 12) == 0  # already older than the mount trusts


def test_attr_timeout_caps_how_long_a_status_is_kept():
    assert abs(kept_for(StatusMemo(300, 1), 0) - 1) < 0.02
    assert abs(kept_for(StatusMemo(-1, 2), 1e9) - 2) < 0.02  # never recheck the UFS, but the kernel asks again
    assert kept_for(StatusMemo(-1, None), 1e9) == math.inf


def test_nothing_is_kept_with_a_zero_ttl_or_an_unknown_age():
    assert kept_for(StatusMemo(0, None), 0) == 0
    assert kept_for(StatusMemo(300, 0), 0) == 0
    assert kept_for(StatusMemo(300, None), None) == 0  # a worker that does not say how old it is


def test_forget_drops_a_path_and_on_request_everything_under_it():
    memo = StatusMemo(300, None)
    for uri in ("s3://b/d", "s3://b/d/x", "s3://b/d/sub/y", "s3://b/dx", "s3://b/e"):
        memo.put(uri, F, 0, 0)
    memo.forget("s3://b/e")
    assert memo.get("s3://b/e", 1) is None and memo.get("s3://b/d/x", 1) is F
    memo.forget("s3://b/d", recursive=True)
    assert [u for u in ("s3://b/d", "s3://b/d/x", "s3://b/d/sub/y", "s3://b/dx") if memo.get(u, 1)] == ["s3://b/dx"]


def test_the_least_recently_used_status_goes_first_past_the_bound():
    memo = StatusMemo(300, None, max_entries=3)
    for name in "abc":
        memo.put(f"s3://b/{name}", F, 0, 0)
    assert memo.get("s3://b/a", 1) is F  # a is now the most recent
    memo.put("s3://b/d", F, 0, 0)
    assert len(memo) == 3 and memo.get("s3://b/b", 1) is None and memo.get("s3://b/a", 1) is F
