"""How a node judges accusations (swarm/accusation.py): re-run the evidence, or count the verdicts of peers that did.

A client that caught a hop sending wrong outputs signs an accusation holding the
hop's own sealed transcript and sends it to nodes that hold the same blocks.
Such a node believes nothing it did not compute: it re-runs the evidence's
inputs through exactly those blocks and compares with what the accused sealed
(`Accusation.verdict`). Beyond the tolerance for the pair (swarm/precision.py
`tolerance`: the wire dtype's rounding when the accused's declared precision and the
judge's own are the same full precision, wider across precisions; an accused whose
record this node does not hold is taken at float32, as a record that declares
nothing) the accused is
CONVICTED: dropped from the peer table and barred from it for `conviction_s`,
refused as anyone's next hop, and the accusation goes on, once, to this node's
proven peers with this node's signed verdict attached. A node that does not
hold the blocks cannot re-run them: it believes a conviction only when
`quorum` distinct proven peers whose records hold those blocks signed verdicts.

An accusation whose claimed outputs the blocks do compute convicts nobody and
bars its accuser's key for `false_accuser_s`. Every charge is remembered by
its digest (at most `max_remembered`), so hearing it again costs no re-run.

What a re-check costs is bounded before any work. The evidence holds at most
MAX_EVIDENCE_TOKENS input rows over all its steps, rewound positions counted
each time (checked by `Accusation.from_wire`, and again in `hear` for evidence
built in-process): a transcript that rewinds (speculative decoding) is re-run
as one prefill of its final sequence, no longer than that. `Court.admit` charges the
sender's source a token bucket (`source_burst` at once, then one per
`source_interval_s`), and at most `max_rechecks` re-runs are in the node at
once; beyond either the answer is a typed `busy`.

Pure but for the re-run, which the caller passes in (node/accusations.py runs it
on the backend's compute thread); time is an argument.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from swarm.accusation import MAX_EVIDENCE_TOKENS, Accusation, Verdict, verdicts_from_wire
from swarm.errors import BadRequest, Busy, NotPermitted
from swarm.identity import Identity
from swarm.peers import PeerTable
from swarm.precision import DEFAULT_PRECISION, tolerance

log = logging.getLogger(__name__)

Rerun = Callable[[tuple[int, int], torch.Tensor], Awaitable[torch.Tensor]]  # blocks, final sequence [L, D] -> outputs [L, D]

_MAX_SOURCES = 4096  # sources with a running budget: bounds memory under a flood from many addresses
_MAX_BARRED = 4096  # convicted peers and false accusers remembered


@dataclass(frozen=True)
class AccusationConfig:
    quorum: int = 2  # verdicts of distinct proven peers holding the blocks that a node without them needs
    conviction_s: float = 30 * 86400.0  # a convicted peer is barred from the peer table this long
    false_accuser_s: float = 3600.0  # an accuser whose charge did not hold is refused this long
    source_burst: int = 4  # accusations one source may send at once ...
    source_interval_s: float = 10.0  # ... and then one per this many seconds
    max_rechecks: int = 1  # re-runs of evidence in the node at once
    max_in_flight: int = 4  # accusations being read or judged in the node at once, from all sources
    max_remembered: int = 1024  # charges remembered (by digest), oldest forgotten first
    forward_timeout_s: float = 10.0  # passing a conviction on to one peer

    def __post_init__(self) -> None:
        if min(self.quorum, self.source_burst, self.max_rechecks, self.max_in_flight, self.max_remembered) < 1:
            raise ValueError("quorum, source_burst, max_rechecks, max_in_flight and max_remembered must be at least 1")
        if not (self.conviction_s >= 0 and self.false_accuser_s >= 0 and self.source_interval_s > 0 and self.forward_timeout_s > 0):
            raise ValueError("conviction_s and false_accuser_s must not be negative; the intervals must be positive")


class Barred:
    """Keys barred until a time: convicted peer ids, or the public keys of false accusers. Bounded."""

    def __init__(self, max_entries: int = _MAX_BARRED) -> None:
        self._until: OrderedDict[Any, float] = OrderedDict()
        self.max_entries = max_entries

    def bar(self, key: Any, until: float) -> None:
        self._until[key] = max(until, self._until.get(key, -math.inf))
        self._until.move_to_end(key)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def __call__(self, key: Any, now: float) -> bool:
        """Whether `key` is barred at `now` (the shape `PeerTable.barred` takes)."""
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)

    def items(self, now: float) -> dict[Any, float]:
        """Every key barred at `now`, with until when."""
        return {key: until for key, until in self._until.items() if until > now}


@dataclass
class Case:
    """What this node knows of one charge (an accusation's digest), for `GET /accusations`."""

    digest: bytes
    accused: str  # peer id
    accuser: str  # peer id of the key that signed the charge first heard
    model: str
    blocks: tuple[int, int]
    dtype: str
    heard_at: float
    error: float | None = None  # this node's own re-run: the worst row's relative RMS difference
    tolerance: float | None = None  # ... and the most it allowed (the accused's declared precision against this node's)
    convicted: bool = False
    acquitted: bool = False  # re-run here and found honest: the accuser was barred
    verdicts: dict[bytes, bytes] = field(default_factory=dict)  # judge public key -> signature (guilty)
    forwarded: bool = False
    running: bool = False  # a re-run of it is computing now

    @property
    def status(self) -> str:
        return "convicted" if self.convicted else "acquitted" if self.acquitted else "rechecking" if self.running else "unproven"

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest.hex(), "accused": self.accused, "accuser": self.accuser, "model": self.model,
            "blocks": list(self.blocks), "dtype": self.dtype, "error": self.error, "tolerance": self.tolerance, "convicted": self.convicted,
            "acquitted": self.acquitted, "status": self.status, "verdicts": len(self.verdicts), "heard_at": self.heard_at,
        }  # fmt: skip

    def verdict_list(self) -> list[Verdict]:
        return [Verdict(key, signature) for key, signature in self.verdicts.items()]


