"""Mixed routes: a bfloat16 node next to a float32 node, against the all-float32 reference.

The CPU stand-in for a GPU node (bf16) next to a CPU node (float32): the hops
convert at the wire (a node casts what arrives to its own dtype and what leaves to
the session's wire dtype), so nothing in a route depends on its hops agreeing on a
dtype. One module-scoped swarm: a bootstrap peer, [0,15) in bf16 and [15,30) in
float32, and [0,15) in float32 and [15,30) in bf16.

The measure: bf16 compute rounds every block's activations, so the hidden states
differ from float32's by a few percent (relative RMS per token) after 15 blocks;
that is checked within a stated tolerance, and the greedy text of short prompts
is compared with float32's token by token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from client.generate import GenerationStats, LocalBlocks, stream_tokens_sync
from client.sampling import SamplingParams
from client.session import RemoteHop, RouteSession, SessionConfig
from swarm.model import Segment
from swarm.seal import TOLERANCE, difference
from swarm.transport import Transport
from tests.nodes import refresh, reserve_url, start_nodes, stop_nodes, swarm_client

PROMPTS = ["What is the capital of France?", "Name three colors."]
NEW_TOKENS = 12
# bf16 compute over 15 of 30 blocks, float32 elsewhere: measured 0.03 (prompt rows) to 0.06 relative
# RMS error of the final hidden states against all-float32 (bf16 keeps 8 bits of mantissa: ~0.4% a
# rounding, over 15 blocks of residual updates). 0.15 leaves room for other prompts and CPUs.
HIDDEN_TOLERANCE = 0.15
NEAR_TIE = 1.0  # logits: where a mixed route's greedy text parts from float32's, float32's own margin was below this


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(bootstrap, {"bf16>f32": [a, b], "f32>bf16": [c, d]}) of started nodes."""
    tmp = tmp_path_factory.mktemp("mixed")
    period = ["--gossip-period", "0.5"]
    port, url = reserve_url()
    specs = [
        ["--blocks", "0:15", "--dtype", "bfloat16"],
        ["--blocks", "15:30"],
        ["--blocks", "0:15"],
        ["--blocks", "15:30", "--dtype", "bfloat16"],
    ]
    *nodes, bootstrap = start_nodes([*([*s, "--bootstrap", url, *period] for s in specs), ["--no-model", *port, *period]], tmp)
    yield bootstrap, {"bf16>f32": nodes[:2], "f32>bf16": nodes[2:]}
    stop_nodes([bootstrap, *nodes])


def _hops(nodes) -> list[RemoteHop]:
    return [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]


def _reference_hidden(full_span, x: torch.Tensor) -> torch.Tensor:
    return full_span(x, [Segment(full_span.new_cache(x.shape[0]), 0, x.shape[0])])


@pytest.mark.parametrize("order", ["bf16>f32", "f32>bf16"])
@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
def test_mixed_route_hidden_states_agree_with_float32(mixed, head, full_span, order, wire_dtype):
    """A prompt's hidden states through a bf16 hop and a float32 hop, then one more token: within
    HIDDEN_TOLERANCE of the all-float32 span on every row."""
    _, routes = mixed
    ids = head.encode_prompt(PROMPTS[0], chat=True)
    x = head.embed(ids)
    reference = _reference_hidden(full_span, x)
    transport = Transport(insecure_http=True)

    async def through_route() -> torch.Tensor:
        async with transport.client_session() as http:
            async with RouteSession(http, _hops(routes[order]), _digest(full_span), len(ids) + 1, SessionConfig(wire_dtype=wire_dtype), transport) as session:
                prompt = await session.forward(x[:-1], 0, output="all")
                last = await session.forward(x[-1:], len(ids) - 1)  # a one-token step after the prefill
                return torch.cat([prompt, last]).float()

    got = asyncio.run(through_route())
    error = difference(got, reference)
    print(f"{order}, {wire_dtype} wire: worst row's relative RMS error {error.error:.4f} (row {error.row} of {len(ids)})")
    assert error.error <= HIDDEN_TOLERANCE


_DIGEST: dict[str, str] = {}


def _digest(full_span) -> str:
    if not _DIGEST:
        from swarm.model import DEFAULT_MODEL, open_checkpoint

        with open_checkpoint(DEFAULT_MODEL) as checkpoint:
            _DIGEST["d"] = checkpoint.fingerprint().digest
    return _DIGEST["d"]


