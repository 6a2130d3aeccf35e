"""Small CPU batches compute on the event loop's thread (node/backend.py): same outputs, and only
whole small steps do; chunks of long steps and large batches still go to the compute thread."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from node.backend import INLINE_MAX_TOKENS, Backend
from node.steps import BackendConfig
from swarm.model import load_span


@pytest.fixture(scope="module")
def span(checkpoint):
    return load_span(checkpoint, 0, 1, torch.float32)


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """One worker that counts the jobs handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def hidden(span, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, span.config.hidden_size, generator=torch.Generator().manual_seed(seed))


async def run_steps(span, config: BackendConfig, steps: list[int]) -> tuple[list[torch.Tensor], int]:
    """Outputs of one session's steps of these token counts, and how many jobs reached the compute thread."""
    executor = CountingExecutor()
    try:
        async with Backend(span, config, executor) as backend:
            cache = backend.open_cache((0, 1), 128)
            before = executor.jobs  # the self-benchmark
            outputs, position = [], 0
            for index, tokens in enumerate(steps):
                outputs.append(await backend.step(cache, (0, 1), hidden(span, tokens, index), position))
                position += tokens
            return outputs, executor.jobs - before
    finally:
        executor.shutdown()


async def test_small_steps_compute_inline_with_the_same_outputs(span):
    steps = [5, 1, 1, INLINE_MAX_TOKENS, 1]
    inline, jobs = await run_steps(span, BackendConfig(inline_max_s=60.0), steps)
    assert jobs == 0  # every step computed on the loop's thread
    threaded, jobs = await run_steps(span, BackendConfig(inline_max_s=0.0), steps)
    assert jobs == len(steps)  # 0: never inline
    for a, b in zip(inline, threaded):
        assert torch.equal(a, b)


async def test_large_steps_and_chunks_go_to_the_compute_thread(span):
    # a step over INLINE_MAX_TOKENS, and one whose chunks are small but belong to a long step
    _, jobs = await run_steps(span, BackendConfig(inline_max_s=60.0), [INLINE_MAX_TOKENS + 1])
    assert jobs == 1
    _, jobs = await run_steps(span, BackendConfig(inline_max_s=60.0, prefill_chunk_tokens=4), [12, 1])
    assert jobs == 3  # the 12-token step's three chunks; the one-token step inline
