"""The GPU decode engine (swarm/model/engine.py) against the ragged path it replaces.

On the CPU the engine runs its batched code without graphs, in float32, so it must
agree with block.py's per-session path to float32 rounding. On CUDA (skipped here)
the captured graphs in bfloat16 must agree with the CPU float32 path within the
bf16 tolerance, at several batch buckets.
"""

from __future__ import annotations

import pytest
import torch

from swarm.errors import Busy, LengthExceeded, PositionError
from swarm.model import Segment, load_span, open_checkpoint
from swarm.model.engine import DecodeEngine, length_buckets
from tests.random_checkpoint import build

D = 256  # the random checkpoint's hidden size (it travels to the GPU box, the default model does not)
LAYERS = 6
FP32_TOL = 1e-4  # relative norm error: summation order differs between the two paths
BF16_TOL = 0.03  # bf16 against float32 through the blocks (tests/test_gpu.py allows the same)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def _inputs(seed: int, count: int) -> torch.Tensor:
    return torch.randn(count, D, generator=torch.Generator().manual_seed(seed))


class Reference:
    """One session on the plain ragged path with its own KVCache."""

    def __init__(self, span, max_length: int = 128) -> None:
        self.span = span
        self.cache = span.new_cache(max_length)

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return self.span(x, [Segment(self.cache, start, x.shape[0])])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-ckpt")
    build(directory, layers=LAYERS, hidden=D, heads=8, kv_heads=2, intermediate=512, vocab=512)
    with open_checkpoint(directory) as ck:
        yield ck


@pytest.fixture(scope="module")
def full_span(checkpoint):
    return load_span(checkpoint, 0, LAYERS, torch.float32)


@pytest.fixture(scope="module")
def engine(full_span):
    return DecodeEngine(full_span, slots=4, max_length=128)


def _prefilled(engine: DecodeEngine, span, lengths: list[int], seed: int) -> tuple[list, list[Reference]]:
    """One session per length, its prompt run through the engine and through a reference."""
    caches, refs = [engine.open(64) for _ in lengths], [Reference(span) for _ in lengths]
    for i, (cache, ref, n) in enumerate(zip(caches, refs, lengths)):
        prompt = _inputs(seed + i, n)
        engine.forward(prompt, [Segment(cache, 0, n)])
        ref(prompt, 0)
    return caches, refs


def _close_all(engine: DecodeEngine, caches) -> None:
    for cache in caches:
        engine.release(cache)


def test_prefill_then_decode_matches_ragged_path(engine, full_span):
    cache, ref = engine.open(64), Reference(full_span)
    try:
        prompt = _inputs(0, 5)
        assert _rel(engine.forward(prompt, [Segment(cache, 0, 5)]), ref(prompt, 0)) < FP32_TOL
        for position in range(5, 11):
            x = _inputs(position, 1)
            assert _rel(engine.forward(x, [Segment(cache, position, 1)]), ref(x, position)) < FP32_TOL
        assert cache.length == 11
    finally:
        engine.release(cache)


def test_batched_sessions_of_different_lengths(engine, full_span):
    lengths = [3, 7, 11]
    caches, refs = _prefilled(engine, full_span, lengths, seed=10)
    try:
        positions = list(lengths)
        for step in range(4):
            x = _inputs(100 + step, len(caches))
            out = engine.forward(x, [Segment(c, p, 1) for c, p in zip(caches, positions)])
            for row, (ref, position) in enumerate(zip(refs, positions)):
                assert _rel(out[row : row + 1], ref(x[row : row + 1], position)) < FP32_TOL
            positions = [p + 1 for p in positions]
        # only some sessions step: the others' caches are untouched by riding along
        x = _inputs(200, 1)
        out = engine.forward(x, [Segment(caches[2], positions[2], 1)])
        assert _rel(out, refs[2](x, positions[2])) < FP32_TOL
        x = _inputs(201, 1)
        out = engine.forward(x, [Segment(caches[0], positions[0], 1)])
        assert _rel(out, refs[0](x, positions[0])) < FP32_TOL
    finally:
        _close_all(engine, caches)


def test_mixed_batch_of_prefill_and_decode(engine, full_span):
    a, b = engine.open(64), engine.open(64)
    ref_a, ref_b = Reference(full_span), Reference(full_span)
    try:
        first = _inputs(1, 4)
        engine.forward(first, [Segment(a, 0, 4)])
        ref_a(first, 0)
        x = torch.cat([_inputs(2, 1), _inputs(3, 6)])  # a decodes one token while b prefills six
        out = engine.forward(x, [Segment(a, 4, 1), Segment(b, 0, 6)])
        assert _rel(out[:1], ref_a(x[:1], 4)) < FP32_TOL
        assert _rel(out[1:], ref_b(x[1:], 0)) < FP32_TOL
    finally:
        _close_all(engine, [a, b])


def test_released_slot_is_refilled_by_compaction(engine, full_span):
    caches, refs = _prefilled(engine, full_span, [3, 4, 5], seed=20)
    try:
        engine.release(caches[0])
        last = caches[2]
        assert last.slot == 2
        x = _inputs(30, 1)
        out = engine.forward(x, [Segment(last, 5, 1)])
        assert last.slot == 0, "the highest live session moves into the freed low slot"
        assert _rel(out, refs[2](x, 5)) < FP32_TOL
        x = _inputs(31, 2)  # both survivors, after the move
        out = engine.forward(x, [Segment(caches[1], 4, 1), Segment(last, 6, 1)])
        assert _rel(out[:1], refs[1](x[:1], 4)) < FP32_TOL
        assert _rel(out[1:], refs[2](x[1:], 6)) < FP32_TOL
    finally:
        _close_all(engine, caches)


