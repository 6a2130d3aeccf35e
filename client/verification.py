"""Verified outputs, the I/O part: re-run a checked hop on other replicas, settle, ban and accuse.

After a selected generation's text is complete (it never changes the text and
adds no latency to its tokens), the chosen hop's tape (client/verify.py)
becomes evidence: the hop's inputs and outputs step by step, and its seal over
them, checked against the key it proved at open. The inputs go to another
replica of the hop's blocks as one stateless `POST /forward` (it seals its
answer too): where the transcript rewinds (speculative decoding: a step starts
at the first rejected draft and overwrites from there), that is the final
sequence, each position's last input, which reproduces every row the hop sent
that no later step rewound over (swarm/accusation.py). The hop's outputs are compared with the re-run within the
tolerance for the two parties' precisions (`swarm.precision.tolerance`: the wire dtype's rounding when both
declare the same full precision, far wider across precisions). Replicas of the hop's own precision are asked
first. The hop's precision is the one its record declared when this client planned it (a record signed later
cannot widen it); the replica's, its record's now. A client that requires full precision (`ClientConfig.full_precision`) re-runs on full-precision replicas
only and never widens the tolerance for a hop that declares int8. On disagreement a third replica
re-runs the same inputs, and the party it sides against is the liar: it is
banned by this client for long, and an accusation signed with this client's
identity is sent to the nodes holding those blocks (which re-check it before
they believe it) and to a few other peers this client has proven. With no third
replica, the disagreement is reported and nobody is accused: one replica's word
against the hop's proves nothing.

A generation that failed over is not checked: its hops' transcripts do not
start at position 0 in one session (a splice rebuilds caches from a /forward, a
re-route replays the prefix), so they could not be replayed as one prefill.

Where the last hop applied the LM head (`--serve-head`, client/remote_head.py),
its blocks are checked as any hop's (it still sends and seals its hidden
output), and the candidates it derived from them are checked by the client
itself, on a sample of the steps (`HeadTape`): the client applies its own head
to the hidden states the hop applied its head to and compares. A hop caught is
banned by this client (verdict `head wrong`); the candidates carry no
signature, so there is nothing to accuse it with. A client given no head to
check with says in `reason` that the head was not checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import torch

from client.planner import ClientConfig, Planner
from client.remote_head import HeadTape
from client.session import RemoteHop, RouteSession
from client.verify import NotVerifiable, Selector, Tape, Verdict, Verification, frozen, recipients, replicas, settle
from swarm import wire
from swarm.accusation import Accusation, Evidence
from swarm.errors import IdentityMismatch, PeerUnavailable, SignatureInvalid, SwarmError, error_from_code
from swarm.identity import Identity
from swarm.precision import DEFAULT_PRECISION, is_full, tolerance
from swarm.seal import FORWARD_SESSION, TOLERANCE, Transcript, check_seal, difference, tensor_digest
from swarm.transport import PinMismatch

log = logging.getLogger(__name__)


@dataclass
class _Rerun:
    """One replica's sealed answer to the evidence's inputs."""

    peer_id: str
    public_key: bytes
    output: dict[str, Any]  # the wire tensor as it sent it
    hidden: torch.Tensor  # ... as floats [L, D]
    seal: bytes
    precision: str  # what its record declares (swarm/precision.py)


class Verifier:
    """Checks a fraction of one client's generations; holds the client's per-process identity."""

    def __init__(
        self, planner: Planner, config: ClientConfig, identity: Identity | None = None, logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self.planner = planner
        self.config = config
        self.identity = identity or Identity.generate()  # accusations are signed by this client, whoever it is
        self.logits = logits  # the client's own head ([1, D] -> [1, V]): checks a last hop's candidates
        self.selector = Selector(config.verify_fraction, config.verify_seed)

    def plan(self, session: RouteSession, requested: bool | None = None) -> Tape | None:
        """Draw whether this generation is checked and which hop; the tape goes on the session."""
        if not self.selector.select(requested):
            return None
        tape = Tape(self.selector.hop(len(session.hops)))
        session.tape = tape
        session.head_tape = HeadTape()
        return tape

    async def check(self, http: aiohttp.ClientSession, session: RouteSession | None, tape: Tape | None, clean: bool) -> Verification | None:
        """Check the tape's hop (None when the generation was not selected), and the head where a hop applied it."""
        if tape is None:
            return None
        if session is None or session.tape is not tape or not clean:
            outcome = Verification(Verdict.SKIPPED, "the route changed during the generation (failover): its transcripts are no clean prefix")
            return outcome if session is None else await self._check_head(session, outcome)
        hop, session_id, key = session.proven(tape.hop)
        blocks = (hop.start, hop.end)
        outcome = Verification(Verdict.SKIPPED, hop=str(hop), peer_id=hop.peer_id, blocks=blocks)
        try:
            outcome = await asyncio.wait_for(self._check(http, session, tape, session_id, key, outcome), self.config.verify_timeout_s)
        except asyncio.TimeoutError:
            outcome.verdict, outcome.reason = Verdict.SKIPPED, f"the check took over {self.config.verify_timeout_s:g} s"
        return await self._check_head(session, outcome)

    async def _check_head(self, session: RouteSession, outcome: Verification) -> Verification:
        """Apply our own head to a sample of the hidden states a last hop applied its head to, and compare."""
        tape = session.head_tape
        if tape is None or not tape.steps:
            return outcome  # no hop applied the head in this generation
        hops = ", ".join(sorted({str(hop) for hop, _, _ in tape.steps}))
        if self.logits is None:
            return _noted(outcome, f"the LM head applied by {hops} (--serve-head) was not checked")
        found = await asyncio.to_thread(tape.check, self.logits)
        if found is None:
            return _noted(outcome, f"the LM head applied by {hops} agreed on {len(tape.steps)} of its {tape.seen} rows")
        hop, why = found
        reason = f"its LM-head candidates are not its hidden state's: {why}"
        if hop.peer_id:
            self.planner.measurements.ban(hop.peer_id, reason, self.planner.clock())
        if outcome.verdict in (Verdict.AGREE, Verdict.SKIPPED):
            outcome.verdict, outcome.hop, outcome.peer_id, outcome.blocks = Verdict.HEAD_WRONG, str(hop), hop.peer_id, (hop.start, hop.end)
        log.warning("%s: %s", hop, reason)
        return _noted(outcome, f"{hop}: {reason}")

    async def _check(self, http: aiohttp.ClientSession, session: RouteSession, tape: Tape, session_id: str, key: bytes, outcome: Verification) -> Verification:
        hop = session.hops[tape.hop].hop
        blocks = (hop.start, hop.end)
        if not await session.settle(self.config.session.step_timeout_s):
            outcome.reason = "the hop's taps did not all arrive"
            return outcome
        try:
            evidence = tape.evidence(session.model, blocks, session_id, key)
        except NotVerifiable as exc:
            outcome.reason = str(exc)
            return outcome
        dtype = evidence.dtype
        positions, _ = evidence.claimed()
        # A transcript that rewinds (speculation's rejected drafts) is re-run as its final sequence,
        # one prefill: it reproduces every row no later step rewound over (swarm/accusation.py).
        outcome.tokens, outcome.tolerance = evidence.length, TOLERANCE.get(dtype, TOLERANCE["float32"])
        if not check_seal(key, evidence.seal, evidence.transcript_digest()):
            return self._unsealed(session, tape, outcome)
        banned = self.planner.measurements.banned(self.planner.clock())
        spans = [(r.peer_id, *r.span) for r in self.planner.routable()]  # full_precision: full-precision replicas only
        mine, count = self.precision_of(hop), blocks[1] - blocks[0]
        # Replicas of the hop's own precision first: between them the tolerance is the wire's rounding alone.
        others = sorted(self.selector.shuffled(replicas(spans, blocks, {hop.peer_id, *banned})), key=lambda p: self._declared(p) != mine)
        inputs = frozen(evidence.inputs(), dtype)
        first = await self._rerun_on(http, others, blocks, inputs)
        if first is None:
            outcome.reason = "no other replica of the hop's blocks re-ran its inputs"
            return outcome
        outcome.replica = first.peer_id
        outcome.error = evidence.verdict(first.hidden).error
        outcome.tolerance = tolerance(dtype, mine, first.precision, count)
        if outcome.error <= outcome.tolerance:
            outcome.verdict = Verdict.AGREE
            return outcome
        third = await self._rerun_on(http, [p for p in others if p != first.peer_id], blocks, inputs)
        if third is None:
            outcome.verdict, outcome.reason = Verdict.DISPUTED, "no third replica to settle it: nobody is accused"
            return outcome
        outcome.third = third.peer_id
        with_hop = evidence.verdict(third.hidden).error <= tolerance(dtype, mine, third.precision, count)
        with_replica = difference(first.hidden[positions], third.hidden[positions]).error <= tolerance(dtype, first.precision, third.precision, count)
        outcome.verdict = settle(False, with_hop, with_replica)
        if outcome.verdict is Verdict.HOP_LIED:
            accusation = evidence
        elif outcome.verdict is Verdict.REPLICA_LIED:
            step = Evidence(0, 0, inputs, first.output)
            accusation = Accusation(session.model, blocks, FORWARD_SESSION, first.public_key, (step,), first.seal)
        else:
            outcome.reason = "the third replica sided with neither: nobody is accused"
            return outcome
        accused = accusation.accused_id
        outcome.accused = accused
        self.planner.convict(accused, f"sent outputs of blocks [{blocks[0]}, {blocks[1]}) off by {outcome.error:.2e} (verified)")
        outcome.convinced = await self._accuse(http, accusation.signed_by(self.identity), blocks)
        log.info("%s", outcome.summary())
        return outcome

    def _declared(self, peer_id: str) -> str:
        record = self.planner.view.table.get(peer_id)
        return DEFAULT_PRECISION if record is None else record.precision

    def precision_of(self, hop: RemoteHop) -> str:
        """The precision `hop` is held to: its record's when this client planned it (else the table's now, else
        float32). With `full_precision` a declared int8 buys nothing: the hop is held to float32's rule."""
        record = hop.record or self.planner.view.table.get(hop.peer_id)
        precision = DEFAULT_PRECISION if record is None else record.precision
        return DEFAULT_PRECISION if self.config.full_precision and not is_full(precision) else precision

    def _unsealed(self, session: RouteSession, tape: Tape, outcome: Verification) -> Verification:
        """The hop's seal does not sign the outputs it sent us for the inputs it got. Its input came from
        the client (first hop: it is at fault) or from the hop before it (one of the two is): the seal
        proves nothing to anyone else, so this is a local ban, not an accusation."""
        outcome.verdict = Verdict.UNSEALED
        suspects = [session.hops[i].hop for i in ((tape.hop,) if tape.hop == 0 else (tape.hop - 1, tape.hop))]
        outcome.reason = f"its seal does not cover the outputs it sent (suspects: {', '.join(map(str, suspects))})"
        for suspect in suspects:
            if suspect.peer_id:
                self.planner.measurements.ban(suspect.peer_id, outcome.reason, self.planner.clock())
        return outcome

    async def _rerun_on(self, http: aiohttp.ClientSession, peers: list[str], blocks: tuple[int, int], inputs: dict[str, Any]) -> _Rerun | None:
        """The first of `peers` that answers the re-run with a sealed output of the right shape."""
        for peer_id in peers:
            record = self.planner.view.table.get(peer_id)
            url = None if record is None else self.planner.address(record)
            if url is None:
                continue
            try:
                return await self._rerun(http, url, peer_id, record.public_key, blocks, inputs, record.precision)
            except SwarmError as exc:
                log.info("replica %s did not re-run blocks %s: %s", peer_id[:8], blocks, exc)
        return None

    async def _rerun(
        self, http: aiohttp.ClientSession, url: str, peer_id: str, key: bytes, blocks: tuple[int, int], inputs: dict[str, Any], precision: str
    ) -> _Rerun:
        body = wire.encode({"type": "forward", "model": self.planner.model_digest, "blocks": list(blocks), "hidden": inputs})
        message = await self._post(http, f"{url.rstrip('/')}/forward", peer_id, body)
        if message.get("type") == "error":
            raise error_from_code(str(message.get("code")), f"{peer_id[:8]}: {message.get('message')}")
        output = message.get("hidden")
        tokens, width = inputs["shape"]
        hidden = wire.unpack_tensor(output, hidden_size=width, max_tokens=tokens)
        if hidden.shape[0] != tokens or output.get("dtype") != inputs["dtype"] or message.get("peer_id") != peer_id:
            raise SignatureInvalid(f"{peer_id[:8]} answered a re-run with another shape, dtype or peer id")
        seal = message.get("seal")
        transcript = Transcript(self.planner.model_digest, blocks, FORWARD_SESSION, peer_id)
        digest = transcript.update(0, 0, tensor_digest(inputs["dtype"], inputs["shape"], inputs["data"]), tensor_digest(output["dtype"], output["shape"], output["data"]))
        if not isinstance(seal, bytes) or not check_seal(key, seal, digest):
            raise SignatureInvalid(f"{peer_id[:8]} did not seal its re-run")
        return _Rerun(peer_id, key, {"dtype": output["dtype"], "shape": list(output["shape"]), "data": output["data"]}, hidden.float(), seal, precision)

    async def _accuse(self, http: aiohttp.ClientSession, accusation: Accusation, blocks: tuple[int, int]) -> list[str]:
        """Send the signed accusation to the other holders of the blocks first, then to a few other
        peers this client proved (they signed its nonce at open); the peers it convinced."""
        spans = [(r.peer_id, *r.span) for r in self.planner.records() if r.span is not None]
        holders = replicas(spans, blocks, ())
        proven = [p for p, stats in self.planner.measurements.peers.items() if stats.steps > 0]
        targets = recipients(holders, self.selector.shuffled(proven), accusation.accused_id, self.config.accuse_fanout)
        body = wire.encode(accusation.to_wire())
        convinced: list[str] = []
        for group in ([p for p in targets if p in holders], [p for p in targets if p not in holders]):
            results = await asyncio.gather(*(self._deliver(http, peer_id, body) for peer_id in group))
            convinced.extend(p for p, ok in zip(group, results) if ok)
        return convinced

    async def _deliver(self, http: aiohttp.ClientSession, peer_id: str, body: bytes) -> bool:
        record = self.planner.view.table.get(peer_id)
        url = None if record is None else self.planner.address(record)
        if url is None:
            return False
        try:
            message = await self._post(http, f"{url.rstrip('/')}/accusations", peer_id, body)
        except SwarmError as exc:
            log.info("accusation not delivered to %s: %s", peer_id[:8], exc)
            return False
        if message.get("type") == "error":
            log.info("%s refused the accusation: %s", peer_id[:8], message.get("message"))
            return False
        return message.get("convicted") is True  # its judgement (node/court.py): re-checked, or enough verdicts

    async def _post(self, http: aiohttp.ClientSession, url: str, peer_id: str, body: bytes) -> dict[str, Any]:
        """One request on the generation's HTTP session (the transport's: private-swarm proofs ride on
        it), pinned to `peer_id`: a replica's answer must come from the replica the record names."""
        timeout = aiohttp.ClientTimeout(total=self.config.session.step_timeout_s)
        try:
            async with http.post(
                url, data=body, headers={"Content-Type": "application/msgpack"}, timeout=timeout, ssl=self.config.transport.pin(peer_id)
            ) as response:
                return wire.decode(await response.read(), self.config.session.max_frame)
        except PinMismatch as exc:
            raise IdentityMismatch(f"{peer_id[:8]} at {url} refused: peer {exc.got_peer or '(no identity key)'} answered there") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise PeerUnavailable(f"cannot reach {peer_id[:8]} at {url}: {exc or type(exc).__name__}") from None



def _noted(outcome: Verification, note: str) -> Verification:
    outcome.reason = f"{outcome.reason}; {note}" if outcome.reason else note
    return outcome
