"""Speculative decoding without a model: prompt lookup, the acceptance rules, the adaptive draft
policy, and the switches (CLI flags, the API's `speculate` field). The model and swarm tests
are in tests/test_speculate.py."""

from __future__ import annotations

import pytest
import torch

from client.sampling import Sampler, SamplingParams
from client.speculate import AdaptiveDraft, PromptLookup, verify_round
from swarm.errors import BadRequest
from swarm.model import DEFAULT_MODEL

# --- pure ----------------------------------------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]  # the 3-gram [1, 2, 3]
    assert lookup.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 8) == [4, 5, 9, 1, 2, 3]  # as many as follow
    assert lookup.propose([1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # no 3-gram match: the latest [1, 2]
    assert lookup.propose([5, 6, 7, 8], 4) == []  # nothing repeats
    assert lookup.propose([1, 2, 1], 0) == [] and lookup.propose([1], 3) == []
    grown = PromptLookup()
    text = [10, 11, 12, 13, 10, 11]
    assert grown.propose(text, 2) == [12, 13]
    assert grown.propose(text + [12, 13, 14, 10, 11, 12], 3) == [13, 14, 10]  # extended: the newer match wins
    assert grown.propose([7, 8, 9, 7, 8], 1) == [9]  # another text: indexed afresh


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_next_token():
    targets = [5, 6, 9, 4]
    assert verify_round([5, 6, 7], 4, lambda i: targets[i]) == (2, [5, 6, 9])  # draft 3 rejected: the target's 9
    assert verify_round([5, 6, 9], 4, lambda i: targets[i]) == (3, [5, 6, 9, 4])  # all kept, and the bonus token
    assert verify_round([1], 2, lambda i: targets[i]) == (0, [5])
    assert verify_round([], 1, lambda i: targets[i]) == (0, [5])  # a plain step
    asked: list[int] = []
    verify_round([8, 8, 8], 4, lambda i: asked.append(i) or 3)
    assert asked == [0], "rows after the first rejection are never drawn"


def test_the_sampling_rule_keeps_the_target_distribution():
    """A deterministic draft x is kept with probability p(x); a reject draws from p without x,
    renormalised; so what comes out is distributed as p. 20000 positions, fixed seed."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234))
    draft, n = 1, 20000
    tokens = torch.tensor([verify_round([draft], 2, lambda i, at=at: sampler(p.log(), [], index=at))[1][0] for at in range(n)])
    kept = tokens == draft
    counts = torch.bincount(tokens, minlength=4).float()
    tolerance = 4 * (0.25 / n) ** 0.5  # 4 sigma of a frequency
    assert abs(float(kept.float().mean()) - float(p[draft])) < tolerance
    assert torch.allclose(counts / n, p, atol=tolerance)
    residual = torch.bincount(tokens[~kept], minlength=4).float() / (~kept).sum()
    expected = torch.clamp(p - torch.nn.functional.one_hot(torch.tensor(draft), 4), min=0)
    assert torch.allclose(residual, expected / expected.sum(), atol=4 * (0.25 / float((~kept).sum())) ** 0.5)


def test_a_seed_draws_per_position_whatever_came_before():
    """The token at a position depends on its distribution and index only: speculative rounds
    of any size draw what one-token steps draw."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    plain = [Sampler(params)(logits, [], index=i) for i in range(30)]  # a fresh sampler for each position
    sequential = Sampler(params)
    assert [sequential(logits, []) for _ in range(30)] == plain
    assert Sampler(params)(logits, [], index=17) == plain[17]
    assert len(set(plain)) > 5


def test_the_sampler_exposes_its_processed_distribution():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    greedy = Sampler(SamplingParams(repetition_penalty=1.5)).distribution(logits, [0])
    assert greedy.tolist() == [0.0, 1.0, 0.0, 0.0]  # a point mass on the penalised argmax
    top2 = Sampler(SamplingParams(temperature=0.5, top_k=2)).distribution(logits, [])
    assert torch.allclose(top2, torch.tensor([2.0, 1.9, float("-inf"), float("-inf")]).div(0.5).softmax(-1))


def test_speculation_params_are_checked():
    assert SamplingParams().drafts == 8 and SamplingParams(speculate=False).drafts == 0 and SamplingParams(max_draft=0).drafts == 0
    for bad in (-1, 33):
        with pytest.raises(BadRequest):
            SamplingParams(max_draft=bad)


def _cpu_like(policy: AdaptiveDraft) -> None:
    """Step times where an extra position costs 15% of a step (CPU loopback-like)."""
    for size in (1, 2, 5, 9):
        policy.record_step(size, 0.010 * (1 + 0.15 * (size - 1)))


def test_adaptive_k_goes_to_zero_on_misses_and_back_up_on_hits():
    policy = AdaptiveDraft(8, probe_every=4)
    assert policy.choose(10) == 4  # nothing measured: a first guess
    policy.record_step(5, 0.02)
    assert policy.choose(10) == 0  # then one plain step, the baseline
    _cpu_like(policy)
    for _ in range(10):
        policy.record_round(8, 8)
    assert policy.choose(100) == 8 and policy.choose(3) == 3 and policy.choose(0) == 0
    chosen = []
    for _ in range(12):  # drafts stop hitting
        k = policy.choose(100)
        chosen.append(k)
        if k:
            policy.record_round(k, 0)
    assert chosen[-4:].count(0) >= 3, chosen  # no drafts, but for a probe now and then
    assert 1 in chosen[-8:], "an occasional one-draft probe"
    climb = []
    for _ in range(40):  # they hit again: the probes notice and k climbs back
        k = policy.choose(100)
        climb.append(k)
        if k:
            policy.record_round(k, k)
    assert max(climb[-5:]) >= 6, climb


def test_probes_that_keep_missing_come_ever_more_rarely():
    """Free text where drafts never hit: each missed probe doubles the wait for the next, so the
    probes' cost fades (a hit resets it)."""
    policy = AdaptiveDraft(8, probe_every=4, max_probe_gap=32)
    _cpu_like(policy)
    policy.accept = [0.0] * 8
    probes = []
    for round_ in range(200):
        if policy.choose(100):
            probes.append(round_)
            policy.record_round(1, 0)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:4] == [8, 16, 32, 32], gaps
    assert len(probes) <= 9
    policy.probing = True
    policy.record_round(1, 1)
    assert policy.probe_gap == 4


def test_adaptive_k_drafts_more_where_a_step_costs_the_same_for_more_positions():
    """Over a WAN a 9-position step costs what a 1-position one does: at 40% acceptance several
    drafts pay there, at most one on a CPU loopback, and none there at 10%."""
    wan, cpu = AdaptiveDraft(8), AdaptiveDraft(8)
    for size in (1, 9):
        wan.record_step(size, 0.080 + 0.0005 * (size - 1))
    _cpu_like(cpu)
    for policy in (wan, cpu):
        policy.accept = [0.4] * 8
    assert wan.choose(100) >= 3 and cpu.choose(100) <= 1
    cpu.accept = [0.1] * 8
    assert cpu.choose(100) == 0


# --- the switches: CLI flags and the API's `speculate` field (no model) ------------------------


def test_cli_flags_reach_the_sampling_params():
    from client.cli import build_parser
    from client.cli_args import sampling_params

    parser = build_parser()
    on = parser.parse_args(["generate", "hi"])
    assert sampling_params(on).drafts == 8 and on.draft_model is None
    off = parser.parse_args(["generate", "hi", "--no-speculate"])
    assert sampling_params(off).drafts == 0
    few = parser.parse_args(["chat", "--max-draft", "3", "--draft-model", DEFAULT_MODEL, "--draft-blocks", "12"])
    assert sampling_params(few).drafts == 3 and (few.draft_model, few.draft_blocks) == (DEFAULT_MODEL, 12)
    serve = parser.parse_args(["serve", "--no-speculate", "--max-draft", "4"])
    from client.serve_cli import serve_config

    config = serve_config(serve)
    assert (config.speculate, config.max_draft) == (False, 4)
    with pytest.raises(BadRequest):
        sampling_params(parser.parse_args(["generate", "hi", "--max-draft", "40"]))


def test_the_api_takes_speculate_as_an_extra_body_field():
    from client.openai_schema import ApiError, parse_chat, parse_completion

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat(body).sampling(8, 0).drafts == 8  # the server's default
    assert parse_chat(body).sampling(8, 0, speculate=False).drafts == 0
    assert parse_chat({**body, "speculate": False}).sampling(8, 0).drafts == 0
    assert parse_chat({**body, "speculate": True}).sampling(8, 0, speculate=False, max_draft=5).drafts == 5
    assert parse_completion({"model": "m", "prompt": "x", "speculate": False}).sampling(8, 0).drafts == 0
    with pytest.raises(ApiError) as refused:
        parse_chat({**body, "speculate": "yes"})
    assert refused.value.status == 400 and refused.value.param == "speculate"
