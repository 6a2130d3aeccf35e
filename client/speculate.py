"""Speculative decoding: drafts, the rules that accept them, and how many to send.

A round sends the current token and k draft tokens as one step of k + 1 positions
(output "all"); the route answers k + 1 rows of logits. Row i is the model's
distribution after the current token and drafts 1..i, so it checks draft i + 1;
the last row gives one more token for free when every draft is kept. The
client keeps the longest prefix of drafts the model agrees with and the token
that follows; the next round starts at the first rejected position, where
every hop overwrites its KV cache (positions are explicit: rewinding is how
rejected drafts are dropped; swarm/model/block.py's KVCache).

Acceptance (`verify_round`), one row at a time, with `pick(row)` the token the
`Sampler` (client/generate.py) draws at that position:
- greedy: the target token is the argmax of the processed logits; keep drafts
  while they equal it, then the target's own token;
- sampling: the standard rule accepts a draft x with probability min(1, p(x)/q(x))
  and on a reject samples norm(max(0, p - q)). Our drafters are deterministic (q
  a point mass on x), so that is: accept with probability p(x), else sample p
  with x removed. Drawing y ~ p and accepting iff y == x is exactly that
  (P(accept) = p(x); given y != x, y ~ p restricted to the rest, renormalised),
  and it is what `Sampler` does: every position's draw comes from a generator
  seeded by (seed, position), so a seed gives the same text with or without
  speculation, whatever k the policy picked (tests/test_speculate.py checks the
  rule statistically too).

`AdaptiveDraft` picks k each round to maximise expected tokens per second: it
keeps an EMA of acceptance per draft position and of step wall time by size,
and sends no drafts (k = 0, plain one-token steps) when they would not pay,
with an occasional one-draft probe so it notices when drafts start to hit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

MAX_DRAFT = 32  # SamplingParams.max_draft's bound: a round is at most 33 positions (MAX_HEAD_ROWS)


class Drafter(Protocol):
    """Proposes tokens that may continue a text; wrong ones only cost compute."""

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` draft ids continuing `ids` (prompt + generated so far), possibly none."""
        ...


