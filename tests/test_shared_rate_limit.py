"""The rate limit's buckets in a shared file: two ``SharedBuckets`` on one file stand for two
workers (the file and its lock are what they share); a clock the test moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.config import RateLimitConfig
from server import shared_rate_limit
from server.shared_rate_limit import SharedBuckets


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "rate-limit"
    SharedBuckets.create(path)
    return path


def test_two_workers_draw_from_one_bucket_and_it_refills(table: Path) -> None:
    now = [100.0]
    config = RateLimitConfig(requests_per_minute=60, burst=3)  # a token a second
    first, second = (SharedBuckets(table, config, clock=lambda: now[0]) for _ in range(2))
    assert [first.check("key:a"), second.check("key:a"), first.check("key:a")] == [0, 0, 0]
    assert second.check("key:a") == pytest.approx(1.0)
    assert first.check("key:b") == 0  # another identity, its own bucket
    now[0] += 1.0
    assert second.check("key:a") == 0 and first.check("key:a") == pytest.approx(1.0)
    now[0] += 60.0  # refilled to the burst, never above it
    assert [second.check("key:a") for _ in range(4)][-1] == pytest.approx(1.0)


def test_a_full_probe_window_gives_its_stalest_slot_to_the_newcomer(
    table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_rate_limit, "SLOTS", shared_rate_limit.PROBE)  # one window
    now = [0.0]
    buckets = SharedBuckets(table, RateLimitConfig(requests_per_minute=1, burst=1),
                            clock=lambda: now[0])
    for number in range(shared_rate_limit.PROBE):  # fills every slot, oldest first
        now[0] += 1
        assert buckets.check(f"addr:{number}") == 0
    now[0] += 1
    assert buckets.check("addr:new") == 0  # took addr:0's slot
    assert buckets.check("addr:1") > 0  # still counted
    assert buckets.check("addr:0") == 0  # forgotten: a fresh bucket


def test_the_table_is_private_to_its_user(table: Path) -> None:
    assert table.stat().st_mode & 0o777 == 0o600
    assert table.stat().st_size == shared_rate_limit.SLOTS * 32