class Court:
    """Accusations heard by one node, its convictions, and the budgets that bound what judging costs."""

    def __init__(self, config: AccusationConfig, identity: Identity, table: PeerTable) -> None:
        self.config = config
        self.identity = identity
        self.table = table
        self.convicted = Barred()  # peer id -> barred until
        self.false_accusers = Barred()  # accuser public key -> refused until
        self.cases: OrderedDict[bytes, Case] = OrderedDict()
        self.rechecking = 0
        self.in_flight = 0
        self.counts: dict[str, int] = {"heard": 0, "convicted": 0, "acquitted": 0, "busy": 0, "refused": 0}
        self._budgets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        table.barred = self.convicted  # the table refuses records of convicted peers

    # --- before any work ------------------------------------------------------------------

    def admit(self, source: str, now: float) -> None:
        """Charge one accusation to `source`'s budget, or `Busy` (before the body is even read)."""
        config = self.config
        tokens, at = self._budgets.get(source, (float(config.source_burst), now))
        tokens = min(float(config.source_burst), tokens + (now - at) / config.source_interval_s)
        if tokens < 1.0:
            self.counts["busy"] += 1
            wait = (1.0 - tokens) * config.source_interval_s
            raise Busy(f"too many accusations from this source: try again in {wait:.0f} s")
        if source not in self._budgets and len(self._budgets) >= _MAX_SOURCES:
            full = float(config.source_burst)
            for key in [k for k, (t, a) in self._budgets.items() if t + (now - a) / config.source_interval_s >= full]:
                del self._budgets[key]  # back to a full bucket: nothing to remember
            if len(self._budgets) >= _MAX_SOURCES:
                self.counts["busy"] += 1
                raise Busy("too many sources are accusing right now: try again later")
        self._budgets[source] = (tokens - 1.0, now)

    def enter(self) -> None:
        """Count one accusation in the node until `leave`, or `Busy` at `max_in_flight` (bounds bodies held)."""
        if self.in_flight >= self.config.max_in_flight:
            self.counts["busy"] += 1
            raise Busy(f"this node is judging its limit of {self.config.max_in_flight} accusations: try again later")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    def is_convicted(self, peer_id: str, now: float) -> bool:
        return self.convicted(peer_id, now)

    # --- judging --------------------------------------------------------------------------

    async def hear(
        self, accusation: Accusation, raw_verdicts: object, now: float, rerun: Rerun | None, precision: str = DEFAULT_PRECISION
    ) -> tuple[Case, bool]:
        """Judge `accusation` (already read whole with `Accusation.from_wire`, model checked by the caller).

        `rerun` is None when this node does not hold the accusation's blocks; `precision` is what this
        node computes with (swarm/precision.py): a bfloat16 judge must not convict a float32 hop for
        its own rounding, nor a float32 judge an int8 hop for its weights'. Returns the case and
        whether the caller must pass the conviction on (true once per case). Raises `NotPermitted`
        for a barred accuser or a charge against this node, `SignatureInvalid` for evidence the
        accused did not seal, a bad accuser signature or a bad verdict, and `Busy` when re-runs are
        at their limit; none of these changes any state.
        """
        if self.false_accusers(accusation.accuser, now):
            self.counts["refused"] += 1
            raise NotPermitted(f"accuser {accusation.accuser_id} brought a charge that did not hold: refused for now")
        if accusation.accused == self.identity.public_key_bytes:
            raise NotPermitted("this node does not judge itself")
        if accusation.tokens > MAX_EVIDENCE_TOKENS:
            self.counts["refused"] += 1
            raise BadRequest(f"the evidence's inputs are {accusation.tokens} tokens in all, over {MAX_EVIDENCE_TOKENS}")
        try:
            accusation.check()  # the accused sealed exactly this evidence, and the accuser signed the charge
            digest = accusation.digest()
            verdicts = verdicts_from_wire(raw_verdicts, digest)
        except Exception:
            self.counts["refused"] += 1
            raise
        case = self.cases.get(digest)
        if case is None:
            if rerun is not None and self.rechecking >= self.config.max_rechecks:
                self.counts["busy"] += 1
                raise Busy(f"this node is re-checking its limit of {self.config.max_rechecks} accusations: try again later")
            case = self._remember(Case(digest, accusation.accused_id, accusation.accuser_id, accusation.model, accusation.blocks, accusation.dtype, now))
            self.counts["heard"] += 1
        for verdict in verdicts:
            if verdict.judge != accusation.accused and (verdict.judge in case.verdicts or len(case.verdicts) < 2 * self.config.quorum + 8):
                case.verdicts[verdict.judge] = verdict.signature
        if case.convicted or case.acquitted or case.running:
            return case, self._forward_once(case)
        if rerun is not None:
            await self._recheck(case, accusation, rerun, now, precision)
        else:
            judges = self._qualified_judges(case, now)
            if len(judges) >= self.config.quorum:
                self._convict(case, now, f"verdicts of {', '.join(sorted(judges))}")
        return case, self._forward_once(case)

    async def _recheck(self, case: Case, accusation: Accusation, rerun: Rerun, now: float, precision: str) -> None:
        if self.rechecking >= self.config.max_rechecks:
            self.counts["busy"] += 1
            raise Busy(f"this node is re-checking its limit of {self.config.max_rechecks} accusations: try again later")
        self.rechecking += 1
        case.running = True
        try:
            reference = await rerun(accusation.blocks, accusation.inputs())
        finally:
            self.rechecking -= 1
            case.running = False
        found = accusation.verdict(reference)
        case.error = found.error
        case.tolerance = tolerance(accusation.dtype, self.declared(case.accused), precision, accusation.blocks[1] - accusation.blocks[0])
        if found.error > case.tolerance:
            case.verdicts[self.identity.public_key_bytes] = Verdict.sign(self.identity, case.digest).signature
            self._convict(case, now, f"re-run here: row {found.row} is off by {found.error:.2%}")
        else:
            case.acquitted = True
            self.counts["acquitted"] += 1
            self.false_accusers.bar(accusation.accuser, now + self.config.false_accuser_s)
            log.warning("false accusation of %s by %s: its outputs agree (error %.2g)", case.accused, case.accuser, found.error)

    def declared(self, peer_id: str) -> str:
        """The precision `peer_id`'s record declares; float32 (the strictest) when this node holds no record of it."""
        record = self.table.get(peer_id)
        return DEFAULT_PRECISION if record is None else record.precision

    def _qualified_judges(self, case: Case, now: float) -> set[str]:
        """Peer ids of verdicts by proven peers whose live records hold the case's blocks of its model."""
        judges = set()
        for key in case.verdicts:
            verdict = Verdict(key, case.verdicts[key])
            judge = verdict.judge_id
            record = self.table.get(judge)
            if record is None or self.table.standing(judge) is None or not record.is_live(now):
                continue
            if record.model_digest != case.model or record.span is None:
                continue
            if record.span[0] <= case.blocks[0] and case.blocks[1] <= record.span[1]:
                judges.add(judge)
        return judges

    def _convict(self, case: Case, now: float, why: str) -> None:
        case.convicted = True
        self.counts["convicted"] += 1
        self.convicted.bar(case.accused, now + self.config.conviction_s)
        if self.table.remove(case.accused):
            log.warning("peer %s convicted of wrong outputs for blocks %s (%s): dropped and barred", case.accused, case.blocks, why)
        else:
            log.warning("peer %s convicted of wrong outputs for blocks %s (%s): barred", case.accused, case.blocks, why)

    def _forward_once(self, case: Case) -> bool:
        if case.convicted and not case.forwarded:
            case.forwarded = True
            return True
        return False

    def _remember(self, case: Case) -> Case:
        self.cases[case.digest] = case
        while len(self.cases) > self.config.max_remembered:
            self.cases.popitem(last=False)  # a conviction outlives its case: it is in `convicted`
        return case

    def stats(self) -> dict[str, int]:
        """For /info."""
        return {**self.counts, "remembered": len(self.cases), "barred": len(self.convicted), "rechecking": self.rechecking, "in_flight": self.in_flight}
