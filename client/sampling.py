"""What to sample: the parameters of a generation and the `Sampler` that picks each token.

The sampler turns a row of logits into a token: penalties, temperature, top-k and top-p where
the logits are, greedy as an argmax, a random draw on the CPU. Each position draws from its own
generator seeded by (seed, position), so a seeded run gives the same tokens however many
positions a step carries (speculative decoding, client/speculate.py, relies on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from client.speculate import MAX_DRAFT
from swarm.errors import BadRequest


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the tokens generated so far
    logprobs: int | None = None  # None: off; else each Token carries its logprob and this many top alternatives
    speculate: bool = True  # send draft tokens with each step (client/speculate.py); the output is the same
    max_draft: int = 8  # the most drafts a step carries (0: no speculation, as speculate=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise BadRequest("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise BadRequest("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise BadRequest("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise BadRequest("repetition_penalty must be > 0")
        if not (-2.0 <= self.presence_penalty <= 2.0 and -2.0 <= self.frequency_penalty <= 2.0):
            raise BadRequest("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise BadRequest("logprobs must be in [0, 20]")
        if not 0 <= self.max_draft <= MAX_DRAFT:
            raise BadRequest(f"max_draft must be in [0, {MAX_DRAFT}]")

    @property
    def drafts(self) -> int:
        """The most drafts a step may carry: 0 when speculation is off."""
        return self.max_draft if self.speculate else 0


class Sampler:
    """Picks the next token from logits on any device; owns its random generator so a seed reproduces a run.

    The generator is a CPU one whatever the logits' device: a seed gives the same draws on
    a GPU client as on a CPU one (the same token wherever the two devices' probabilities
    agree). Penalties, temperature, top-k and top-p run where the logits are; greedy is an
    argmax there; only a random draw moves the probabilities [V] to the CPU.

    The draw for a position is seeded by (seed, `index`): the token at a position depends on
    its distribution alone, not on how many draws came before it. Speculative decoding
    (client/speculate.py) relies on that: a seed gives the same text whatever drafts were sent.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.base = params.seed if params.seed is not None else int(torch.Generator().seed())
        self.draws = 0  # the index of a draw not given one

    def distribution(self, logits: torch.Tensor, history: Sequence[int], generated: Sequence[int] = ()) -> torch.Tensor:
        """The processed distribution [V] (float32, on the CPU) the next token is drawn from at a
        position whose prompt and earlier tokens are `history` (`generated`: only the latter):
        penalties, temperature, top-k, top-p; greedy is a point mass on the argmax."""
        processed = self.processed(logits, history, generated)
        if self.params.temperature == 0:
            return torch.nn.functional.one_hot(processed.argmax(), processed.numel()).float().cpu()
        return processed.softmax(-1).float().cpu()

    def processed(self, logits: torch.Tensor, history: Sequence[int], generated: Sequence[int] = ()) -> torch.Tensor:
        """`logits` [V] after penalties and, when sampling, temperature, top-k and top-p (-inf: never drawn)."""
        p = self.params
        if (p.presence_penalty or p.frequency_penalty) and generated:
            # OpenAI's definition: logit[j] -= count[j] * frequency + (count[j] > 0) * presence.
            ids, counts = torch.tensor(list(generated), dtype=torch.long, device=logits.device).unique(return_counts=True)
            logits = logits.clone()
            logits[ids] -= counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if p.temperature == 0:
            return logits
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
            # Masked in sorted order and scattered back whole: no boolean index, so no device sync.
            logits = torch.empty_like(logits).scatter_(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        return logits

    def __call__(
        self, logits: torch.Tensor, history: Sequence[int], generated: Sequence[int] = (), best: int | None = None, index: int | None = None
    ) -> int:
        """logits [V] (float32) -> token id. `history`: prompt and generated ids; `generated`: only the latter.

        `best`: the argmax of `logits` when already known (client/head_batch.py finds a whole
        batch's at once); greedy decoding without penalties then needs no device sync of its own.
        `index`: which position this draw is for (its seed); by default, one past the last call's."""
        p = self.params
        if index is None:
            index = self.draws
        self.draws = index + 1
        if p.temperature == 0:
            if best is not None and not (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
                return best
            return int(self.processed(logits, history, generated).argmax())
        probs = self.processed(logits, history, generated).softmax(-1).cpu()  # the CPU generator draws: one seed, one run, on any device
        self.generator.manual_seed(_mix(self.base, index))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _mix(seed: int, index: int) -> int:
    """A 64-bit seed for draw `index` of a run seeded `seed` (splitmix64: nearby inputs, unrelated outputs)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