def _local_greedy(head, full_span, prompt: str) -> list[int]:
    ids = head.encode_prompt(prompt, chat=True)
    stats = GenerationStats()
    list(stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + NEW_TOKENS), ids, SamplingParams(max_new_tokens=NEW_TOKENS), stats))
    return stats.token_ids


def _logit_gap(head, full_span, ids: list[int], better: int, worse: int) -> float:
    """How far float32 ranks token `better` above `worse` after `ids` (logits, all-float32 local)."""
    hidden = _reference_hidden(full_span, head.embed(ids))
    logits = head.logits(hidden[-1:])[0]
    return float(logits[better] - logits[worse])


@pytest.mark.parametrize("order", ["bf16>f32", "f32>bf16"])
def test_mixed_route_greedy_text_follows_float32(mixed, head, full_span, order):
    """Greedy tokens of short prompts through the mixed route (the planner choosing among its hops,
    whatever their dtypes) equal all-float32 local generation, up to a near tie: where they part,
    float32 itself ranks its own pick above the mixed route's by less than NEAR_TIE logits, so bf16
    rounding, not a broken conversion, made the difference (a wrong conversion gives garbage)."""
    bootstrap, routes = mixed
    client = swarm_client(bootstrap.url, wire_dtype="float32")
    asyncio.run(refresh(client))
    mine = {n.peer_id for n in routes[order]}
    others = frozenset(n.peer_id for nodes in routes.values() for n in nodes if n.peer_id not in mine)
    route = client.plan(exclude=others)
    assert set(route.peers) == mine
    agree, gaps = [], []
    for prompt in PROMPTS:
        tokens = asyncio.run(client.agenerate(prompt, route=route, max_new_tokens=NEW_TOKENS, verify=False)).stats.token_ids
        local = _local_greedy(head, full_span, prompt)
        parted = next((i for i, (a, b) in enumerate(zip(tokens, local)) if a != b), None)
        agree.append(NEW_TOKENS if parted is None else parted)
        if parted is not None:
            ids = head.encode_prompt(prompt, chat=True) + local[:parted]
            gaps.append(_logit_gap(head, full_span, ids, local[parted], tokens[parted]))
    print(f"{order}: greedy tokens equal to all-float32 for the first {agree} of {NEW_TOKENS}; float32 logit gaps where they part: {gaps}")
    assert all(0 <= gap < NEAR_TIE for gap in gaps), gaps


def test_verification_of_a_bf16_hop_against_a_float32_replica_agrees(mixed):
    """Verified outputs on a mixed swarm: each hop of the route is re-run on its replica of the
    other dtype, and an honest pair agrees: bf16 and float32 replicas differ by 1-3% over 15 blocks,
    far beyond the float32 wire's 1e-3, so the tolerance is the pair's precisions' (swarm/precision.py
    `tolerance`, from the precisions their records declare: 0.3 for 15 blocks)."""
    from client.swarm import ClientConfig
    from client.verify import Verdict

    bootstrap, routes = mixed
    mine = {n.peer_id for n in routes["bf16>f32"]}
    others = frozenset(n.peer_id for nodes in routes.values() for n in nodes if n.peer_id not in mine)
    outcomes = []
    for seed in (0, 1):  # the selector's seed picks which hop is checked: both, over the two seeds
        client = swarm_client(bootstrap.url, config=ClientConfig(wire_dtype="float32", verify_fraction=1.0, verify_seed=seed))
        asyncio.run(refresh(client))
        route = client.plan(exclude=others)
        outcomes.append(asyncio.run(client.agenerate(PROMPTS[1], route=route, max_new_tokens=4, verify=True)).stats.verification)
    print("mixed-pair verification: " + "; ".join(f"{o.hop}: {o.verdict.value}, error {o.error:.3g} (tolerance {o.tolerance:.2g})" for o in outcomes))
    assert all(o.verdict is Verdict.AGREE for o in outcomes), outcomes
    assert {o.peer_id for o in outcomes} == mine  # both hops were checked, each against its replica of the other dtype
    assert all(TOLERANCE["float32"] < o.tolerance for o in outcomes)
