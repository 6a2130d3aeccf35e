"""Generation survives a hop that dies (SIGKILL) or leaves (SIGTERM) mid-way, with a replica alive."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from client.generate import SamplingParams
from tests.netns import Lines
from tests.nodes import module_swarm, refresh, start_nodes, stop_nodes

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 64


swarm = module_swarm("failover", ["0:10", "10:20", "10:20", "10:20", "20:30"])  # `client` (conftest) is a float32-wire SwarmModel on it


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


def test_cut_link_mid_generation_fails_over_by_deadline(lan_factory, tmp_path, head, full_span):
    """Pull the cable of the middle hop: no error arrives, the step deadline fires, the session moves."""
    lan = lan_factory(5)
    home, a, b1, b2, c = lan.hosts
    nodes = []

    def node(host, *args):
        found = start_nodes([["--host", host.address, "--gossip-period", "0.5", *args]], tmp_path / host.namespace, prefix=["ip", "netns", "exec", host.namespace])
        nodes.extend(found)
        return found[0]

    try:
        bootstrap = node(home, "--no-model")
        node(a, "--blocks", "0:10", "--bootstrap", bootstrap.url)
        middle = node(b1, "--blocks", "10:20", "--bootstrap", bootstrap.url)
        spare = node(b2, "--blocks", "10:20", "--bootstrap", bootstrap.url)
        node(c, "--blocks", "20:30", "--bootstrap", bootstrap.url)
        client = lan.run_in(home, [sys.executable, "-m", "tests.failover_client", bootstrap.url, spare.peer_id, str(NEW_TOKENS)], stderr=subprocess.STDOUT)
        lines = Lines(client.stdout)
        assert middle.peer_id[:8] in lines.expect(lambda line: line.startswith("route "), 120)
        lines.expect(lambda line: line == "token 10", 120)
        lan.link_down(b1)
        result = json.loads(lines.expect(lambda line: line.startswith("{"), 120))
        assert client.wait(30) == 0
    finally:
        stop_nodes(nodes)
    ids = head.encode_prompt(PROMPT, chat=True)
    local = asyncio.run(_local(head, full_span, ids))
    assert result["tokens"] == local
    assert result["failovers"], "the deadline should have moved the session"
    print(f"link cut: failovers {result['failovers']}")


async def _local(head, span, ids):
    from client.generate import GenerationStats, LocalBlocks, stream_tokens

    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    async for _ in stream_tokens(head, LocalBlocks(span, len(ids) + NEW_TOKENS), ids, params, stats):
        pass
    return stats.token_ids
