"""node/court.py without a network: who is convicted on what evidence, what a false charge costs, the budgets.

The "blocks" here are a stand-in function (x -> 2x + 1); the accused seals its outputs
with a real `Transcript` and a real key, exactly as a node does.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from node.court import AccusationConfig, Barred, Court
from swarm import wire
from swarm.accusation import MAX_EVIDENCE_TOKENS, Accusation, Evidence, Verdict
from swarm.errors import BadRequest, Busy, NotPermitted, SignatureInvalid
from swarm.identity import Identity
from swarm.peers import PeerTable, TableConfig
from swarm.records import PeerRecord
from swarm.seal import Transcript, digest_of, seal_payload

MODEL = {"architecture": "llama", "shape": "30x8", "digest": "m" * 32}
BLOCKS = (10, 20)
NOW = 1_000_000.0
D = 8


def blocks(x: torch.Tensor) -> torch.Tensor:
    return 2 * x + 1


async def rerun(span: tuple[int, int], inputs: torch.Tensor) -> torch.Tensor:
    assert span == BLOCKS
    return blocks(inputs)


def sealed(hop: Identity, lie_at: int | None = None, steps: int = 4, dtype: str = "float32") -> Accusation:
    """A hop's sealed transcript of a prefill of 3 and `steps - 1` one-token steps; step `lie_at` is 1% off."""
    transcript = Transcript(MODEL["digest"], BLOCKS, "s1", hop.peer_id)
    generator = torch.Generator().manual_seed(1)
    evidence, position, seal = [], 0, b""
    for step in range(steps):
        x = torch.randn(3 if step == 0 else 1, D, generator=generator)
        y = blocks(x)
        if step == lie_at:
            y = y + 0.01 * y.pow(2).mean(-1, keepdim=True).sqrt() * torch.randn(y.shape, generator=generator)
        given, sent = wire.pack_tensor(x, dtype), wire.pack_tensor(y, dtype)
        given, sent = {**given, "data": bytes(given["data"])}, {**sent, "data": bytes(sent["data"])}
        seal = hop.sign(seal_payload(transcript.update(step, position, digest_of(x, dtype), digest_of(y, dtype))))
        evidence.append(Evidence(step, position, given, sent))
        position += x.shape[0]
    return Accusation(MODEL["digest"], BLOCKS, "s1", hop.public_key_bytes, tuple(evidence), seal)


def table_with(*peers: tuple[Identity, tuple[int, int]]) -> PeerTable:
    table = PeerTable(TableConfig(require_proof=True))
    for identity, span in peers:
        address = f"http://10.0.0.{len(table) + 1}:7000"
        record = PeerRecord.create(identity, addresses=[address], now=NOW, ttl=600, model=MODEL, num_layers=30, span=span)
        table.merge(record, NOW)
        assert table.settle(identity.peer_id, address, True, NOW)
    return table


def court(table: PeerTable | None = None, **config) -> Court:
    return Court(AccusationConfig(**config), Identity.generate(), table or PeerTable())


async def test_a_holder_convicts_a_sealed_lie_and_signs_its_verdict():
    liar, client = Identity.generate(), Identity.generate()
    table = table_with((liar, BLOCKS))
    judge = court(table)
    accusation = sealed(liar, lie_at=3).signed_by(client)
    case, forward = await judge.hear(accusation, None, NOW, rerun)
    assert case.convicted and forward and case.error > 0.005
    assert liar.peer_id not in table and judge.is_convicted(liar.peer_id, NOW)
    (verdict,) = case.verdict_list()
    assert verdict.judge == judge.identity.public_key_bytes and verdict.holds(accusation.digest())
    # barred from the table for conviction_s, and hearing it again neither re-runs nor forwards
    record = PeerRecord.create(liar, addresses=["http://10.0.0.9:7000"], now=NOW + 1, ttl=600, model=MODEL, num_layers=30, span=BLOCKS)
    assert not table.merge(record, NOW + 1) and table.refused["convicted"] == 1
    again, forward = await judge.hear(accusation, None, NOW, None)
    assert again is case and not forward
    assert not judge.is_convicted(liar.peer_id, NOW + AccusationConfig().conviction_s + 1)


async def test_honest_outputs_convict_nobody_and_bar_the_accuser():
    hop, client = Identity.generate(), Identity.generate()
    table = table_with((hop, BLOCKS))
    judge = court(table, false_accuser_s=60)
    case, forward = await judge.hear(sealed(hop).signed_by(client), None, NOW, rerun)
    assert case.acquitted and not case.convicted and not forward and case.error < 1e-6
    assert hop.peer_id in table
    with pytest.raises(NotPermitted):
        await judge.hear(sealed(hop, steps=2).signed_by(client), None, NOW + 1, rerun)
    case, _ = await judge.hear(sealed(hop, steps=2).signed_by(client), None, NOW + 61, rerun)  # the bar ends
    assert case.acquitted


