"""Our model core against Hugging Face transformers on the real default model (float32)."""

from __future__ import annotations

import pytest
import torch

from client.generate import GenerationStats, LocalBlocks, stream_tokens_sync
from client.sampling import SamplingParams
from swarm.model import Segment, load_span

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]
# Both sides dequantize the same GGUF to float32 with the same library; what is
# left is summation order. Logits here reach about 40 in magnitude.
LOGIT_ATOL = 2e-3
# Our own forward split differently (spans, steps, ragged batches): only the
# blocking of the matmuls changes, so the logits agree far closer.
SPLIT_ATOL = 5e-4


def _ids(head, prompt: str) -> list[int]:
    return head.encode_prompt(prompt, chat=True)


def _our_logits(head, span, ids):
    cache = span.new_cache(len(ids))
    return head.logits(span(head.embed(ids), [Segment(cache, 0, len(ids))]))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(head, full_span, hf_model, prompt):
    ids = _ids(head, prompt)
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0]
    ours = _our_logits(head, full_span, ids)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=LOGIT_ATOL, rtol=0)


def test_three_spans_equal_whole_model(checkpoint, head, full_span):
    ids = _ids(head, PROMPTS[1])
    whole = _our_logits(head, full_span, ids)
    hidden = head.embed(ids)
    for start, end in [(0, 10), (10, 20), (20, 30)]:
        span = load_span(checkpoint, start, end)
        hidden = span(hidden, [Segment(span.new_cache(len(ids)), 0, len(ids))])
    torch.testing.assert_close(head.logits(hidden), whole, atol=SPLIT_ATOL, rtol=0)


def test_prefill_then_steps_equals_full_forward(head, full_span):
    ids = _ids(head, PROMPTS[2])
    whole = _our_logits(head, full_span, ids)
    split = 11
    cache = full_span.new_cache(len(ids))
    outs = [full_span(head.embed(ids[:split]), [Segment(cache, 0, split)])]
    for pos in range(split, len(ids)):
        outs.append(full_span(head.embed(ids[pos : pos + 1]), [Segment(cache, pos, 1)]))
    torch.testing.assert_close(head.logits(torch.cat(outs)), whole, atol=SPLIT_ATOL, rtol=0)


def test_ragged_batch_equals_sessions_one_by_one(head, full_span):
    """Two sessions' tokens in one forward give what each gives alone."""
    a, b = _ids(head, PROMPTS[0]), _ids(head, PROMPTS[1])
    alone = [_our_logits(head, full_span, ids)[-1] for ids in (a, b)]
    ca, cb = full_span.new_cache(len(a) + 1), full_span.new_cache(len(b) + 1)
    together = full_span(head.embed(a + b), [Segment(ca, 0, len(a)), Segment(cb, 0, len(b))])
    torch.testing.assert_close(head.logits(together[len(a) - 1]), alone[0], atol=SPLIT_ATOL, rtol=0)
    torch.testing.assert_close(head.logits(together[-1]), alone[1], atol=SPLIT_ATOL, rtol=0)


def test_greedy_answers_paris(head, full_span):
    ids = _ids(head, "What is the capital of France?")
    params = SamplingParams(max_new_tokens=30)
    text = "".join(t.text for t in stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + 30), ids, params))
    assert "Paris" in text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_first_20_greedy_tokens_equal_transformers_generate(head, full_span, hf_model, prompt):
    """Up to 20 tokens; a reply that ends sooner must end at the same EOS on both sides."""
    ids = _ids(head, prompt)
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=20)
    list(stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + 20), ids, params, stats))
    if len(reference) < 20 or reference[-1] in head.eos_token_ids:
        assert reference[-1] in head.eos_token_ids and stats.finish_reason == "eos"
        reference = reference[:-1]
    assert stats.token_ids == reference
