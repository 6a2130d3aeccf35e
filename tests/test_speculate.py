"""Speculative decoding (client/speculate.py): drafts, acceptance, adaptive k, and the same text as plain decoding.

FailoverBlocks' replay with fakes first (prompt lookup, the acceptance rules, the adaptive
policy and the switches are in tests/test_speculate_units.py), then the default model in this process (LocalBlocks, KV rewinds, a batcher,
the draft model), then one real swarm of four nodes shared by the tests that read it; the
kill test comes last and stops one of its nodes.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from client.draft_model import DraftModel
from client.generate import GenerationStats, LocalBlocks, stream_tokens, stream_tokens_sync
from client.head_batch import HeadBatcher
from client.sampling import SamplingParams
from client.session import RemoteHop
from swarm.errors import BadRequest, ModelMismatch, PeerUnavailable
from swarm.model import DEFAULT_MODEL, Segment
from swarm.model.engine import DecodeEngine
from tests.nodes import module_swarm, refresh, swarm_client

PASSAGE = (
    "The river Thames flows through southern England, past Oxford and Reading, and reaches the sea beyond London. "
    "For centuries it carried goods and people, and its bridges shaped the growth of the city."
)
GROUNDED = "Repeat this passage exactly: " + PASSAGE  # the reply copies the prompt: prompt lookup hits
FREE = "Write a short poem about the moon."  # nothing to copy: drafts miss, or none are proposed
NEW_TOKENS = 40


# --- FailoverBlocks: output, rewinds and the replay after a re-route (fakes, no network) ------


class _EchoSession:
    """A route whose block outputs are its inputs; it fails its `fail_at`-th step at its hop."""

    def __init__(self, peer: str, fail_at: int | None = None) -> None:
        self.route = [RemoteHop(f"http://127.0.0.1:9/{peer}", 0, 30, peer)]
        self.compute_ms = [1.0]
        self.fail_at = fail_at
        self.calls: list[tuple[int, int, str]] = []
        self.closed = False

    def take_draining(self):
        return []

    async def forward(self, hidden, start, output="last", timeout=None):
        self.calls.append((hidden.shape[0], start, output))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            error = PeerUnavailable(f"{self.route[0]} closed the connection")
            error.hop = self.route[0]
            raise error
        return hidden if output == "all" else hidden[-1:]

    async def close(self):
        self.closed = True


class _Planner:
    """No sub-route can be planned (the view cannot be re-read): a failure re-routes to the next session."""

    def __init__(self, sessions) -> None:
        from collections import Counter

        from client.planner import ClientConfig

        self.config = ClientConfig(max_attempts=2)
        self.sessions = list(sessions)
        self.occupancy: Counter[str] = Counter()
        self.steps: list = []

    async def refresh(self, http, force=False):
        raise PeerUnavailable("no bootstrap peer answered")

    async def open_session(self, http, max_length, route=None, exclude=frozenset(), lease=None):
        return self.sessions.pop(0)

    def lease(self):
        from client.planner import Lease

        return Lease(self.occupancy)

    def penalize(self, error):
        pass

    def readdress(self, error):  # one address per peer here: a failure is never only the address's
        return False

    def record_step(self, route, compute_ms, wall_s):
        self.steps.append(wall_s)


async def test_failover_replays_only_kept_positions_and_answers_the_steps_rows():
    from client.failover import FailoverBlocks

    first, second = _EchoSession("dead", fail_at=4), _EchoSession("alive")
    planner = _Planner([first, second])
    blocks = FailoverBlocks(planner, None, 32)
    await blocks.start()
    x = torch.arange(40, dtype=torch.float32).view(10, 4)
    junk = torch.full((3, 4), -1.0)
    await blocks.forward(x[:5], 0)  # the prefill
    assert torch.equal(await blocks.forward(torch.cat([x[5:6], junk]), 5, "all"), torch.cat([x[5:6], junk]))  # drafts 6..8
    await blocks.forward(x[6:7], 6)  # drafts rejected: rewind to 6 (a plain step: the planner measures it)
    step = x[7:10]
    out = await blocks.forward(step, 7, "all")  # fails on `first`: re-routed, prefix replayed on `second`
    assert torch.equal(out, step), "only this step's rows, not the replayed prefix's"
    assert [f.how for f in blocks.failovers] == ["reroute"]
    assert second.calls == [(7, 0, "last"), (3, 7, "all")]
    assert torch.equal(blocks.inputs.upto(10, x), x), "the kept inputs, the rejected drafts overwritten"
    assert len(planner.steps) == 1, "multi-position steps are not planner measurements"
    assert set(blocks.step_times) == {5, 4, 1}  # sizes measured for deadlines; the failed step's time is a stall
    await blocks.close()


def test_deadlines_follow_the_step_size():
    from client.failover import _usual

    assert _usual({}, 1) is None and _usual({1: [0.01, 0.01]}, 1) is None
    times = {1: [0.010, 0.012, 0.011], 5: [0.020, 0.022, 0.021]}
    assert _usual(times, 1) == 0.011 and _usual(times, 3) == 0.021 and _usual(times, 5) == 0.021
    assert _usual(times, 10) == pytest.approx(0.042)  # larger than measured: scaled by the size


# --- the default model in this process --------------------------------------------------------


def _generate(head, span, prompt: str, drafter=None, **sampling):
    ids = head.encode_prompt(prompt, chat=True)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, **sampling)
    stats = GenerationStats()
    text = "".join(t.text for t in stream_tokens_sync(head, LocalBlocks(span, len(ids) + NEW_TOKENS), ids, params, stats, drafter=drafter))
    return text, stats


@pytest.fixture(scope="module")
def local_plain(head, full_span):
    return {prompt: _generate(head, full_span, prompt, speculate=False) for prompt in (GROUNDED, FREE)}


@pytest.mark.parametrize("prompt", [GROUNDED, FREE], ids=["grounded", "free"])
def test_local_speculative_greedy_equals_plain(head, full_span, local_plain, prompt):
    text, stats = _generate(head, full_span, prompt)
    plain_text, plain = local_plain[prompt]
    assert stats.token_ids == plain.token_ids and text == plain_text
    assert plain.round_trips == plain.new_tokens - (plain.finish_reason == "length") and plain.drafted == 0
    print(f"{'grounded' if prompt == GROUNDED else 'free'}: {stats.new_tokens} tokens in {stats.round_trips} round trips, {stats.accepted} of {stats.drafted} drafts kept")
    if prompt == GROUNDED:
        assert stats.accepted > 0 and stats.round_trips < plain.round_trips / 2, "drafts hit on a copied passage"


def test_local_logprobs_and_stops_are_exact_per_token(head, full_span):
    """Tokens from one speculative round still carry their own logprobs, and a stop string inside
    a round ends the text where one-token steps end it."""
    ids = head.encode_prompt(GROUNDED, chat=True)

    def run(speculate: bool, **extra):
        params = SamplingParams(max_new_tokens=16, logprobs=3, speculate=speculate, **extra)
        stats = GenerationStats()
        tokens = list(stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + 16), ids, params, stats))
        return tokens, stats

    (plain, _), (spec, stats) = run(False), run(True)
    assert stats.accepted > 0
    assert [t.id for t in spec] == [t.id for t in plain]
    for a, b in zip(spec, plain):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    stop = {"stop": ("Oxford",)}
    (plain, _), (spec, stats) = run(False, **stop), run(True, **stop)
    assert "".join(t.text for t in spec) == "".join(t.text for t in plain) and stats.finish_reason == "stop"


class _Oracle:
    """Drafts the continuation a plain run produced: every draft is kept."""

    def __init__(self, prompt_ids, tokens) -> None:
        self.text = list(prompt_ids) + list(tokens)

    def propose(self, ids, k):
        return self.text[len(ids) : len(ids) + k]


def test_drafts_never_pass_max_new_tokens_or_the_cache(head, full_span, local_plain):
    """All drafts kept: rounds of max_draft + 1 tokens, the last one cut to end exactly at
    max_new_tokens, in a cache of exactly prompt + max_new_tokens positions."""
    ids = head.encode_prompt(FREE, chat=True)
    tokens = local_plain[FREE][1].token_ids
    params = SamplingParams(max_new_tokens=len(tokens), stop_at_eos=False, max_draft=6)
    stats = GenerationStats()
    list(stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + len(tokens)), ids, params, stats, drafter=_Oracle(ids, tokens)))
    assert stats.token_ids == tokens and stats.finish_reason == "length"
    assert stats.accepted == stats.drafted and stats.round_trips <= len(tokens) // 4


@pytest.mark.parametrize("engine", [False, True], ids=["ragged", "decode-engine"])
async def test_a_step_may_rewind_over_rejected_positions(full_span, engine):
    """Positions written by rejected drafts are overwritten by the next step: the outputs equal a
    clean run's, on the ragged path and on the DecodeEngine's slots (its batched one-token path)."""
    x = torch.randn(12, full_span.config.hidden_size, generator=torch.Generator().manual_seed(5))
    junk = torch.randn(4, full_span.config.hidden_size, generator=torch.Generator().manual_seed(6))
    reference = full_span(x, [Segment(full_span.new_cache(16), 0, 12)])
    blocks = LocalBlocks(full_span, 16)
    if engine:
        blocks.engine = DecodeEngine(full_span, 2, 16, graphs=False)
        blocks.cache = blocks.engine.open(16)
    await blocks.forward(x[:6], 0)
    await blocks.forward(torch.cat([x[6:7], junk[:3]]), 6, "all")  # drafts at 7..9, all rejected
    seven = await blocks.forward(x[7:8], 7)  # rewinds: one position
    rows = await blocks.forward(torch.cat([x[8:10], junk]), 8, "all")  # 8, 9 kept; 10..13 rejected
    rest = await blocks.forward(x[10:12], 10, "all")
    got = torch.cat([seven, rows[:2], rest])
    torch.testing.assert_close(got, reference[7:12], atol=1e-3, rtol=1e-3)  # rounding; a stale entry would be off by O(1)


async def test_concurrent_speculative_generations_share_head_calls(head, full_span, local_plain):
    """Two generations through one batcher: each text as alone, and a call scores several rows."""

    class Yielding:
        def __init__(self, inner):
            self.inner = inner

        async def forward(self, hidden, start, output="last"):
            await asyncio.sleep(0)
            return await self.inner.forward(hidden, start, output)

    batcher = HeadBatcher(head)

    async def one(prompt):
        ids = head.encode_prompt(prompt, chat=True)
        params = SamplingParams(max_new_tokens=20)
        return [t.id async for t in stream_tokens(head, Yielding(LocalBlocks(full_span, len(ids) + 20)), ids, params, batcher=batcher) if t.id is not None]

    grounded, free = await asyncio.gather(one(GROUNDED), one(FREE))
    assert grounded == local_plain[GROUNDED][1].token_ids[:20] and free == local_plain[FREE][1].token_ids[:20]
    assert batcher.rows > batcher.calls


def test_draft_model_greedy_equals_plain_and_rewinds_its_cache(head, full_span, local_plain):
    draft = DraftModel(head, full_span, 20)  # self-speculation: the first 20 of 30 blocks, then the head
    text, stats = _generate(head, full_span, GROUNDED, drafter=draft)
    assert stats.token_ids == local_plain[GROUNDED][1].token_ids and stats.drafted > 0
    ids = head.encode_prompt(FREE, chat=True)
    used = draft.fork()
    used.propose(ids + [5, 6, 7], 4)  # holds drafts of another continuation
    assert used.propose(ids + [9], 3) == draft.fork().propose(ids + [9], 3), "a rewound cache drafts as a fresh one"
    with pytest.raises(BadRequest):
        DraftModel(head, full_span, 31)
    other = SimpleNamespace(config=SimpleNamespace(vocab_size=head.config.vocab_size), tokenizer=SimpleNamespace(get_vocab=lambda: {"a": 0}))
    with pytest.raises(ModelMismatch):
        draft.check_vocabulary(other)
    draft.check_vocabulary(head)


# --- through a real swarm ---------------------------------------------------------------------

# Three hops, and a spare for the middle one (the kill test, last, kills the middle hop).
swarm = module_swarm("speculate", ["0:10", "10:20", "10:20", "20:30"])


async def _swarm_generate(client, prompt: str, route=None, on_tokens=None, **sampling):
    ids = client.head.encode_prompt(prompt, chat=True)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, **sampling)
    pieces, stats = [], None
    async for piece, stats, _ in client.stream_result(ids, params, route, verify=False):
        pieces.append(piece)
        if on_tokens is not None:
            on_tokens(len(stats.token_ids))
    return "".join(pieces), stats


@pytest.fixture(scope="module")
def swarm_plain(client):
    return {prompt: asyncio.run(_swarm_generate(client, prompt, speculate=False)) for prompt in (GROUNDED, FREE)}


@pytest.mark.parametrize("prompt", [GROUNDED, FREE], ids=["grounded", "free"])
def test_swarm_speculative_greedy_equals_plain(client, swarm_plain, prompt):
    text, stats = asyncio.run(_swarm_generate(client, prompt))
    plain_text, plain = swarm_plain[prompt]
    assert text == plain_text and stats.token_ids == plain.token_ids
    print(f"swarm {'grounded' if prompt == GROUNDED else 'free'}: {stats.new_tokens} tokens in {stats.round_trips} round trips (plain {plain.round_trips}), {stats.accepted} of {stats.drafted} drafts kept")
    if prompt == GROUNDED:
        assert stats.accepted > 0 and stats.round_trips < plain.round_trips


def test_swarm_sampled_text_of_a_seed_is_reproducible(client):
    sampled = dict(temperature=0.8, top_p=0.95, seed=11)
    first, second = (asyncio.run(_swarm_generate(client, GROUNDED, **sampled)) for _ in range(2))
    assert first[0] == second[0] and first[1].token_ids == second[1].token_ids
    plain = asyncio.run(_swarm_generate(client, GROUNDED, speculate=False, **sampled))
    assert plain[1].token_ids == first[1].token_ids, "a seed draws per position: the same text without drafts"


def test_swarm_draft_model_gives_the_same_greedy_text(swarm, swarm_plain):
    bootstrap, _ = swarm
    drafting = swarm_client(bootstrap.url, draft_model=DEFAULT_MODEL, draft_blocks=20)
    text, stats = asyncio.run(_swarm_generate(drafting, GROUNDED))
    assert text == swarm_plain[GROUNDED][0] and stats.drafted > 0


def test_swarm_kill_mid_speculation_gives_the_same_text(client, swarm, swarm_plain):
    """SIGKILL the middle hop after 10 tokens while drafts are in flight: its blocks move to the
    spare (a splice, the prefix rebuilt from kept positions only) and the text is unchanged."""
    _, nodes = swarm
    first, middle, spare, last = nodes
    asyncio.run(refresh(client))
    route = client.plan(exclude=frozenset({spare.peer_id}))
    assert route.peers == (first.peer_id, middle.peer_id, last.peer_id)
    killed = []

    def kill_at_ten(count):
        if count >= 10 and not killed:
            middle.kill()
            killed.append(count)

    text, stats = asyncio.run(_swarm_generate(client, GROUNDED, route, kill_at_ten))
    assert killed and text == swarm_plain[GROUNDED][0]
    assert [f.how for f in stats.failovers] == ["splice"] and stats.failovers[0].failed.startswith(middle.peer_id[:8])
    assert stats.accepted > 0
