"""Stop conditions and streaming tokens (sampling itself: client/sampling.py).

Generation is written once, against `Blocks`: anything that runs hidden states
through all transformer blocks for one session, with explicit positions. A
local span in this process is one; a route of remote nodes is another. The
head (embeddings, LM head, tokenizer) stays on the client, on its device (CPU or
GPU), unless a client without a GPU has the last node apply the LM head
(client/remote_head.py); concurrent generations may share its calls through a
`HeadBatcher`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from client.remote_head import Candidates
from client.sampling import Sampler, SamplingParams
from client.speculate import AdaptiveDraft, Drafter, PromptLookup
from swarm.errors import BadRequest
from swarm.model.block import Segment, Span
from swarm.model.engine import DecodeEngine
from swarm.model.head import Head

if TYPE_CHECKING:
    from client.failover import Failover
    from client.head_batch import HeadBatcher
    from client.verify import Verification


class Blocks(Protocol):
    """All transformer blocks of one session: hidden [T, D] at position `start` -> the last row [1, D]
    (`output` "last") or all T rows [T, D] ("all"); or, where a last hop applies the LM head, the
    `Candidates` of those rows. A step may start at any position up to the positions written so
    far: it overwrites from there (how rejected drafts are dropped)."""

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last") -> torch.Tensor | Candidates: ...


class LocalBlocks:
    """Every block in this process: the single-process baseline. On CUDA its steps run through a
    one-slot `DecodeEngine` (CUDA graphs); elsewhere through the span's ragged path."""

    def __init__(self, span: Span, max_length: int) -> None:
        self.span = span
        self.max_length = max_length
        self.engine = DecodeEngine(span, 1, max_length) if span.device.type == "cuda" else None
        self.cache = self.engine.open(max_length) if self.engine else span.new_cache(max_length)

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last") -> torch.Tensor:
        x = hidden.to(device=self.span.device, dtype=self.span.dtype)
        segments = [Segment(self.cache, start, hidden.shape[0])]
        out = self.engine.forward(x, segments) if self.engine else self.span(x, segments)
        return out if output == "all" else out[-1:]


