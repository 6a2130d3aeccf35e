"""The pure decisions of verified outputs (client/verify.py): no network, real signatures."""

from __future__ import annotations

import pytest
import torch

from client.measure import Measurements, TrustConfig
from client.planner import ClientConfig
from client.verify import NotVerifiable, Selector, Tape, Verdict, Verification, recipients, replicas, settle
from swarm import wire
from swarm.accusation import Accusation, Evidence
from swarm.identity import Identity
from swarm.seal import Transcript, check_seal, digest_of, seal_payload

MODEL, BLOCKS, SESSION, DTYPE = "m" * 64, (10, 20), "s1", "bfloat16"


def _record(hop: Identity, tape: Tape, index: int, steps: list[tuple[torch.Tensor, int]], before=None, noise: float = 0.0):
    """Run `steps` (input, position) through a fake hop (output = 2 x input) at route index `index`,
    sealing its transcript as a node does and feeding the tape as a session does."""
    transcript = Transcript(MODEL, BLOCKS, SESSION, hop.peer_id)
    outputs = []
    for number, (x, position) in enumerate(steps):
        x = x.to(torch.bfloat16)
        if index == 0:
            tape.sent(number, position, x, DTYPE)
        else:
            tape.sent(number, position, torch.zeros(1, 1), DTYPE)  # what the client sent hop 0 (not kept)
            tape.tapped(index - 1, number, x, DTYPE, b"\0" * 64)  # the hop before: its output is our input
        y = (2 * x.float() * (1 + noise)).to(torch.bfloat16)
        seal = hop.sign(seal_payload(transcript.update(number, position, digest_of(x, DTYPE), digest_of(y, DTYPE))))
        tape.tapped(index, number, y, DTYPE, seal)
        tape.tapped(index + 1, number, y, DTYPE, b"\0" * 64)  # a hop the check does not need
        outputs.append(y)
    return outputs


def _steps(lengths: list[int]) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    out, position = [], 0
    for n in lengths:
        out.append((torch.randn(n, 8, generator=g), position))
        position += n
    return out


def test_selector_draws_the_fraction_and_a_seed_fixes_the_sequence():
    selector = Selector(0.25, seed=7)
    draws = [selector.select() for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.25) < 0.03
    again = Selector(0.25, seed=7)
    assert [again.select() for _ in range(4000)] == draws
    # A request decides, but still draws: the seeded sequence of the others does not shift.
    mixed = Selector(0.25, seed=7)
    assert [mixed.select(True if i % 3 == 0 else None) for i in range(30)] == [True if i % 3 == 0 else d for i, d in enumerate(draws[:30])]
    assert not any(Selector(0.0, seed=1).select() for _ in range(100))
    assert all(Selector(1.0, seed=1).select() for _ in range(100))
    assert Selector(0.0, seed=1).select(True) and not Selector(1.0, seed=1).select(False)
    hops = Selector(0.5, seed=3)
    chosen = [hops.hop(3) for _ in range(3000)]
    assert {0, 1, 2} == set(chosen) and all(abs(chosen.count(i) / 3000 - 1 / 3) < 0.04 for i in range(3))
    assert Selector(0.5, seed=3).shuffled(["c", "a", "b"]) == Selector(0.5, seed=3).shuffled(["b", "c", "a"])


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError):
        Selector(fraction)
    with pytest.raises(ValueError):
        ClientConfig(verify_fraction=fraction)


@pytest.mark.parametrize("index", [0, 1])
def test_tape_evidence_is_the_hops_sealed_transcript(index):
    """What the tape keeps replays the hop's chain, so its seal holds and a signed accusation checks."""
    hop, client = Identity.generate(), Identity.generate()
    tape = Tape(index)
    steps = _steps([5, 1, 1, 1])
    outputs = _record(hop, tape, index, steps)
    assert all((e.input is not None) and (e.output is not None) for e in tape.steps.values())
    evidence = tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes)
    assert check_seal(hop.public_key_bytes, evidence.seal, evidence.transcript_digest())
    accusation = evidence.signed_by(client)
    accusation.check()
    again = Accusation.from_wire(wire.decode(wire.encode(accusation.to_wire())), hidden_size=8)
    again.check()
    assert again.inputs().shape == (8, 8)
    reference = torch.cat(outputs).float()
    assert accusation.verdict(reference).error == 0.0
    assert accusation.verdict(reference * 1.01).error > 5e-3