def speculating(hop: Identity, steps: list[tuple[int, int]], lie: tuple[int, int] | None = None) -> Accusation:
    """A hop with causal blocks (row x = the sum of inputs 0..x) running `steps` (position, rows) as
    speculation sends them, its cache cut back at each step's position; `lie` = (step, row) is 1% off."""
    transcript = Transcript(MODEL["digest"], BLOCKS, "s2", hop.peer_id)
    generator = torch.Generator().manual_seed(2)
    cache, evidence, seal = torch.empty(0, D), [], b""
    for step, (position, rows) in enumerate(steps):
        x = torch.randn(rows, D, generator=generator)
        cache = torch.cat([cache[:position], x])
        y = cache.cumsum(0)[position:].clone()
        if lie is not None and lie[0] == step:
            y[lie[1]] *= 1.01
        given, sent = wire.pack_tensor(x, "float32"), wire.pack_tensor(y, "float32")
        seal = hop.sign(seal_payload(transcript.update(step, position, digest_of(x, "float32"), digest_of(y, "float32"))))
        evidence.append(Evidence(step, position, {**given, "data": bytes(given["data"])}, {**sent, "data": bytes(sent["data"])}))
    return Accusation(MODEL["digest"], BLOCKS, "s2", hop.public_key_bytes, tuple(evidence), seal)


async def causal_rerun(span: tuple[int, int], inputs: torch.Tensor) -> torch.Tensor:
    causal_rerun.tokens += inputs.shape[0]
    return inputs.cumsum(0)


causal_rerun.tokens = 0
REWINDS = [(0, 6), (6, 5), (8, 4), (10, 2), (11, 5)]  # speculation: each step from the first rejected draft


async def test_a_rewinding_transcript_is_judged_on_its_final_sequence():
    """An honest hop whose steps rewind is acquitted (its kept rows are those of the final sequence);
    a lie in a kept row convicts. The re-run is one prefill of the final 16 positions."""
    hop, liar, client = Identity.generate(), Identity.generate(), Identity.generate()
    judge = court(table_with((hop, BLOCKS), (liar, BLOCKS)))
    causal_rerun.tokens = 0
    case, _ = await judge.hear(speculating(hop, REWINDS).signed_by(client), None, NOW, causal_rerun)
    assert case.acquitted and case.error < 1e-6 and causal_rerun.tokens == 16
    case, forward = await judge.hear(speculating(liar, REWINDS, lie=(3, 0)).signed_by(Identity.generate()), None, NOW, causal_rerun)
    assert case.convicted and forward and case.error > 0.005