@dataclass
class Token:
    """One generated token and the text it completes (may be empty mid-character).

    The last item of a stream may carry `id=None`: text held back until the end.
    """

    id: int | None
    text: str
    logprob: float | None = None  # log-probability of `id` under the model (SamplingParams.logprobs set)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely ids at this step and their log-probabilities


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0  # from the first new token to the last
    finish_reason: str = ""  # "eos", "stop", "length"
    token_ids: list[int] = field(default_factory=list)
    round_trips: int = 0  # steps sent after the prefill (forward calls)
    drafted: int = 0  # draft tokens sent (client/speculate.py)
    accepted: int = 0  # ... and kept: new_tokens - accepted tokens came one per round trip
    failovers: list[Failover] = field(default_factory=list)  # one per hop routed around
    verification: Verification | None = None  # set when this generation was checked (client/verification.py)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class _TextStream:
    """Incremental detokenizer: emits text only once it is final.

    Decoding a window of recent ids keeps each step O(1) in the reply length;
    text ending in U+FFFD is an incomplete UTF-8 sequence and is held back, and
    so is any tail that might still grow into a stop string.
    """

    def __init__(self, head: Head, stop: tuple[str, ...]) -> None:
        self.head = head
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of `text` went out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text now safe to show, whether a stop string was hit)."""
        self.ids.append(token_id)
        before = self.head.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.head.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(max(self.emitted, len(self.text) - hold)), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece


async def stream_tokens(
    head: Head,
    blocks: Blocks,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stats: GenerationStats | None = None,
    batcher: HeadBatcher | None = None,
    drafter: Drafter | None = None,
) -> AsyncIterator[Token]:
    """Prefill the prompt, then decode, yielding tokens as they come.

    With `params.speculate` (the default) each step carries the current token and up to
    `params.max_draft` draft tokens from `drafter` (default: `PromptLookup`), as many as
    `AdaptiveDraft` finds worth it; every row is scored and the tokens the model agrees with
    are kept (client/speculate.py). Tokens, stop strings, eos, max_new_tokens and logprobs
    are exactly those of one-token steps: greedy text is the same, and so is sampled text
    of one seed.

    With `batcher` (of this `head`), the head's calls are shared with the other generations
    of this event loop that use the same batcher (client/head_batch.py)."""
    if not prompt_ids:
        raise BadRequest("the prompt encodes to no tokens")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    sampler = Sampler(params)
    text = _TextStream(head, params.stop)
    eos = head.eos_token_ids if params.stop_at_eos else set()
    history = list(prompt_ids)
    policy = AdaptiveDraft(params.drafts) if params.drafts else None
    if policy is not None and drafter is None:
        drafter = PromptLookup()
    vocab = head.config.vocab_size
    with batcher.generation() if batcher is not None else nullcontext():
        started = time.perf_counter()
        rows = await _score(head, batcher, await blocks.forward(head.embed(prompt_ids), 0), 1)
        first_at: float | None = None
        drafts: list[int] = []
        while True:
            accepted, done = 0, False
            for i, (logits, best) in enumerate(rows):  # row i follows drafts[:i]: reached only while they were kept
                dense = logits.dense() if isinstance(logits, Candidates) else logits
                token_id = sampler(dense, history, stats.token_ids, best, index=len(stats.token_ids))
                now = time.perf_counter()
                if first_at is None:
                    first_at = now
                    stats.time_to_first_token_s = now - started
                stats.decode_s = now - first_at
                if token_id in eos:
                    stats.finish_reason, done = "eos", True
                    break
                history.append(token_id)
                stats.token_ids.append(token_id)
                stats.new_tokens += 1
                piece, stopped = text.push(token_id)
                yield _token(token_id, piece, logits, params.logprobs)
                if stopped:
                    stats.finish_reason = "stop"
                    return
                if stats.new_tokens == params.max_new_tokens:
                    stats.finish_reason, done = "length", True
                    break
                if i == len(drafts) or token_id != drafts[i]:
                    break
                accepted += 1
            stats.accepted += accepted
            if done:
                break
            if policy is not None and drafts:
                policy.record_round(len(drafts), accepted)
            # The next round starts at the current token's position; the hops overwrite from there.
            position = len(history) - 1
            drafts = []
            if policy is not None:
                # k + 1 new tokens at most, the last never fed: positions stay below prompt + max_new_tokens,
                # and below the blocks' own max_length where they say it.
                limit = params.max_new_tokens - stats.new_tokens - 1
                k = policy.choose(min(limit, getattr(blocks, "max_length", limit + len(history)) - len(history)))
                if k:
                    began = time.perf_counter()
                    drafts = _valid(drafter.propose(history, k), k, vocab)
                    policy.record_drafting(len(drafts), time.perf_counter() - began)
            began = time.perf_counter()
            sent = head.embed([history[-1], *drafts])
            out = await (blocks.forward(sent, position, "all") if drafts else blocks.forward(sent, position))
            stats.round_trips += 1
            rows = await _score(head, batcher, out, len(drafts) + 1)
            if policy is not None:
                policy.record_step(len(drafts) + 1, time.perf_counter() - began)
            stats.drafted += len(drafts)
    tail = text.flush()
    if tail:
        yield Token(None, tail)


def _valid(drafts: Sequence[int], k: int, vocab: int) -> list[int]:
    """At most `k` drafts, up to the first that is not a token id of this vocabulary."""
    out: list[int] = []
    for draft in list(drafts)[:k]:
        if not isinstance(draft, int) or not 0 <= draft < vocab:
            break
        out.append(draft)
    return out


async def _score(head: Head, batcher: HeadBatcher | None, out: torch.Tensor | Candidates, n: int) -> list[tuple[torch.Tensor | Candidates, int | None]]:
    """The last `n` rows of a step's answer, each as (logits [V] or one-row `Candidates`, argmax if
    known). A route answers every row a step asks for (client/session.py refuses a hop that does not)."""
    if isinstance(out, Candidates):
        return [(out.row(i), None) for i in range(len(out) - n, len(out))]
    hidden = out[-n:]
    if batcher is not None:
        logits, best = await batcher.score_rows(hidden)
        return list(zip(logits, best))
    logits = head.logits(hidden)
    return [(row, None) for row in logits]


def _token(token_id: int, piece: str, logits: torch.Tensor | Candidates, top: int | None) -> Token:
    """The token, with its log-probabilities under the model's own (unpenalised, untempered) logits when asked."""
    if top is None:
        return Token(token_id, piece)
    if isinstance(logits, Candidates):
        return Token(token_id, piece, *logits.logprobs(token_id, top))
    logprobs = torch.log_softmax(logits, -1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return Token(token_id, piece, float(logprobs[token_id]), alternatives)


def stream_tokens_sync(
    head: Head, blocks: Blocks, prompt_ids: Sequence[int], params: SamplingParams, stats: GenerationStats | None = None, drafter: Drafter | None = None
) -> Iterator[Token]:
    """`stream_tokens` for callers without an event loop."""
    loop = asyncio.new_event_loop()
    agen = stream_tokens(head, blocks, prompt_ids, params, stats, drafter=drafter)
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
