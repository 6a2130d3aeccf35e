"""Verified outputs, the pure part: which generations and hops to check, what is kept, who lied.

The client taps every session (each hop sends it the output it pushed on, and a
seal over its transcript: swarm/seal.py), so no hop can tell whether a
generation is checked. A fraction of generations (`Selector`) is checked: one
hop of the route, chosen uniformly before the first step, has its transcript
kept on a `Tape` (the hop's own outputs, and its inputs: the outputs of the hop
before it, or the client's own tensors for the first hop). Every other tap is
dropped as it arrives, so memory is bounded by one hop's share of the
generation. After the text is complete the tape becomes the evidence of an
`Accusation` (unsigned until someone is accused), whose inputs another replica
re-runs; `settle` decides who lied from the comparisons. This module does no
I/O; client/verification.py drives it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from swarm import wire
from swarm.accusation import MAX_EVIDENCE_TOKENS, Accusation, Evidence


class NotVerifiable(Exception):
    """Why a selected generation could not be checked (a skip reason: never on the wire)."""


class Verdict(str, enum.Enum):
    AGREE = "agree"  # the replica reproduced the hop's outputs within the wire dtype's tolerance
    HOP_LIED = "hop lied"  # a third replica sided with the re-run: the hop is accused
    REPLICA_LIED = "replica lied"  # a third replica sided with the hop: the re-running replica is accused
    DISPUTED = "disputed"  # hop and replica disagree and no third replica settled it: nobody is accused
    UNSEALED = "unsealed"  # the hop's seal does not cover the outputs it sent: not accusable to others
    SKIPPED = "skipped"  # selected but not checked (failover, no other replica, ...): `reason` says why
    HEAD_WRONG = "head wrong"  # a last hop's LM-head candidates are not its own hidden state's (client/remote_head.py)


@dataclass
class Verification:
    """The outcome of checking one generation: which hop, on which replica, how far apart, the verdict."""

    verdict: Verdict
    reason: str = ""
    hop: str = ""  # the checked hop, str(RemoteHop)
    peer_id: str = ""  # ... its peer id
    blocks: tuple[int, int] | None = None
    tokens: int = 0  # positions re-run
    replica: str = ""  # peer id of the replica that re-ran the hop's inputs
    third: str = ""  # peer id of the replica that settled a disagreement
    error: float | None = None  # worst row's relative RMS difference, hop vs replica
    tolerance: float | None = None  # the limit for the two parties' precisions and the wire dtype (swarm/precision.py)
    accused: str = ""  # peer id of the liar, when one was found
    convinced: list[str] = field(default_factory=list)  # peers that accepted the accusation

    def summary(self) -> str:
        if self.verdict is Verdict.SKIPPED:
            return f"verification skipped: {self.reason}"
        error = f"error {self.error:.2e} (tolerance {self.tolerance:.2g})" if self.error is not None else ""
        line = f"verified hop {self.hop} on {self.replica[:8] or '-'}: {self.verdict.value}"
        line += f", {error}" if error else ""
        if self.third:
            line += f"; settled by {self.third[:8]}"
        if self.accused:
            line += f"; accused {self.accused[:8]}, convinced {len(self.convinced)} peer(s)"
        if self.reason:
            line += f" ({self.reason})"
        return line

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, "", [])}
        out["verdict"] = self.verdict.value
        if self.blocks is not None:
            out["blocks"] = list(self.blocks)
        return out


class Selector:
    """Which generations are checked, and which hop: seeded for tests, system entropy otherwise.

    The decisions draw from one generator, one draw per generation (plus one for the
    hop of a selected one), so a seed fixes the sequence whatever else happens; the
    order replicas are tried in comes from a second generator for the same reason."""

    def __init__(self, fraction: float, seed: int | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the verification fraction must be in [0, 1], got {fraction!r}")
        self.fraction = fraction
        self.rng = random.Random(seed)  # seed None: os.urandom
        self.order = random.Random(self.rng.getrandbits(64))

    def select(self, requested: bool | None = None) -> bool:
        """Whether this generation is checked: `requested` True/False decides, None draws."""
        draw = self.rng.random()  # drawn in every case, so requests do not shift a seeded sequence
        return draw < self.fraction if requested is None else requested

    def hop(self, hops: int) -> int:
        """The index of the hop to check, uniformly over the route."""
        return self.rng.randrange(hops)

    def shuffled(self, items: Iterable[str]) -> list[str]:
        items = sorted(items)  # a seeded run tries replicas in the same order whatever the view's order
        self.order.shuffle(items)
        return items


def frozen(tensor: torch.Tensor, dtype: str) -> dict:
    """A wire tensor with its bytes copied (a tap outlives the frame it came in)."""
    packed = wire.pack_tensor(tensor, dtype)
    return {"dtype": packed["dtype"], "shape": packed["shape"], "data": bytes(packed["data"])}


@dataclass
class _Taped:
    position: int
    input: dict | None = None
    output: dict | None = None
    seal: bytes | None = None


class Tape:
    """One checked hop's transcript as the client saw it, step by step.

    `sent` is called for every step the client sends to the route's first hop,
    `tapped` for every tapped output (an `ack`'s, or the last hop's `result`).
    Only what checking hop `hop` needs is kept: its outputs and seals, and its
    inputs (the client's own tensors when it is the first hop, else the outputs
    of the hop before it)."""

    def __init__(self, hop: int) -> None:
        self.hop = hop
        self.steps: dict[int, _Taped] = {}

    def sent(self, step: int, position: int, hidden: torch.Tensor, dtype: str) -> None:
        entry = self.steps.setdefault(step, _Taped(position))
        entry.position = position
        if self.hop == 0:
            entry.input = frozen(hidden, dtype)

    def tapped(self, index: int, step: int, hidden: torch.Tensor, dtype: str, seal: bytes) -> None:
        entry = self.steps.get(step)
        if entry is None or index not in (self.hop, self.hop - 1):
            return  # a step not sent along this route, or a hop the check does not need
        if index == self.hop:
            entry.output, entry.seal = frozen(hidden, dtype), seal
        else:
            entry.input = frozen(hidden, dtype)

    @property
    def tokens(self) -> int:
        return sum(e.input["shape"][0] for e in self.steps.values() if e.input is not None)

    def evidence(self, model: str, blocks: tuple[int, int], session: str, accused: bytes, max_tokens: int = MAX_EVIDENCE_TOKENS) -> Accusation:
        """The hop's transcript as an (unsigned) `Accusation`: its steps from position 0 on, as
        many as fit in `max_tokens` input rows in all, with the seal it sent after the last of them.

        A step may start at or before the end of the one before it (a rewind: speculative
        decoding dropping rejected drafts), never after it."""
        steps: list[Evidence] = []
        seal, end, total, dtype, width = b"", 0, 0, None, None
        for number in sorted(self.steps):
            entry = self.steps[number]
            if entry.input is None or entry.output is None or entry.seal is None:
                raise NotVerifiable(f"step {number} of the hop's transcript is missing (its tap did not arrive)")
            if entry.position > end:
                raise NotVerifiable(f"step {number} is at position {entry.position}, past the end {end} of the steps before it")
            given, sent = entry.input["shape"], entry.output["shape"]
            dtype, width = dtype or entry.input["dtype"], width or given[1]
            if sent[0] not in (given[0], 1) or given[1] != width or sent[1] != width or {entry.input["dtype"], entry.output["dtype"]} != {dtype}:
                raise NotVerifiable(f"step {number}'s tapped tensors do not fit together ({given} -> {sent})")
            if total + given[0] > max_tokens:
                break  # a prefix is evidence too: its seal commits the hop to exactly those steps
            steps.append(Evidence(number, entry.position, entry.input, entry.output))
            seal, end, total = entry.seal, entry.position + given[0], total + given[0]
        if not steps:
            raise NotVerifiable("the hop ran no step that fits in one piece of evidence")
        return Accusation(model, blocks, session, accused, tuple(steps), seal)


def settle(hop_agrees: bool, third_with_hop: bool | None = None, third_with_replica: bool | None = None) -> Verdict:
    """Who lied, from whether the re-run agreed with the hop and, on disagreement, which side a
    third replica took (None: there was no third replica)."""
    if hop_agrees:
        return Verdict.AGREE
    if third_with_hop is None or third_with_replica is None or third_with_hop == third_with_replica:
        return Verdict.DISPUTED  # no third voice, or one that sides with both or neither
    return Verdict.REPLICA_LIED if third_with_hop else Verdict.HOP_LIED


def replicas(spans: Iterable[tuple[str, int, int]], blocks: tuple[int, int], exclude: Iterable[str]) -> list[str]:
    """Peers (id, start, end) whose span covers `blocks`, other than `exclude`: who can re-run a hop."""
    skip = set(exclude)
    return [p for p, start, end in spans if start <= blocks[0] and blocks[1] <= end and p not in skip]


def recipients(holders: Sequence[str], others: Sequence[str], accused: str, fanout: int) -> list[str]:
    """Whom to send an accusation: every other holder of the blocks (they can re-check it), then
    up to `fanout` other peers this client has proven (so it spreads beyond them)."""
    first = [p for p in dict.fromkeys(holders) if p != accused]
    rest = [p for p in dict.fromkeys(others) if p != accused and p not in first]
    return first + rest[: max(0, fanout)]
