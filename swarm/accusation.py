"""A signed accusation: the evidence that a node sent outputs its blocks do not compute.

The evidence is the accused hop's own sealed transcript (swarm/seal.py) for one
session: every step's input and output exactly as it received and sent them,
and its seal over the last step. `check` replays the chain and verifies both
signatures, so an accusation can only ever hold outputs the accused really
signed; it is then up to a node that holds the same blocks to re-run
`inputs()` and compare with `claimed()` (`verdict`) before it believes it.

The transcript starts at position 0, and each step starts at or before the end
of the step before it (never after: a hop's cache refuses that). A step that
starts before that end rewinds: speculative decoding sends k+1 positions and the
next step starts at the first rejected one, overwriting from there, so the
hop's cache (swarm/model/block.py `KVCache`) then holds only positions up to the
new step's end. Hence every row a hop sent that no later step rewound over was
computed from exactly the inputs that end up at the positions before it: one
stateless prefill of the final sequence (`inputs()`: each position's last
input) reproduces all of them, and `claimed()` holds only those rows. The rows a
later step rewound over (rejected drafts) are not compared: nothing read them
afterwards (no surviving row, and no token the client kept, depends on them),
and their context is gone from the final sequence. The seal still covers every
step, so the chain replays the whole transcript.

What a re-check costs is bounded by the inputs of all steps, not only the final
length (a rewinding transcript repeats positions): at most MAX_EVIDENCE_TOKENS
in all, so the prefill of `inputs()` is too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from swarm import wire
from swarm.errors import BadRequest, SignatureInvalid
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, peer_id_from_public_key, verify
from swarm.protocol import check_session_id
from swarm.seal import Disagreement, Transcript, check_seal, difference, tensor_digest

ACCUSATION_TAG = b"layerswarm/accusation/v1\n"
VERDICT_TAG = b"layerswarm/verdict-guilty/v1\n"
MAX_VERDICTS = 32  # signed verdicts passed along with one accusation
MAX_EVIDENCE_TOKENS = 4096  # inputs over all steps (rewound positions count again); a node re-runs at most this many
MAX_EVIDENCE_STEPS = 4096


@dataclass(frozen=True)
class Evidence:
    """One step of the accused's transcript: its input and output as wire tensors (dicts of dtype, shape, data)."""

    step: int
    position: int
    input: dict[str, Any]
    output: dict[str, Any]

    def to_wire(self) -> list[Any]:
        return [self.step, self.position, self.input, self.output]