def test_tape_keeps_only_what_checking_its_hop_needs():
    tape = Tape(2)
    x = torch.ones(3, 4)
    tape.sent(0, 0, x, DTYPE)
    tape.tapped(0, 0, x, DTYPE, b"s" * 64)  # two hops before: not needed
    tape.tapped(3, 0, x, DTYPE, b"s" * 64)  # the hop after: not needed
    tape.tapped(1, 7, x, DTYPE, b"s" * 64)  # a step the client never sent on this route
    (entry,) = tape.steps.values()
    assert entry.input is None and entry.output is None and 7 not in tape.steps
    tape.tapped(1, 0, x, DTYPE, b"s" * 64)
    tape.tapped(2, 0, 2 * x, DTYPE, b"t" * 64)
    assert entry.input["shape"] == [3, 4] and entry.output["data"] == bytes(wire.pack_tensor(2 * x, DTYPE)["data"]) and entry.seal == b"t" * 64
    assert isinstance(entry.input["data"], bytes)  # copied: a tap outlives its frame


def test_tape_refuses_missing_taps_and_gaps():
    hop = Identity.generate()
    tape = Tape(0)
    _record(hop, tape, 0, _steps([4, 1]))
    tape.sent(2, 5, torch.ones(1, 8), DTYPE)  # its tap never came
    with pytest.raises(NotVerifiable, match="missing"):
        tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes)
    gap = Tape(0)
    _record(hop, gap, 0, [(torch.ones(4, 8), 0), (torch.ones(1, 8), 6)])
    with pytest.raises(NotVerifiable, match="past the end"):
        gap.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes)
    with pytest.raises(NotVerifiable):
        Tape(1).evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes)


def test_a_long_transcript_gives_a_sealed_prefix_within_the_evidence_limit():
    hop = Identity.generate()
    tape = Tape(0)
    _record(hop, tape, 0, _steps([6, 1, 1, 1, 1]))
    evidence = tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes, max_tokens=8)
    assert [e.position for e in evidence.steps] == [0, 6, 7]
    assert check_seal(hop.public_key_bytes, evidence.seal, evidence.transcript_digest())  # the seal of step 2, not the last
    with pytest.raises(NotVerifiable):
        tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes, max_tokens=5)


def _speculating_hop(hop: Identity, tape: Tape, steps: list[tuple[int, int]], lie: tuple[int, int] | None = None) -> None:
    """A hop whose blocks are causal (row x = the sum of the inputs at positions 0..x, so each row
    depends on its context) running `steps` (position, rows) with output "all" as speculation sends
    them, its cache cut back at each step's position as a node's is; `lie` = (step, row) is 1% off."""
    transcript = Transcript(MODEL, BLOCKS, SESSION, hop.peer_id)
    g = torch.Generator().manual_seed(3)
    cache = torch.empty(0, 8)
    for number, (position, rows) in enumerate(steps):
        x = torch.randn(rows, 8, generator=g)
        cache = torch.cat([cache[:position], x])
        y = cache.cumsum(0)[position:].clone()
        if lie is not None and lie[0] == number:
            y[lie[1]] *= 1.01
        tape.sent(number, position, x, "float32")
        seal = hop.sign(seal_payload(transcript.update(number, position, digest_of(x, "float32"), digest_of(y, "float32"))))
        tape.tapped(0, number, y, "float32", seal)


REWINDS = [(0, 5), (5, 4), (7, 3), (9, 4), (10, 1), (11, 3)]  # prefill, then drafts partly rejected: 7 < 9, 9 < 10, 10 < 13


