"""Generation survives a hop that dies (SIGKILL) or leaves (SIGTERM) mid-way, with a replica alive."""

from __future__ import annotations

import asyncio

import pytest

from client.generate import SamplingParams
from client.swarm import ClientConfig, SwarmModel
from swarm.model import DEFAULT_MODEL
from tests.nodes import refresh, start_swarm, stop_nodes

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    bootstrap, nodes = start_swarm(tmp_path_factory.mktemp("failover"), ["0:10", "10:20", "10:20", "10:20", "20:30"])
    yield bootstrap, nodes
    stop_nodes([bootstrap, *nodes])


@pytest.fixture(scope="module")
def client(swarm):
    bootstrap, _ = swarm
    return SwarmModel(DEFAULT_MODEL, bootstrap=[bootstrap.url], config=ClientConfig(wire_dtype="float32"))


@pytest.fixture(scope="module")
def baseline(client):
    ids = client.head.encode_prompt(PROMPT, chat=True)
    return asyncio.run(_generate(client, ids, None, None)).token_ids


async def _generate(client, ids, route, after_10_tokens):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    stats = None
    async for _, stats, _ in client.stream_result(ids, params, route):
        if after_10_tokens is not None and len(stats.token_ids) == 10:
            after_10_tokens()
    return stats


def _route_via(client, nodes, middle):
    asyncio.run(refresh(client))
    others = frozenset(n.peer_id for n in nodes if n.blocks == (10, 20) and n is not middle)
    route = client.plan(exclude=others)
    assert middle.peer_id in route.peers
    return route


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_middle_hop_lost_mid_generation(client, swarm, baseline, how):
    _, nodes = swarm
    middles = [n for n in nodes if n.blocks == (10, 20) and n.proc.poll() is None]
    middle = middles[0]
    route = _route_via(client, nodes, middle)
    ids = client.head.encode_prompt(PROMPT, chat=True)
    lose = middle.kill if how == "sigkill" else (lambda: middle.proc.send_signal(15))
    stats = asyncio.run(_generate(client, ids, route, lose))
    assert stats.token_ids == baseline
    assert stats.failovers, "the route should have changed"
    stall = sum(seconds for _, seconds in stats.failovers)
    print(f"{how}: {len(stats.failovers)} failover(s), generation stalled {stall:.3f} s")
    if how == "sigterm":
        assert middle.proc.wait(60) == 0