@dataclass(frozen=True)
class Accusation:
    """`accused` (an Ed25519 public key) sealed `steps` for `blocks` of `model`; `accuser` signed the charge."""

    model: str
    blocks: tuple[int, int]
    session: str
    accused: bytes
    steps: tuple[Evidence, ...]
    seal: bytes  # the accused's seal over the transcript after the last step
    accuser: bytes = b""
    signature: bytes = b""

    @property
    def accused_id(self) -> str:
        return peer_id_from_public_key(self.accused)

    @property
    def accuser_id(self) -> str:
        return peer_id_from_public_key(self.accuser)

    def transcript_digest(self) -> bytes:
        """The accused's chain replayed over the evidence (what its seal must sign)."""
        transcript = Transcript(self.model, self.blocks, self.session, self.accused_id)
        for e in self.steps:
            transcript.update(e.step, e.position, _digest(e.input), _digest(e.output))
        return transcript.digest

    def payload(self) -> bytes:
        """What the accuser signs: the charge and the accused's digest and seal (which commit to every tensor)."""
        body = [self.model, list(self.blocks), self.session, self.accused, self.transcript_digest(), self.seal]
        return ACCUSATION_TAG + msgpack.packb(body, use_bin_type=True)

    def digest(self) -> bytes:
        """What identifies the charge, whoever brought it: sha256 of `payload()` without the accuser's part."""
        return hashlib.sha256(self.payload()).digest()

    def signed_by(self, accuser: Identity) -> Accusation:
        return Accusation(self.model, self.blocks, self.session, self.accused, self.steps, self.seal,
                          accuser.public_key_bytes, accuser.sign(self.payload()))  # fmt: skip

    def check(self) -> None:
        """Both signatures hold over the replayed evidence; raises `SignatureInvalid` otherwise."""
        digest = self.transcript_digest()
        if not check_seal(self.accused, self.seal, digest):
            raise SignatureInvalid(f"the evidence is not sealed by {self.accused_id}: nothing it signed is in it")
        if not verify(self.accuser, self.signature, self.payload()):
            raise SignatureInvalid("the accuser's signature does not hold")

    @property
    def tokens(self) -> int:
        """Input rows over all steps (a rewound position counts each time it is sent)."""
        return sum(e.input["shape"][0] for e in self.steps)

    @property
    def length(self) -> int:
        """Positions in the hop's cache after the last step: what re-running `inputs()` computes."""
        last = self.steps[-1]
        return last.position + last.input["shape"][0]

    def inputs(self) -> torch.Tensor:
        """The final sequence: each position's last input, [L, D] for positions 0..L-1 (a step
        that rewinds drops everything from its position on, as the hop's cache does)."""
        # Written in place: positions cut off by a rewind are all written again before the end grows
        # past them (a step never starts past the end), so the buffer's first `length` rows are the last writes.
        sequence = torch.empty(max(e.position + e.input["shape"][0] for e in self.steps), self.steps[0].input["shape"][1])
        for e in self.steps:
            x = wire.unpack_tensor(e.input)
            sequence[e.position : e.position + x.shape[0]] = x.float()
        return sequence[: self.length]

    def claimed(self) -> tuple[list[int], torch.Tensor]:
        """The positions the accused sent rows for that no later step rewound over, and those rows [N, D]."""
        positions: list[list[int]] = []  # per step, last step first
        rows = []
        later = self.length  # the smallest start of any later step: rows from there on were rewound over
        for e in reversed(self.steps):
            given, sent = e.input["shape"][0], e.output["shape"][0]
            at = list(range(e.position, e.position + given)) if sent == given else [e.position + given - 1]
            keep = [i for i, p in enumerate(at) if p < later]
            if keep:
                positions.append([at[i] for i in keep])
                rows.append(wire.unpack_tensor(e.output).float()[keep])
            later = min(later, e.position)
        return [p for step in reversed(positions) for p in step], torch.cat(rows[::-1])

    def verdict(self, reference: torch.Tensor) -> Disagreement:
        """How far the claimed rows are from `reference` [L, D], the blocks re-run on `inputs()`."""
        positions, claimed = self.claimed()
        return difference(claimed, reference[positions].float())

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "accusation", "model": self.model, "blocks": list(self.blocks), "session": self.session,
            "accused": self.accused, "steps": [e.to_wire() for e in self.steps], "seal": self.seal,
            "accuser": self.accuser, "signature": self.signature,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, message: dict[str, Any], hidden_size: int | None = None) -> Accusation:
        """Checked whole: types, sizes, tensors (finite, of `hidden_size`), positions from 0 that never
        start past the previous step's end, and at most MAX_EVIDENCE_TOKENS input rows in all."""
        if not isinstance(message, dict) or message.get("type") != "accusation":
            raise BadRequest("not an accusation")
        model = wire.field(message, "model", str)
        if len(model) > 128:
            raise BadRequest("field 'model' is too long")
        blocks = wire.block_range(message)
        if not 0 <= blocks[0] < blocks[1]:
            raise BadRequest("field 'blocks' must be a non-empty range")
        session = check_session_id(message.get("session"))
        keys = {name: wire.field(message, name, bytes) for name in ("accused", "seal", "accuser", "signature")}
        for name, size in (("accused", PUBLIC_KEY_BYTES), ("accuser", PUBLIC_KEY_BYTES), ("seal", SIGNATURE_BYTES), ("signature", SIGNATURE_BYTES)):
            if len(keys[name]) != size:
                raise BadRequest(f"field '{name}' must be {size} bytes")
        raw = wire.field(message, "steps", list)
        if not 0 < len(raw) <= MAX_EVIDENCE_STEPS:
            raise BadRequest(f"an accusation holds 1 to {MAX_EVIDENCE_STEPS} steps")
        steps, end, total, dtype = [], 0, 0, None
        for item in raw:
            if not isinstance(item, list) or len(item) != 4:
                raise BadRequest("each step of an accusation is [step, position, input, output]")
            step, at, given, sent = item
            if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**53:
                raise BadRequest("a step number must be a non-negative integer")
            if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= end:
                raise BadRequest(f"a step starts at or before the end of the one before it (step {step} is at {at!r}, the end is {end})")
            if total >= MAX_EVIDENCE_TOKENS:
                raise BadRequest(f"the evidence's inputs are over {MAX_EVIDENCE_TOKENS} tokens in all (rewound positions count again)")
            # Bounded over all steps, not by the final length: rewinding steps could repeat positions without end.
            x = wire.unpack_tensor(given, hidden_size=hidden_size, max_tokens=MAX_EVIDENCE_TOKENS - total)
            y = wire.unpack_tensor(sent, hidden_size=x.shape[1])
            if y.shape[0] not in (x.shape[0], 1) or {given["dtype"], sent["dtype"]} != {dtype or given["dtype"]}:
                raise BadRequest("a step's output must be all its rows or the last, in the same wire dtype as every input")
            dtype = given["dtype"]
            end, total = at + x.shape[0], total + x.shape[0]
            steps.append(Evidence(step, at, given, sent))
        return cls(model, blocks, session, keys["accused"], tuple(steps), keys["seal"], keys["accuser"], keys["signature"])

    @property
    def dtype(self) -> str:
        return self.steps[0].input["dtype"]