def test_a_transcript_that_rewinds_is_evidence_of_its_final_sequence():
    """Speculation rewinds: steps start at or before the end so far. The re-run of the final
    sequence reproduces every row no later step rewound over; the seal covers every step."""
    hop = Identity.generate()
    tape = Tape(0)
    _speculating_hop(hop, tape, REWINDS)
    evidence = tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes).signed_by(Identity.generate())
    evidence.check()
    again = Accusation.from_wire(wire.decode(wire.encode(evidence.to_wire())), hidden_size=8)
    assert (again.tokens, again.length) == (20, 14) and again.inputs().shape == (14, 8)
    positions, _ = again.claimed()
    assert positions == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], "the rows rewound over are left out"
    assert again.verdict(again.inputs().cumsum(0)).error < 1e-6
    # the seal chains each step's position: a rewind moved by one no longer verifies
    moved = list(again.steps)
    moved[2] = Evidence(moved[2].step, moved[2].position + 1, moved[2].input, moved[2].output)
    shifted = Accusation(MODEL, BLOCKS, SESSION, hop.public_key_bytes, tuple(moved), again.seal)
    assert not check_seal(hop.public_key_bytes, again.seal, shifted.transcript_digest())
    # A lie in a row that stays (step 3's first row, position 9) is caught ...
    liar = Tape(0)
    _speculating_hop(hop, liar, REWINDS, lie=(3, 0))
    assert liar.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes).verdict(again.inputs().cumsum(0)).error > 5e-3
    # ... one in a row a later step rewound over (step 1's last, position 8) changed nothing anyone read.
    harmless = Tape(0)
    _speculating_hop(hop, harmless, REWINDS, lie=(1, 3))
    assert harmless.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes).verdict(again.inputs().cumsum(0)).error < 1e-6


def test_a_rewinding_transcript_is_cut_by_its_inputs_in_all_not_its_length():
    hop = Identity.generate()
    tape = Tape(0)
    _speculating_hop(hop, tape, [(0, 4), *[(4, 3)] * 10])  # the same three positions ten times
    evidence = tape.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes, max_tokens=16)
    assert (evidence.tokens, evidence.length, len(evidence.steps)) == (16, 7, 5)
    assert check_seal(hop.public_key_bytes, evidence.seal, evidence.transcript_digest())
    past = Tape(0)
    _speculating_hop(hop, past, [(0, 4), (5, 1)])  # past the end: a node refuses it, so no hop sealed it
    with pytest.raises(NotVerifiable, match="past the end"):
        past.evidence(MODEL, BLOCKS, SESSION, hop.public_key_bytes)


def test_settle_accuses_only_whom_a_third_replica_sides_against():
    assert settle(True) is Verdict.AGREE
    assert settle(True, False, True) is Verdict.AGREE
    assert settle(False) is Verdict.DISPUTED  # no third replica: one word against another
    assert settle(False, False, True) is Verdict.HOP_LIED
    assert settle(False, True, False) is Verdict.REPLICA_LIED
    assert settle(False, True, True) is Verdict.DISPUTED
    assert settle(False, False, False) is Verdict.DISPUTED


def test_replicas_cover_the_blocks_and_accusations_go_to_holders_first():
    spans = [("a", 0, 10), ("b", 10, 20), ("c", 5, 25), ("d", 10, 15), ("e", 10, 20)]
    assert replicas(spans, (10, 20), {"b"}) == ["c", "e"]
    assert replicas(spans, (10, 20), ()) == ["b", "c", "e"]
    assert recipients(["b", "c", "e"], ["x", "b", "y", "z", "w"], "b", 2) == ["c", "e", "x", "y"]
    assert recipients(["b"], [], "b", 3) == []


def test_a_convicted_peer_is_banned_for_long():
    m = Measurements(TrustConfig(ban_s=60, max_ban_s=1800, convicted_ban_s=86400))
    assert m.convict("liar", "wrong outputs", now=100.0) == 86400
    assert "liar" in m.banned(100.0 + 1800 + 1) and "liar" not in m.banned(100.0 + 86400 + 1)
    assert m.peers["liar"].last_offence == "wrong outputs"


def test_verification_reports():
    skipped = Verification(Verdict.SKIPPED, "the route changed during the generation (failover)")
    assert "skipped" in skipped.summary() and skipped.to_json() == {"verdict": "skipped", "reason": skipped.reason, "tokens": 0}
    caught = Verification(Verdict.HOP_LIED, hop="abcdefgh[10:20)", blocks=(10, 20), replica="r" * 32, third="t" * 32, error=0.01, tolerance=5e-3, accused="a" * 32, convinced=["x"])
    assert "hop lied" in caught.summary() and "accused aaaaaaaa" in caught.summary()
    assert caught.to_json()["blocks"] == [10, 20] and caught.to_json()["verdict"] == "hop lied"