async def test_evidence_that_rewinds_past_the_token_limit_is_refused_before_any_rerun():
    """A hostile accuser's transcript that rewinds over the same positions again and again: short in
    final length, long in tokens re-sent. Refused typed, on the wire and in the court, before any re-run."""
    hop, client = Identity.generate(), Identity.generate()
    judge = court(table_with((hop, BLOCKS)))
    steps = [(0, 128)] * (MAX_EVIDENCE_TOKENS // 128 + 1)  # 4224 tokens, 128 positions
    accusation = speculating(hop, steps).signed_by(client)
    assert accusation.length == 128 and accusation.tokens > MAX_EVIDENCE_TOKENS
    with pytest.raises(BadRequest, match="tokens in all"):
        Accusation.from_wire(wire.decode(wire.encode(accusation.to_wire())), hidden_size=D)
    causal_rerun.tokens = 0
    with pytest.raises(BadRequest, match="tokens in all"):
        await judge.hear(accusation, None, NOW, causal_rerun)
    assert causal_rerun.tokens == 0 and not judge.cases and judge.counts["refused"] == 1
    fits = speculating(hop, steps[:-1]).signed_by(client)  # 4096: at the limit, judged
    again = Accusation.from_wire(wire.decode(wire.encode(fits.to_wire())), hidden_size=D)
    case, _ = await judge.hear(again, None, NOW, causal_rerun)
    assert case.acquitted and causal_rerun.tokens == 128
    past = fits.to_wire()
    past["steps"][1][1] = 129  # a step past the end so far: no node sealed that
    with pytest.raises(BadRequest, match="at or before the end"):
        Accusation.from_wire(past, hidden_size=D)


async def test_evidence_altered_after_sealing_is_refused_whole():
    hop, client = Identity.generate(), Identity.generate()
    judge = court(table_with((hop, BLOCKS)))
    honest = sealed(hop)
    last = honest.steps[-1]
    bent = wire.pack_tensor(wire.unpack_tensor(last.output) + 1, "float32")
    steps = (*honest.steps[:-1], Evidence(last.step, last.position, last.input, {**bent, "data": bytes(bent["data"])}))
    forged = Accusation(honest.model, BLOCKS, honest.session, honest.accused, steps, honest.seal).signed_by(client)
    with pytest.raises(SignatureInvalid):
        await judge.hear(forged, None, NOW, rerun)
    unsigned = sealed(hop, lie_at=3)  # the accuser's signature must hold too
    with pytest.raises(SignatureInvalid):
        await judge.hear(Accusation(*[getattr(unsigned, f) for f in ("model", "blocks", "session", "accused", "steps", "seal")], client.public_key_bytes, bytes(64)), None, NOW, rerun)
    assert not judge.cases and judge.counts["refused"] == 2


async def test_without_the_blocks_a_conviction_needs_a_quorum_of_proven_holders():
    liar, client = Identity.generate(), Identity.generate()
    h1, h2, elsewhere, stranger = (Identity.generate() for _ in range(4))
    table = table_with((liar, BLOCKS), (h1, (0, 20)), (h2, BLOCKS), (elsewhere, (20, 30)))
    judge = court(table)
    accusation = sealed(liar, lie_at=3).signed_by(client)
    digest = accusation.digest()
    votes = lambda *ids: [Verdict.sign(i, digest).to_wire() for i in ids]  # noqa: E731
    # one holder, a proven peer without the blocks, a stranger, and the accused itself: not a quorum
    case, forward = await judge.hear(accusation, votes(h1, elsewhere, stranger, liar), NOW, None)
    assert not case.convicted and not forward and liar.peer_id in table
    case, forward = await judge.hear(accusation, votes(h2), NOW, None)  # the second proven holder
    assert case.convicted and forward and liar.peer_id not in table
    assert {v.judge for v in case.verdict_list()} >= {h1.public_key_bytes, h2.public_key_bytes}


async def test_a_verdict_over_another_accusation_is_refused():
    liar, client, h1 = Identity.generate(), Identity.generate(), Identity.generate()
    judge = court(table_with((liar, BLOCKS), (h1, BLOCKS)))
    accusation = sealed(liar, lie_at=3).signed_by(client)
    other = sealed(liar, lie_at=3, steps=5).signed_by(client)
    with pytest.raises(SignatureInvalid):
        await judge.hear(accusation, [Verdict.sign(h1, other.digest()).to_wire()], NOW, None)
    with pytest.raises(BadRequest):
        await judge.hear(accusation, [[b"k" * 31, b"s" * 64]], NOW, None)
    with pytest.raises(BadRequest):
        await judge.hear(accusation, "guilty", NOW, None)
    assert not judge.cases


async def test_a_node_does_not_judge_itself():
    client = Identity.generate()
    judge = court()
    with pytest.raises(NotPermitted):
        await judge.hear(sealed(judge.identity, lie_at=3).signed_by(client), None, NOW, rerun)


def test_the_source_budget_is_a_burst_then_a_rate():
    judge = court(source_burst=3, source_interval_s=10)
    for _ in range(3):
        judge.admit("10.0.0.1", NOW)
    with pytest.raises(Busy):
        judge.admit("10.0.0.1", NOW + 1)
    judge.admit("10.0.0.2", NOW + 1)  # another source has its own
    judge.admit("10.0.0.1", NOW + 10)
    with pytest.raises(Busy):
        judge.admit("10.0.0.1", NOW + 11)
    assert judge.counts["busy"] == 2


async def test_rechecks_beyond_the_limit_are_busy():
    hop, client = Identity.generate(), Identity.generate()
    judge = court(table_with((hop, BLOCKS)))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(span, inputs):
        started.set()
        await release.wait()
        return blocks(inputs)

    first = asyncio.ensure_future(judge.hear(sealed(hop).signed_by(client), None, NOW, slow))
    await started.wait()
    with pytest.raises(Busy):
        await judge.hear(sealed(hop, steps=2).signed_by(Identity.generate()), None, NOW, rerun)
    case, _ = await judge.hear(sealed(hop).signed_by(Identity.generate()), None, NOW, rerun)  # the same charge: no second run
    assert case.status == "rechecking"
    release.set()
    case, _ = await first
    assert case.acquitted and judge.rechecking == 0


def test_barred_is_bounded_and_expires():
    barred = Barred(max_entries=2)
    barred.bar("a", 10)
    barred.bar("b", 10)
    barred.bar("c", 10)
    assert not barred("a", 0) and barred("b", 0) and barred("c", 0)
    assert not barred("b", 10) and len(barred) == 1


def test_the_config_refuses_nonsense():
    with pytest.raises(ValueError):
        AccusationConfig(quorum=0)
    with pytest.raises(ValueError):
        AccusationConfig(source_interval_s=0)


def test_accusations_in_the_node_at_once_are_bounded():
    judge = court(max_in_flight=2)
    judge.enter()
    judge.enter()
    with pytest.raises(Busy):
        judge.enter()
    judge.leave()
    judge.enter()
    assert judge.in_flight == 2
