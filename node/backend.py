"""Runs the node's blocks: KV cache budget, a step queue with continuous batching, one compute thread.

The event loop never runs the model. Steps are queued; a batcher task takes
everything that is waiting (at most one step per session, so a session's steps
stay in order), groups it by sub-span, and runs each group as one ragged forward
in the backend's single compute thread. While a batch computes, new steps pile
up and form the next batch: with many sessions, every weight read serves many
tokens, which is where the aggregate throughput comes from.

Sessions answer a result with their next step a little later, so right after a
batch only some are back. Taking whatever is there would split the sessions
into alternating half batches; instead the batcher waits a short gather window
(a fraction of the last batch's compute time, a few ms at most) until every
recently active session has its next step queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from swarm.errors import BadSpan, Busy, LengthExceeded, SwarmError
from swarm.model.block import KVCache, Segment, Span

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendConfig:
    max_sessions: int = 64
    kv_memory_bytes: int = 2 * 2**30
    max_length: int = 8192  # per session; capped by the model's context length
    max_batch_tokens: int = 8192  # tokens in one forward, summed over sessions
    gather_fraction: float = 0.25  # wait at most this share of the last batch's compute time ...
    gather_max_s: float = 0.005  # ... and never longer than this, for active sessions' next steps
    active_window_s: float = 1.0  # a session that stepped this recently counts as active


@dataclass(frozen=True)
class StepResult:
    hidden: torch.Tensor  # [T, D] on the CPU
    compute_s: float  # the forward of the batch this step rode in
    batch_size: int  # sessions in that batch


@dataclass
class _Step:
    cache: KVCache
    blocks: tuple[int, int]
    hidden: torch.Tensor  # [T, D], any dtype
    position: int
    done: asyncio.Future = field(repr=False)


class Backend:
    """The blocks of one span and everything that computes with them. An async context manager."""

    def __init__(self, span: Span, config: BackendConfig, executor: concurrent.futures.Executor | None = None) -> None:
        self.span = span
        self.config = config
        self.max_length = min(config.max_length, span.config.max_position)
        self.kv_used = 0
        self.caches: set[int] = set()  # id() of live caches, for the session count
        self.throughput = 0.0  # blocks/s for one-token steps, from the self-benchmark
        self.steps_done = 0
        self.batches_done = 0
        self._pending: deque[_Step] = deque()
        self._wakeup = asyncio.Event()
        # One compute thread: `swarm-node` passes its main thread (see node/compute.py); else a worker.
        self._owns_executor = executor is None  # a lent executor (the node's main thread) outlives this backend
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._batcher: asyncio.Task | None = None
        self._idle = asyncio.Event()  # set while nothing is queued or computing
        self._idle.set()
        self._last_submit: dict[int, float] = {}  # id(cache) -> monotonic time of its last step
        self._last_compute_s = 0.0

    async def __aenter__(self) -> Backend:
        self.throughput = await asyncio.get_running_loop().run_in_executor(self._executor, self._self_benchmark)
        self._batcher = asyncio.create_task(self._batch_loop(), name="batcher")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.drain()
        if self._batcher:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until every queued step has been computed."""
        await self._idle.wait()

    # --- sessions and memory --------------------------------------------------------

    @property
    def sessions(self) -> int:
        return len(self.caches)

    @property
    def kv_free(self) -> int:
        return self.config.kv_memory_bytes - self.kv_used

    @property
    def load(self) -> float:
        return self.sessions / self.config.max_sessions if self.config.max_sessions else 1.0

    def check_blocks(self, blocks: tuple[int, int]) -> None:
        first, last = blocks
        if not (self.span.start <= first < last <= self.span.end):
            raise BadSpan(f"blocks [{first}, {last}) are not inside this node's span [{self.span.start}, {self.span.end})")

    def open_cache(self, blocks: tuple[int, int], max_length: int) -> KVCache:
        """A KV cache for a new session, or `Busy` when sessions or KV memory are at their limit."""
        self.check_blocks(blocks)
        if max_length < 1 or max_length > self.max_length:
            raise LengthExceeded(f"max_length {max_length} is outside [1, {self.max_length}] on this node")
        if self.sessions >= self.config.max_sessions:
            raise Busy(f"node is at its limit of {self.config.max_sessions} sessions")
        need = KVCache.nbytes_for(self.span.config, blocks[1] - blocks[0], max_length, self.span.dtype)
        if need > self.kv_free:
            raise Busy(f"session needs {need} bytes of KV cache, {max(self.kv_free, 0)} of {self.config.kv_memory_bytes} are free")
        try:
            cache = self.span.new_cache(max_length, blocks)
        except torch.OutOfMemoryError:
            raise Busy("device is out of memory for another KV cache") from None
        self.kv_used += cache.nbytes
        self.caches.add(id(cache))
        return cache

    def free_cache(self, cache: KVCache) -> None:
        if id(cache) in self.caches:
            self.caches.discard(id(cache))
            self._last_submit.pop(id(cache), None)
            self.kv_used -= cache.nbytes

    # --- compute --------------------------------------------------------------------

    def submit(self, cache: KVCache, blocks: tuple[int, int], hidden: torch.Tensor, position: int) -> asyncio.Future:
        """Queue one session's step through `blocks` and its cache: [T, D] in, a future `StepResult`.

        Synchronous, so steps enter the queue in the order they arrived.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append(_Step(cache, blocks, hidden, position, done))
        self._last_submit[id(cache)] = loop.time()
        self._idle.clear()
        self._wakeup.set()
        return done

    async def step(self, cache: KVCache, blocks: tuple[int, int], hidden: torch.Tensor, position: int) -> torch.Tensor:
        return (await self.submit(cache, blocks, hidden, position)).hidden

    async def forward(self, blocks: tuple[int, int], hidden: torch.Tensor) -> torch.Tensor:
        """Stateless forward through `blocks` (a scratch cache of exactly the prompt's length)."""
        self.check_blocks(blocks)
        cache = self.span.new_cache(hidden.shape[0], blocks)
        return await self.step(cache, blocks, hidden, 0)

    async def _batch_loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            batch = self._take_batch()
            try:
                groups: dict[tuple[int, int], list[_Step]] = {}
                for item in batch:
                    groups.setdefault(item.blocks, []).append(item)
                loop = asyncio.get_running_loop()
                for blocks, items in groups.items():
                    try:
                        outs = await loop.run_in_executor(self._executor, self._compute, blocks, items)
                    except Exception as exc:  # one group's failure must not stop the batcher
                        error = exc if isinstance(exc, SwarmError) else _compute_error(exc)
                        for item in items:
                            if not item.done.done():
                                item.done.set_exception(error)
                        continue
                    self._last_compute_s = outs[0].compute_s if outs else 0.0
                    for item, out in zip(items, outs):
                        if not item.done.done():  # the waiter may have been cancelled
                            item.done.set_result(out)
                self.batches_done += bool(batch)
            finally:
                if not self._pending:
                    self._idle.set()

    async def _gather(self) -> None:
        """Wait briefly until every active session has a step queued (see the module notes)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key in [k for k, t in self._last_submit.items() if now - t > self.config.active_window_s]:
            del self._last_submit[key]
        expected = len(self._last_submit)
        deadline = now + min(self.config.gather_max_s, self.config.gather_fraction * self._last_compute_s)
        while len({id(item.cache) for item in self._pending}) < expected:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Step]:
        """Every waiting step, at most one per session and `max_batch_tokens` in all; invalid ones fail now."""
        batch: list[_Step] = []
        later: deque[_Step] = deque()
        seen: set[int] = set()
        tokens = 0
        while self._pending:
            item = self._pending.popleft()
            if item.done.done():  # cancelled while waiting
                continue
            count = item.hidden.shape[0]
            if id(item.cache) in seen or (batch and tokens + count > self.config.max_batch_tokens):
                later.append(item)
                continue
            try:
                item.cache.check_step(item.position, count)
            except SwarmError as exc:
                item.done.set_exception(exc)
                continue
            seen.add(id(item.cache))
            tokens += count
            batch.append(item)
        self._pending = later
        return batch

    def _compute(self, blocks: tuple[int, int], items: list[_Step]) -> list[StepResult]:
        """In the compute thread: one ragged forward for all `items`."""
        began = time.perf_counter()
        span = self.span
        x = torch.cat([item.hidden for item in items]).to(device=span.device, dtype=span.dtype)
        segments = [Segment(item.cache, item.position, item.hidden.shape[0]) for item in items]
        out = span(x, segments, blocks).cpu()
        elapsed = time.perf_counter() - began
        self.steps_done += len(items)
        return [StepResult(h, elapsed, len(items)) for h in out.split([item.hidden.shape[0] for item in items])]

    def _self_benchmark(self, steps: int = 8) -> float:
        """Blocks per second for one-token steps through the whole span, in the compute thread."""
        span = self.span
        cache = span.new_cache(steps + 2)
        x = torch.randn(1, span.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(span.device, span.dtype)
        times = []
        for position in range(steps + 2):
            begin = time.perf_counter()
            span(x, [Segment(cache, position, 1)])
            if span.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
        per_step = statistics.median(times[2:])  # the first steps warm caches and allocators
        return span.num_blocks / per_step


def _compute_error(exc: Exception) -> SwarmError:
    if isinstance(exc, torch.OutOfMemoryError):
        return Busy("device ran out of memory for this batch")
    log.exception("compute failed", exc_info=exc)
    return SwarmError(f"compute failed: {type(exc).__name__}")
