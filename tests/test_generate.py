"""Sampling and streaming text, on the real tokenizer (no model forward needed)."""

from __future__ import annotations

import pytest
import torch

from client.generate import _TextStream
from client.sampling import Sampler, SamplingParams
from swarm.errors import BadRequest


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert Sampler(SamplingParams())(logits, []) == 1
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))(logits, []) == 1


def test_seed_reproduces_and_temperature_samples():
    logits = torch.zeros(50)
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits, []) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert len({sampler(logits, []) for _ in range(40)}) > 10  # one generator, many tokens


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 crosses 0.7


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert Sampler(SamplingParams())(logits, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)]
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(BadRequest):
        SamplingParams(**kwargs)


def _stream(head, text: str, stop=()):
    stream = _TextStream(head, tuple(stop))
    pieces, stopped = [], False
    for token in head.tokenizer.encode(text, add_special_tokens=False):
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    return "".join(pieces), stopped


def test_streamed_text_equals_decoded_text(head):
    text = "Hello, wörld! Ünïcode: 日本語 and emoji 🐉 survive streaming."
    assert _stream(head, text) == (text, False)


def test_stop_string_cuts_the_text_and_is_never_shown(head):
    out, stopped = _stream(head, "First line.\nUser: second line", stop=["User:"])
    assert stopped and out == "First line.\n"
