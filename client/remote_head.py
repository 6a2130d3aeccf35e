"""The LM head applied by the route's last hop (`swarm-node --serve-head`), for a client without a GPU.

A client whose head runs on its CPU spends more time per token on it (a [D] x
[D, V] product: 16.8 ms for a 128k vocabulary) than a GPU swarm spends on every
block. When the route's last hop advertises `serves_head` in its signed record,
the session asks it (`Open.head = K`) to apply the head itself and answer each
step with only what sampling needs (swarm/head_protocol.py), for each row the
step outputs (one, or all k+1 of a speculative step with output "all": `len()`,
`row(i)`): the top K token ids, their logits, and the logsumexp over all V logits.

What sampling makes of that (`Candidates`):
- greedy: exact (the argmax is the first candidate);
- logprobs: exact for the candidates (logit - logsumexp), and the top
  alternatives are candidates whenever K >= the number asked (K >= 20 always);
- top_k <= K: exact; top_p and temperature sample among the K candidates only
  (the tail beyond them never comes out);
- penalties (repetition, presence, frequency) move the candidates only.

If the last hop does not serve the head (a failover put another node there, or
none serves it), its answer is the hidden state as usual and the client's own
head runs: the client always holds the head, since it embeds the tokens. The
hop applies the head to each row it sends exactly as it is sent on the wire
(the last position's, or every position's for a step with output "all": a
speculative step of k+1 positions), the tensor the client's own head would
read, so on the same dtype both give the same logits and greedy text does not
change across such a failover.

A checked generation (client/verification.py) keeps a sample of the rows a
head-serving hop answered (`HeadTape`: the hidden row it applied the head to,
as tapped and sealed, and its candidates; a speculative step answers several);
afterwards the client applies its own head to those hidden rows and compares
(`wrong_candidates`). A hop whose
candidates are not the top K of the logits is banned by this client. The
candidates are not signed, so nobody else is told: it is a local ban.

`ClientConfig.session.remote_head`: "auto" (default) asks a serving last hop
when the client's head is on the CPU, "always" whenever the last hop serves
it, "never" never. `remote_head_config` resolves "auto" against the head.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from swarm.head_protocol import HeadResult
from swarm.protocol import MAX_HEAD_K, BadMessage
from swarm.records import PeerRecord

if TYPE_CHECKING:
    from client.planner import ClientConfig
    from client.session import RemoteHop

MODES = ("auto", "always", "never")
MIN_CANDIDATES = 20  # the most logprobs alternatives SamplingParams allows: they are always candidates


@dataclass(frozen=True)
class Candidates:
    """One step's answer of a head-serving last hop, for each of the T rows it output: what sampling
    needs instead of all V logits. `len()` is T; `row(i)` is row i alone, on which `dense()` and
    `logprobs()` are defined (a step with output "last" answers one row)."""

    ids: torch.Tensor  # [T, K] int64, most likely first
    logits: torch.Tensor  # [T, K] float32, each row descending
    logsumexp: torch.Tensor  # [T] float32, each over all V logits of its row
    vocab_size: int

    @classmethod
    def of(cls, message: HeadResult, vocab_size: int) -> Candidates:
        """The candidates of a checked `head_result`; ids outside the vocabulary are a `BadMessage`."""
        assert message.ids is not None and message.logits is not None and message.logsumexp is not None
        if bool((message.ids >= vocab_size).any()):
            raise BadMessage(f"head_result names token ids outside the vocabulary of {vocab_size}")
        return cls(message.ids, message.logits, message.logsumexp, vocab_size)

    @classmethod
    def one(cls, ids: torch.Tensor, logits: torch.Tensor, logsumexp: float, vocab_size: int) -> Candidates:
        """A one-row Candidates from ids [K], logits [K] and a logsumexp."""
        return cls(ids.reshape(1, -1), logits.reshape(1, -1), torch.tensor([logsumexp], dtype=torch.float32), vocab_size)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def row(self, i: int) -> Candidates:
        """Row `i` alone (negative counts from the end, as in a list)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        return Candidates(self.ids[i : i + 1], self.logits[i : i + 1], self.logsumexp[i : i + 1], self.vocab_size)

    def _one(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if len(self) != 1:
            raise ValueError(f"defined on one row: these candidates hold {len(self)}, take .row(i)")
        return self.ids[0], self.logits[0], float(self.logsumexp[0])

    def dense(self) -> torch.Tensor:
        """[V] float32 logits of a one-row Candidates for the sampler: the candidates' own, -inf elsewhere (never sampled)."""
        ids, values, _ = self._one()
        logits = torch.full((self.vocab_size,), float("-inf"))
        logits[ids] = values
        return logits

    def logprobs(self, token_id: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        """`token_id`'s log-probability under the model and the `top` most likely (id, logprob), for a one-row Candidates: exact."""
        ids, values, lse = self._one()
        where = (ids == token_id).nonzero()
        assert where.numel(), "the sampler picks candidates only"
        logprobs = values - lse
        best = tuple(zip(ids[:top].tolist(), logprobs[:top].tolist()))
        return float(logprobs[int(where[0, 0])]), best


def head_request(mode: str, candidates: int, vocab_size: int, hop: RemoteHop, record: PeerRecord | None, last: bool) -> int:
    """K to ask `hop` for at open (0: none): only of the route's last hop, ending at the last block,
    whose signed record says it serves the head, and only once the vocabulary is known."""
    if mode == "never" or not vocab_size or not last or record is None or not record.serves_head:
        return 0
    return candidates if hop.end == record.num_layers else 0


def remote_head_config(config: ClientConfig, head_device: torch.device | str, vocab_size: int) -> ClientConfig:
    """`config` with `session.remote_head` resolved for a client whose head is on `head_device`:
    "auto" asks last hops for the head only when the client's own head is on the CPU."""
    session = config.session
    if session.remote_head not in MODES:
        raise ValueError(f"remote_head must be one of {', '.join(MODES)}, not {session.remote_head!r}")
    if not MIN_CANDIDATES <= session.head_candidates <= MAX_HEAD_K:
        raise ValueError(f"head_candidates must be in [{MIN_CANDIDATES}, {MAX_HEAD_K}], not {session.head_candidates!r}")
    mode = session.remote_head
    if mode == "auto":
        mode = "always" if torch.device(head_device).type == "cpu" else "never"
    return replace(config, session=replace(session, remote_head=mode, vocab_size=vocab_size))


# --- checking a hop's candidates against the client's own head ------------------------------------

HEAD_TOLERANCE = 0.02  # of the step's largest |logit| (at least 1): a bf16 GPU head against a float32 CPU one


def wrong_candidates(logits: torch.Tensor, answer: Candidates, tolerance: float = HEAD_TOLERANCE) -> str | None:
    """Why the one-row `answer` is not the top K of `logits` [V] (the client's own head on the same hidden row), or None.

    Each candidate's logit, and the logsumexp, must match within `tolerance` of the largest
    |logit|, and no other token may beat the weakest candidate by more than that: a hop that
    hides the likeliest tokens, or reweights them, is caught."""
    ids, values, lse = answer._one()
    limit = tolerance * max(1.0, float(logits.abs().max()))
    error = float((logits[ids] - values).abs().max())
    if error > limit:
        return f"candidate logits off by {error:.3g} (limit {limit:.3g})"
    rest = logits.clone()
    rest[ids] = float("-inf")
    if float(rest.max()) > float(values[-1]) + limit:
        return f"token {int(rest.argmax())} is likelier than a candidate but was left out"
    if abs(float(torch.logsumexp(logits, 0)) - lse) > limit:
        return "the logsumexp does not match the logits"
    return None


class HeadTape:
    """A uniform sample of at most `keep` rows answered by head-serving hops, for a checked generation.

    Rows, not steps: a speculative step answers up to MAX_HEAD_ROWS of them, each checked on its own.
    Reservoir sampling: memory and the check's cost stay bounded however long the generation,
    and no hop can tell which of its rows are kept (every step's answer comes to the client)."""

    def __init__(self, keep: int = 16, rng: random.Random | None = None) -> None:
        self.keep = keep
        self.rng = rng or random.Random()
        self.seen = 0  # rows
        self.steps: list[
            tuple[RemoteHop, torch.Tensor, Candidates]
        ] = []  # (hop, hidden row [1, D] it applied the head to, its one-row answer)

    def add(self, hop: RemoteHop, hidden: torch.Tensor, answer: Candidates) -> None:
        """One step's answer: hidden [T, D] as the hop sent it (its last T rows are those answered)."""
        rows = hidden[-len(answer) :]
        for i in range(len(answer)):
            self.seen += 1
            if len(self.steps) < self.keep:
                self.steps.append((hop, rows[i : i + 1].clone(), answer.row(i)))
            elif (slot := self.rng.randrange(self.seen)) < self.keep:
                self.steps[slot] = (hop, rows[i : i + 1].clone(), answer.row(i))

    def check(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> tuple[RemoteHop, str] | None:
        """The first kept row whose candidates are not those of `logits(hidden)` ([1, D] -> [1, V]): (hop, why)."""
        for hop, hidden, answer in self.steps:
            why = wrong_candidates(logits(hidden)[0].float().cpu(), answer)
            if why is not None:
                return hop, why
        return None
