"""Node limits: the per-source counter (pure), the backend's budget and queue rules, the CLI's flags."""

from __future__ import annotations

import pytest

from node.limits import SourceLimit, source_key
from swarm.errors import Busy


# --- SourceLimit (pure) ---------------------------------------------------------------


def test_a_source_at_its_limit_is_busy_and_others_are_not():
    limit = SourceLimit(2, "sessions")
    a1, a2 = limit.acquire("10.0.0.1"), limit.acquire("10.0.0.1")
    with pytest.raises(Busy, match="too many sessions from 10.0.0.1: the limit is 2"):
        limit.acquire("10.0.0.1")
    b = limit.acquire("10.0.0.2")
    assert (limit.count("10.0.0.1"), limit.count("10.0.0.2"), limit.total, len(limit)) == (2, 1, 3, 2)
    a1.release()
    limit.acquire("10.0.0.1")  # room again
    a2.release(), b.release()


def test_counts_vanish_at_zero_so_strangers_leave_nothing_behind():
    limit = SourceLimit(1, "connections")
    for n in range(1000):
        with limit.acquire(f"10.0.{n // 256}.{n % 256}"):
            pass
    assert len(limit) == 0 and limit.total == 0


def test_release_is_idempotent_per_hold():
    limit = SourceLimit(3, "forwards")
    held = limit.acquire("s")
    other = limit.acquire("s")
    held.release()
    held.release()  # a second close path must not free someone else's hold
    assert limit.count("s") == 1 and held.released and not other.released
    with other:
        pass
    assert limit.count("s") == 0
    with pytest.raises(ValueError):
        limit.release("s")  # releasing what nobody holds is our bug, loudly


def test_a_hold_is_released_when_the_block_raises():
    limit = SourceLimit(1, "forwards")
    with pytest.raises(RuntimeError):
        with limit.acquire("s"):
            raise RuntimeError("boom")
    assert limit.count("s") == 0


def test_zero_means_no_limit_and_negative_is_refused():
    limit = SourceLimit(0, "connections")
    holds = [limit.acquire("s") for _ in range(100)]
    assert limit.count("s") == 100
    for held in holds:
        held.release()
    with pytest.raises(ValueError):
        SourceLimit(-1, "connections")


@pytest.mark.parametrize(
    "address, key",
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: the same source
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_key(address, key):
    assert source_key(address) == key