def test_sub_span_and_rewind(engine, full_span, checkpoint):
    start, end = full_span.start + 2, full_span.start + 5
    cache = engine.open(64, (start, end))
    part = load_span(checkpoint, start, end)
    ref = Reference(part)
    try:
        prompt = _inputs(40, 4)
        assert _rel(engine.forward(prompt, [Segment(cache, 0, 4)], (start, end)), ref(prompt, 0)) < FP32_TOL
        x = _inputs(41, 1)
        assert _rel(engine.forward(x, [Segment(cache, 4, 1)], (start, end)), ref(x, 4)) < FP32_TOL
        # a replay rewinds: position 3 again, overwriting what was there
        x = _inputs(42, 1)
        assert _rel(engine.forward(x, [Segment(cache, 3, 1)], (start, end)), ref(x, 3)) < FP32_TOL
        assert cache.length == 4
    finally:
        engine.release(cache)


def test_decode_host_matches_forward(engine, full_span):
    caches, refs = _prefilled(engine, full_span, [2, 3], seed=50)
    try:
        x = _inputs(60, 2)
        out = engine.decode_host(x, caches, [2, 3])
        assert out.device.type == "cpu" and out.shape == (2, D)
        assert _rel(out[:1], refs[0](x[:1], 2)) < FP32_TOL
        assert _rel(out[1:], refs[1](x[1:], 3)) < FP32_TOL
    finally:
        _close_all(engine, caches)


def test_limits_are_typed(engine):
    with pytest.raises(LengthExceeded):
        engine.open(129)
    caches = [engine.open(8) for _ in range(4)]
    try:
        with pytest.raises(Busy):
            engine.open(8)
        with pytest.raises(PositionError):
            engine.forward(_inputs(0, 1), [Segment(caches[0], 3, 1)])  # beyond the cache's length
        with pytest.raises(LengthExceeded):
            engine.forward(_inputs(0, 9), [Segment(caches[1], 0, 9)])
    finally:
        _close_all(engine, caches)
    assert engine.sessions == 0


def test_length_buckets():
    assert length_buckets(128) == [64, 128]
    assert length_buckets(1000) == [64, 128, 256, 512, 1000]
    assert length_buckets(10) == [10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_cpu_float32_at_several_batch_sizes(checkpoint, full_span):
    span = load_span(checkpoint, 0, LAYERS, torch.bfloat16, device="cuda")
    engine = DecodeEngine(span, slots=8, max_length=256)
    assert engine.graphs
    for count in (1, 2, 3, 5, 8):
        caches = [engine.open(200) for _ in range(count)]
        refs = [Reference(full_span) for _ in range(count)]
        positions = []
        for i, (cache, ref) in enumerate(zip(caches, refs)):
            n = 2 + 9 * i  # different lengths: different length buckets for the longest
            prompt = _inputs(70 + i, n)
            engine.forward(prompt.cuda(), [Segment(cache, 0, n)])
            ref(prompt, 0)
            positions.append(n)
        for step in range(3):
            x = _inputs(90 + step, count)
            out = engine.decode_host(x, caches, positions)
            for row, ref in enumerate(refs):
                assert _rel(out[row : row + 1], ref(x[row : row + 1], positions[row])) < BF16_TOL
            positions = [p + 1 for p in positions]
        _close_all(engine, caches)
    batches = {batch for batch, _ in engine.captured}
    assert {1, 2, 4, 8} <= batches, engine.captured


def _speculative_rounds(engine: DecodeEngine, span, device: str, tol: float) -> None:
    """Verify steps (a token and its drafts in one step) that rewind past rejected drafts, beside
    a one-token session in the same batches, against the ragged path."""
    spec, plain = engine.open(100), engine.open(100)
    spec_ref, plain_ref = Reference(span), Reference(span)
    try:
        for cache, ref, seed in ((spec, spec_ref, 100), (plain, plain_ref, 101)):
            prompt = _inputs(seed, 20)  # longer than a verify step: the ragged path
            engine.forward(prompt.to(device), [Segment(cache, 0, 20)])
            ref(prompt, 0)
        position, plain_position = 20, 20
        # (rows sent, rows kept): kept < rows rewinds the next step over the rejected drafts
        for i, (rows, kept) in enumerate([(5, 2), (4, 4), (9, 1), (2, 0), (16, 7), (3, 3)]):
            x, one = _inputs(110 + i, rows), _inputs(130 + i, 1)
            out = engine.forward(torch.cat([x, one]).to(device), [Segment(spec, position, rows), Segment(plain, plain_position, 1)])
            assert _rel(out[:rows], spec_ref(x, position)) < tol
            assert _rel(out[rows:], plain_ref(one, plain_position)) < tol
            assert spec.length == position + rows
            position += kept
            plain_position += 1
    finally:
        _close_all(engine, [spec, plain])


def test_verify_steps_rewind_like_the_ragged_path(engine, full_span):
    _speculative_rounds(engine, full_span, "cpu", FP32_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_verify_graphs_match_cpu_float32(checkpoint, full_span):
    span = load_span(checkpoint, 0, LAYERS, torch.bfloat16, device="cuda")
    engine = DecodeEngine(span, slots=4, max_length=128)
    engine.warm((1, 2))
    _speculative_rounds(engine, full_span, "cuda", BF16_TOL)
    assert {(2, 64), (4, 64), (8, 64), (16, 64)} <= set(engine._verify_graphs)
