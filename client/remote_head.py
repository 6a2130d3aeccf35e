"""The LM head applied by the route's last hop (`swarm-node --serve-head`), for a client without a GPU.

A client whose head runs on its CPU spends more time per token on it (a [D] x
[D, V] product: 16.8 ms for a 128k vocabulary) than a GPU swarm spends on every
block. When the route's last hop advertises `serves_head` in its signed record,
the session asks it (`Open.head = K`) to apply the head itself and answer each
step with only what sampling needs (swarm/head_protocol.py): the top K token
ids, their logits, and the logsumexp over all V logits.

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
hop applies the head to the last position exactly as it is sent on the wire,
the tensor the client's own head would read, so on the same dtype both give the
same logits and greedy text does not change across such a failover.

`ClientConfig.session.remote_head`: "auto" (default) asks a serving last hop
when the client's head is on the CPU, "always" whenever the last hop serves
it, "never" never. `remote_head_config` resolves "auto" against the head.
"""

from __future__ import annotations

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
    """One step's answer of a head-serving last hop: what sampling needs instead of all V logits."""

    ids: torch.Tensor  # [K] int64, most likely first
    logits: torch.Tensor  # [K] float32, descending
    logsumexp: float  # over all V logits
    vocab_size: int

    @classmethod
    def of(cls, message: HeadResult, vocab_size: int) -> Candidates:
        """The candidates of a checked `head_result`; ids outside the vocabulary are a `BadMessage`."""
        assert message.ids is not None and message.logits is not None
        if bool((message.ids >= vocab_size).any()):
            raise BadMessage(f"head_result names token ids outside the vocabulary of {vocab_size}")
        return cls(message.ids, message.logits, message.logsumexp, vocab_size)

    def dense(self) -> torch.Tensor:
        """[V] float32 logits for the sampler: the candidates' own, -inf elsewhere (never sampled)."""
        logits = torch.full((self.vocab_size,), float("-inf"))
        logits[self.ids] = self.logits
        return logits

    def logprobs(self, token_id: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
        """`token_id`'s log-probability under the model and the `top` most likely (id, logprob): exact."""
        where = (self.ids == token_id).nonzero()
        assert where.numel(), "the sampler picks candidates only"
        logprobs = self.logits - self.logsumexp
        best = tuple(zip(self.ids[:top].tolist(), logprobs[:top].tolist()))
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