class PromptLookup:
    """Drafts by n-gram lookup: the last n tokens (n from `max_ngram` down to `min_ngram`) are
    looked up in the prompt and text so far; the most recent earlier occurrence proposes the
    tokens that followed it. No model: it hits where the reply copies (rewriting, quoting,
    summarising a given passage, code edits) and proposes nothing elsewhere.

    The index is incremental: a call whose `ids` extend the previous call's costs only the
    new tokens (a different text is indexed afresh)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._ids: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> latest start that has a token after it

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        if k <= 0 or len(ids) < 2:
            return []
        self._index(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            start = self._last.get(tuple(ids[-n:]))
            if start is not None:
                return list(ids[start + n : start + n + k])
        return []

    def _index(self, ids: Sequence[int]) -> None:
        known = len(self._ids)
        if known > len(ids) or list(ids[:known]) != self._ids:
            self._ids, self._last, known = [], {}, 0
        self._ids.extend(ids[known:])
        # An n-gram starting at s is indexed once a token follows it (s + n < len(ids)): the tail
        # itself is never its own match.
        for end in range(max(known, 1), len(ids)):  # n-grams ending at position end - 1
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n >= 0:
                    self._last[tuple(ids[end - n : end])] = end - n


def verify_round(drafts: Sequence[int], rows: int, pick: Callable[[int], int]) -> tuple[int, list[int]]:
    """Which tokens a round yields: (drafts accepted, tokens in order).

    `pick(i)` is the target's token at row i (row i follows the current token and drafts[:i]),
    called in order and only while every earlier draft was accepted. The tokens are the
    accepted drafts and then the target's token at the first disagreement, or the bonus token
    of row len(drafts) when all agree. `rows` is how many rows the step answered (len(drafts) + 1)."""
    assert rows == len(drafts) + 1, "one row per draft and one more"
    out: list[int] = []
    for i in range(rows):
        token = pick(i)
        out.append(token)
        if i == len(drafts) or token != drafts[i]:
            return i, out
    raise AssertionError("unreachable")


class AdaptiveDraft:
    """How many drafts to send each round, from what the rounds so far measured.

    Expected tokens a round of k drafts yields: E(k) = 1 + sum_j prod_{i<=j} a_i, a_i the
    EMA of draft i being accepted when drafts 1..i-1 were. Its cost: the step's wall time
    for k + 1 positions (EMA per size; sizes not measured yet extrapolated linearly from the
    one-position time and the measured cost per extra position) plus the drafter's time.
    k maximises E(k) / cost(k); no drafts unless that beats plain steps by `margin`. At
    k = 0 a round sends one draft after `probe_every` idle rounds, so acceptance is measured
    again; each probe that misses doubles that wait (up to `max_probe_gap`), so text where
    drafts never hit pays for a probe ever more rarely, and one that hits resets it.
    """

    def __init__(
        self,
        max_draft: int,
        prior: float = 0.6,
        rate: float = 0.3,
        margin: float = 0.03,
        probe_every: int = 8,
        max_probe_gap: int = 128,
        extra_prior: float = 0.05,
    ) -> None:
        self.max_draft = max(0, min(max_draft, MAX_DRAFT))
        self.accept = [prior] * self.max_draft  # a_i, i = 0..max_draft-1 (draft i + 1)
        self.rate = rate
        self.margin = margin
        self.probe_every = probe_every
        self.max_probe_gap = max_probe_gap
        self.probe_gap = probe_every  # idle rounds before the next probe
        self.probing = False  # the round in flight is a probe
        self.extra_prior = extra_prior  # an extra position's cost, as a share of a one-position step, until measured
        self.times: dict[int, float] = {}  # step size -> EMA wall seconds
        self.extra: float | None = None  # EMA seconds per position beyond the first
        self.draft_s = 0.0  # EMA drafter seconds per draft token
        self.idle = 0  # rounds in a row at k = 0

    # --- measurements -------------------------------------------------------------------

    def record_step(self, size: int, seconds: float) -> None:
        """A step of `size` positions took `seconds` (send to logits)."""
        self.times[size] = self._ema(self.times.get(size), seconds)
        one = self.times.get(1)
        if size > 1 and one is not None:
            self.extra = self._ema(self.extra, max(0.0, (seconds - one) / (size - 1)))

    def record_round(self, drafted: int, accepted: int) -> None:
        """`drafted` drafts were sent, the first `accepted` of them kept."""
        for i in range(min(drafted, accepted + 1, self.max_draft)):  # positions past the first miss say nothing
            self.accept[i] = self._ema(self.accept[i], 1.0 if i < accepted else 0.0)
        if self.probing:
            self.probe_gap = self.probe_every if accepted else min(2 * self.probe_gap, self.max_probe_gap)
            self.probing = False

    def record_drafting(self, drafted: int, seconds: float) -> None:
        if drafted:
            self.draft_s = self._ema(self.draft_s, seconds / drafted)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.rate * (new - old)

    # --- the choice ---------------------------------------------------------------------

    def step_time(self, size: int) -> float | None:
        if size in self.times:
            return self.times[size]
        one = self.times.get(1)
        if one is None:
            return None
        extra = self.extra if self.extra is not None else self.extra_prior * one
        return one + extra * (size - 1)

    def expected_tokens(self, k: int) -> float:
        total, chain = 1.0, 1.0
        for i in range(k):
            chain *= self.accept[i]
            total += chain
        return total

    def choose(self, limit: int) -> int:
        """Drafts to ask for this round: 0 <= k <= min(limit, max_draft)."""
        limit = min(limit, self.max_draft)
        if limit <= 0:
            return 0
        plain = self.step_time(1)
        if plain is None:
            # A moderate first guess, measured at once; then one plain step, the baseline to compare with.
            return 0 if self.times else min(limit, 4)
        best_k, best_rate = 0, (1.0 + self.margin) / plain
        for k in range(1, limit + 1):
            rate = self.expected_tokens(k) / (self.step_time(k + 1) + k * self.draft_s)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k:
            self.idle = 0
            return best_k
        self.idle += 1
        if self.idle >= self.probe_gap:
            self.idle, self.probing = 0, True
            return 1  # the cheapest probe
        return 0
