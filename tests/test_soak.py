"""A short soak on every CI run: clients generate without pause while nodes are killed and restarted.

The full-length soak (8 clients, a kill every 20 s) is `benchmarks/soak.py`;
this one keeps its shape at CI scale: 4 clients and 3 kills. Kills are counted,
not timed: each comes at least 5 s after the previous one and only once the
clients have completed 4 requests since the node before it came back, so a slow
machine makes the run longer (up to a generous bound), never fewer kills.
"""

from __future__ import annotations

import asyncio

from tests.soak import soak

KILLS = 3


def test_no_request_fails_while_nodes_are_killed_and_restarted(tmp_path):
    report = asyncio.run(soak(tmp_path, kills=KILLS, clients=4, new_tokens=12, kill_every=5.0, settle=4, max_seconds=400, say=lambda _: None))
    assert not report.timed_out, f"only {report.kills} of {KILLS} kills with requests after each in 400 s ({report.done} requests)"
    assert report.failed == [], report.failed[:3]
    assert report.kills == KILLS
    assert report.done >= 4 * (KILLS + 1), "clients must keep getting answers between kills"
    assert report.failovers, "killing nodes under load should have moved sessions"
    # memory: no node grew by more than its own model once again (restarts start from scratch)
    assert max(report.growth.values()) < 300 * 2**20, report.growth
    print(f"soak: {report.done} requests in {report.seconds:.0f} s, 0 failed, {report.kills} kills, failovers {dict(report.failovers)}")
