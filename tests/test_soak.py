"""A short soak on every CI run: clients generate without pause while nodes are killed and restarted.

The full-length soak (8 clients, 2 minutes, a kill every 20 s) is
`benchmarks/soak.py`; this one keeps its shape at CI scale: 4 clients for 45 s
and a kill every 10 s, so every process of the five gets time to fail over.
"""

from __future__ import annotations

import asyncio

from tests.soak import soak


def test_no_request_fails_while_nodes_are_killed_and_restarted(tmp_path):
    report = asyncio.run(soak(tmp_path, seconds=45, clients=4, kill_every=10, new_tokens=12, say=lambda _: None))
    assert report.failed == [], report.failed[:3]
    assert report.kills >= 3
    assert report.done >= 4 * report.kills, "clients must keep getting answers between kills"
    assert report.failovers, "killing nodes under load should have moved sessions"
    # memory: no node grew by more than its own model once again (restarts start from scratch)
    assert max(report.growth.values()) < 300 * 2**20, report.growth
    print(f"soak: {report.done} requests, 0 failed, {report.kills} kills, failovers {dict(report.failovers)}")