@dataclass(frozen=True)
class Verdict:
    """A node that re-ran an accusation's evidence on its own copy of the blocks found the accused guilty."""

    judge: bytes  # the judging node's Ed25519 public key
    signature: bytes  # over verdict_payload(accusation.digest())

    @property
    def judge_id(self) -> str:
        return peer_id_from_public_key(self.judge)

    @classmethod
    def sign(cls, judge: Identity, accusation_digest: bytes) -> Verdict:
        return cls(judge.public_key_bytes, judge.sign(verdict_payload(accusation_digest)))

    def holds(self, accusation_digest: bytes) -> bool:
        return verify(self.judge, self.signature, verdict_payload(accusation_digest))

    def to_wire(self) -> list[bytes]:
        return [self.judge, self.signature]


def verdict_payload(accusation_digest: bytes) -> bytes:
    return VERDICT_TAG + accusation_digest


def verdicts_from_wire(raw: object, accusation_digest: bytes) -> tuple[Verdict, ...]:
    """A `verdicts` list checked whole: [[public key, signature], ...], each signature over this accusation.

    `BadRequest` for a malformed list, `SignatureInvalid` for a verdict that does not hold."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_VERDICTS:
        raise BadRequest(f"field 'verdicts' must be a list of at most {MAX_VERDICTS} [public key, signature] pairs")
    verdicts = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
            raise BadRequest("each verdict is [public key, signature]")
        if len(item[0]) != PUBLIC_KEY_BYTES or len(item[1]) != SIGNATURE_BYTES:
            raise BadRequest(f"a verdict is a {PUBLIC_KEY_BYTES}-byte key and a {SIGNATURE_BYTES}-byte signature")
        verdicts.append(Verdict(item[0], item[1]))
    for verdict in verdicts:
        if not verdict.holds(accusation_digest):
            raise SignatureInvalid(f"the verdict of {verdict.judge_id} is not a signature over this accusation")
    return tuple(verdicts)


def _digest(tensor: dict[str, Any]) -> bytes:
    return tensor_digest(tensor["dtype"], tensor["shape"], tensor["data"])
