"""Runs the node's blocks: KV cache budget, a step queue with continuous batching, one compute thread.

Steps are queued; a batcher task takes everything that is waiting (at most one
step per session, so a session's steps stay in order), groups it by sub-span,
and runs each group as one ragged forward in the backend's single compute thread
(node/span_runner.py: the ragged path on a CPU, the decode engine on CUDA). While
a batch computes, new steps pile up and form the next batch: every weight read
serves many tokens.

Small batches of a short span on a CPU run on the event loop's thread instead.
The hand-off to the compute thread and back (a queue, two thread wake-ups, the
result through `call_soon_threadsafe`) cost 0.12-0.19 ms of every one-token hop
through one block on the 2-core CI box (benchmarks/hop_overhead.py), a quarter of
the hop. Where a batch of small steps takes at most `inline_max_s` (a moving
average, from the self-benchmark on), the next batch of at most
`INLINE_MAX_TOKENS` tokens of whole steps (a few sessions decoding, a speculative
step) runs inline: the loop stalls no longer than a few milliseconds. Longer spans, larger batches and prefill chunks still go to the
compute thread, so the loop keeps reading and answering while they run (and a
ten-block span computed ~10% slower on the loop's thread than on the main thread,
which loaded its weights: node/compute.py). On CUDA every batch goes to the
compute thread (the decode engine's graphs and pinned buffers belong to it).

Sessions answer a result with their next step a little later, so right after a
batch only some are back. Taking whatever is there would split the sessions
into alternating half batches; instead the batcher waits a short gather window
(a fraction of the last batch's compute time, a few ms at most) until every
recently active session has its next step queued.

Fairness. A step of more than `prefill_chunk_tokens` tokens (a long prompt, a
`/forward` of a whole prefix) runs in chunks of that many, and a chunk rides
only in a batch with no small step waiting (or, so that a node busy with decode
still makes progress on prompts, every `prefill_every`-th batch). A one-token
step so waits for at most the chunk computing when it arrives, never for a
whole 8,192-token prompt; chunking also bounds the attention scratch memory,
which grows with the square of a single forward's length. While small steps
keep coming (within `active_window_s`), chunks also pause after each one so
that they take at most `prefill_share` of the compute time: measured on the
2-core CI box, a stranger's back-to-back 64-token chunks made a three-hop
greedy decode 5.6x slower (0.79 s -> 4.47 s for 24 tokens) even with one-token
steps going first, since the chunk computing when a step arrives and the cores
it takes from the other hops both count.

Capacity. A `/forward` is a session for its lifetime: its scratch cache counts
against `max_sessions` and the KV budget, and at most `max_forwards` are in the
node at once. A cache freed while one of its steps waits drops that step
(`SessionNotFound`); one freed while its step computes returns its budget when
the compute is done. If the batcher itself dies, every waiting step fails with
`ShuttingDown`, new work is refused the same way, and `stopped` with `failure`
tells the node to leave.

Metrics: an optional `StepObserver` (node/steps.py) hears each step's queue wait
and latency and each batch's size and compute time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque

import torch

from node.span_runner import SpanRunner, compute_error
from node.steps import BackendConfig, Chunk, Step, StepObserver, StepResult
from swarm.errors import BadSpan, Busy, LengthExceeded, SessionNotFound, ShuttingDown, SwarmError
from swarm.model.block import KVCache, Segment, Span

log = logging.getLogger(__name__)

INLINE_MAX_TOKENS = 16  # a CPU batch of more tokens never runs on the loop's thread (module notes)


class Backend:
    """The blocks of one span and everything that computes with them. An async context manager."""

    def __init__(
        self, span: Span, config: BackendConfig, executor: concurrent.futures.Executor | None = None, observer: StepObserver | None = None
    ) -> None:
        self.span = span
        self.observer = observer
        self.config = config
        self.max_length = min(config.max_length, span.config.max_position)
        self.max_forward_tokens = min(config.max_forward_tokens, self.max_length)
        self.runner = SpanRunner(span, config.max_sessions, config.kv_memory_bytes, self.max_length)
        self.engine = self.runner.engine  # the CUDA KV pool, or None on the CPU
        self.kv_used = 0
        self.caches: set[int] = set()  # id() of live caches (sessions and forwards), for the session count
        self.forwards = 0  # /forwards in the node now
        self.throughput = 0.0  # blocks/s for one-token steps, from the self-benchmark
        self.steps_done = 0
        self.batches_done = 0
        self.chunks_done = 0  # prefill chunks of long steps
        self.failure: SwarmError | None = None  # set if the batcher died: every later call raises it
        self.stopped = asyncio.Event()  # set when the batcher ends, by exit or by crash
        self._pending: deque[Step] = deque()
        self._wakeup = asyncio.Event()
        # One compute thread: `swarm-node` passes its main thread (see node/compute.py); else a worker.
        self._owns_executor = executor is None  # a lent executor (the node's main thread) outlives this backend
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._batcher: asyncio.Task | None = None
        self._idle = asyncio.Event()  # set while nothing is queued or computing
        self._idle.set()
        self._last_submit: dict[int, float] = {}  # id(cache) -> monotonic time of its last step
        self._last_compute_s = 0.0
        self._computing: set[int] = set()  # id() of caches in the batch that computes now
        self._freed_while_computing: dict[int, KVCache] = {}  # id(cache) -> cache, returned when its compute ends
        self._batches_without_chunk = 0
        self._chunk_not_before = 0.0  # loop time before which no chunk runs (prefill_share)
        self._last_small = -float("inf")  # loop time of the last batch with a small step
        self._small_batch_s = float("inf")  # moving average of the compute time of batches of whole small steps
        self._ran_inline = False  # the last batch computed on the loop's thread

    async def __aenter__(self) -> Backend:
        self.throughput = await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.self_benchmark)
        self._small_batch_s = self.span.num_blocks / self.throughput if self.throughput > 0 else float("inf")
        self._batcher = asyncio.create_task(self._batch_loop(), name="batcher")
        self._batcher.add_done_callback(self._batcher_ended)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.failure is None:
            await self.drain()
        if self._batcher:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def drain(self) -> None:
        """Wait until every queued step has been computed (or failed, if the batcher died)."""
        await self._idle.wait()

    def _batcher_ended(self, task: asyncio.Task) -> None:
        """The batcher only ends by cancellation; anything else is a bug that would hang every step."""
        self.stopped.set()
        if task.cancelled():
            return
        exc = task.exception() or RuntimeError("the batcher returned")
        log.error("the compute loop died; failing queued steps and refusing new work", exc_info=exc)
        error = ShuttingDown(f"node's compute loop failed ({type(exc).__name__}): use another node")
        for item in self._pending:
            if not item.done.done():
                item.done.set_exception(error)
        self._pending.clear()
        self._idle.set()
        self.failure = error

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise self.failure

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
        self._check_alive()
        self.check_blocks(blocks)
        if max_length < 1 or max_length > self.max_length:
            raise LengthExceeded(f"max_length {max_length} is outside [1, {self.max_length}] on this node")
        if self.sessions >= self.config.max_sessions:
            raise Busy(f"node is at its limit of {self.config.max_sessions} sessions")
        if self.engine is not None:
            cache = self.engine.open(max_length, blocks)  # Busy when every slot is taken
            self.kv_used += cache.nbytes
            self.caches.add(id(cache))
            return cache
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
        """Give the cache's budget back. Its waiting steps fail with `SessionNotFound`; if one of
        its steps is computing, the budget (and the session slot) return when that compute ends."""
        key = id(cache)
        if key not in self.caches or key in self._freed_while_computing:
            return
        self._last_submit.pop(key, None)
        dropped = [item for item in self._pending if item.cache is cache]
        if dropped:
            self._pending = deque(item for item in self._pending if item.cache is not cache)
            for item in dropped:
                if not item.done.done():
                    item.done.set_exception(SessionNotFound("the session was closed while its step waited"))
            if not self._pending and not self._computing:
                self._idle.set()  # the batcher may not wake for an emptied queue
        if key in self._computing:
            self._freed_while_computing[key] = cache
            return
        self._return(cache)

    def _return(self, cache: KVCache) -> None:
        """The cache's budget (and slot) back: no step of it computes now or later."""
        self.caches.discard(id(cache))
        self.kv_used -= cache.nbytes
        if self.engine is not None:
            self.engine.release(cache)

    # --- compute --------------------------------------------------------------------

    def submit(self, cache: KVCache, blocks: tuple[int, int], hidden: torch.Tensor, position: int, track: bool = True) -> asyncio.Future:
        """Queue one session's step through `blocks` and its cache: [T, D] in, a future `StepResult`.

        Synchronous, so steps enter the queue in the order they arrived. `track`: the
        gather window waits for this cache's next step (a session; not a one-off forward).
        """
        self._check_alive()
        if id(cache) not in self.caches or id(cache) in self._freed_while_computing:
            raise SessionNotFound("the session's cache was freed")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append(Step(cache, blocks, hidden, position, done))
        if track:
            self._last_submit[id(cache)] = loop.time()
        self._idle.clear()
        self._wakeup.set()
        return done

    async def step(self, cache: KVCache, blocks: tuple[int, int], hidden: torch.Tensor, position: int) -> torch.Tensor:
        return (await self.submit(cache, blocks, hidden, position)).hidden

    def check_forward_room(self) -> None:
        """`Busy` when the node already has `max_forwards` (a cheap check before a body is read)."""
        self._check_alive()
        if self.forwards >= self.config.max_forwards:
            raise Busy(f"node is computing its limit of {self.config.max_forwards} forwards: try again later or elsewhere")

    async def forward(self, blocks: tuple[int, int], hidden: torch.Tensor) -> torch.Tensor:
        """Stateless forward through `blocks`: a scratch cache of exactly the input's length, counted
        as a session (slot and KV budget) while it lives. `Busy` when the node has no room for it."""
        self._check_alive()
        self.check_blocks(blocks)
        tokens = hidden.shape[0]
        if tokens > self.max_forward_tokens:
            raise LengthExceeded(f"a forward of {tokens} tokens is over this node's limit of {self.max_forward_tokens}")
        self.check_forward_room()
        cache = self.open_cache(blocks, tokens)
        self.forwards += 1
        try:
            return (await self.submit(cache, blocks, hidden, 0, track=False)).hidden
        finally:
            self.forwards -= 1
            self.free_cache(cache)

    async def _batch_loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            elif self._ran_inline:
                await asyncio.sleep(0)  # let the loop read (and the finished steps leave) between inline batches
            self._ran_inline = False
            await self._gather()
            batch = self._take_batch()
            if not batch and self._pending:  # only chunks wait, and they must pause (prefill_share)
                self._wakeup.clear()
                pause = self._chunk_not_before - asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(pause, 0.0))
                except asyncio.TimeoutError:
                    pass
                continue
            if self.observer is not None:
                began = time.perf_counter()
                for chunk in batch:
                    if not chunk.step.computed:  # its first tokens: the wait ends now
                        self.observer.queued(began - chunk.step.submitted)
            try:
                groups: dict[tuple[int, int], list[Chunk]] = {}
                for chunk in batch:
                    groups.setdefault(chunk.step.blocks, []).append(chunk)
                loop = asyncio.get_running_loop()
                self._computing = {id(chunk.step.cache) for chunk in batch}
                for blocks, chunks in groups.items():
                    try:
                        small = self._small(chunks)
                        if small and self._small_batch_s <= self.config.inline_max_s:
                            self._ran_inline = True
                            outs, elapsed = self._compute(blocks, chunks)
                        else:
                            outs, elapsed = await loop.run_in_executor(self._executor, self._compute, blocks, chunks)
                        if small:
                            self._small_batch_s += 0.125 * (elapsed - self._small_batch_s)
                    except Exception as exc:  # one group's failure must not stop the batcher
                        error = exc if isinstance(exc, SwarmError) else compute_error(exc)
                        for chunk in chunks:
                            if not chunk.step.done.done():
                                chunk.step.done.set_exception(error)
                        continue
                    self._last_compute_s = elapsed
                    if self.observer is not None:
                        self.observer.batch(len(chunks), sum(c.count for c in chunks), elapsed)
                    self._pace_chunks(chunks, elapsed)
                    for chunk, out in zip(chunks, outs):
                        self._deliver(chunk, out, elapsed, len(chunks))
                self.batches_done += bool(batch)
            finally:
                self._computing = set()
                for cache in self._freed_while_computing.values():
                    self._return(cache)
                self._freed_while_computing.clear()
                if not self._pending:
                    self._idle.set()

    def _pace_chunks(self, chunks: list[Chunk], elapsed: float) -> None:
        """After a batch with a chunk, while small steps come: no chunk for a while (prefill_share)."""
        now = asyncio.get_running_loop().time()
        share = self.config.prefill_share
        if any(c.count < c.step.remaining or c.step.computed for c in chunks) and now - self._last_small < self.config.active_window_s and share < 1:
            self._chunk_not_before = now + elapsed * (1 - share) / share

    def _deliver(self, chunk: Chunk, out: torch.Tensor, elapsed: float, batch_size: int) -> None:
        step = chunk.step
        step.computed += chunk.count
        step.outputs.append(out)
        step.compute_s += elapsed
        if step.done.done():  # the waiter was cancelled, or the cache freed meanwhile
            return
        if id(step.cache) in self._freed_while_computing:
            step.done.set_exception(SessionNotFound("the session was closed while its step computed"))
        elif step.remaining:
            self._pending.appendleft(step)  # ahead of any later step of the same cache
        else:
            hidden = step.outputs[0] if len(step.outputs) == 1 else torch.cat(step.outputs)
            step.done.set_result(StepResult(hidden, step.compute_s, batch_size))
            if self.observer is not None:
                self.observer.step(time.perf_counter() - step.submitted)

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

    def _take_batch(self) -> list[Chunk]:
        """The next batch (see the module notes): every waiting small step, at most one per cache and
        `max_batch_tokens` in all, then a chunk of one long step if none was small or it is its turn.
        Invalid steps fail now."""
        config = self.config
        small: list[Chunk] = []
        longs: list[Step] = []  # the first waiting step of each cache with a long remainder
        later: deque[Step] = deque()
        seen: set[int] = set()
        tokens = 0
        while self._pending:
            item = self._pending.popleft()
            if item.done.done():  # cancelled while waiting
                continue
            count = item.remaining
            if id(item.cache) in seen or (small and count <= config.prefill_chunk_tokens and tokens + count > config.max_batch_tokens):
                later.append(item)
                continue
            try:
                item.cache.check_step(item.position + item.computed, count)
            except SwarmError as exc:
                item.done.set_exception(exc)
                continue
            seen.add(id(item.cache))
            later.append(item)
            if count <= config.prefill_chunk_tokens:
                small.append(Chunk(item, count))
                tokens += count
            else:
                longs.append(item)
        now = asyncio.get_running_loop().time()
        if small:
            self._last_small = now
        chunk: Chunk | None = None
        paced = now < self._chunk_not_before and now - self._last_small < config.active_window_s
        if longs and not paced and (not small or self._batches_without_chunk + 1 >= config.prefill_every):
            # the long step that has had the least compute so far: long steps share the chunks
            step = min(longs, key=lambda item: item.computed)
            chunk = Chunk(step, config.prefill_chunk_tokens)
        self._batches_without_chunk = 0 if chunk or not longs else self._batches_without_chunk + 1
        batch = small + ([chunk] if chunk else [])
        taken = {id(c.step) for c in batch}
        self._pending = deque(item for item in later if id(item) not in taken)
        self.chunks_done += chunk is not None
        return batch

    def _small(self, chunks: list[Chunk]) -> bool:
        """Whether this group may compute right here on the loop's thread (see the module notes): whole
        small steps on a CPU, never a chunk of a long one."""
        return self.engine is None and sum(c.count for c in chunks) <= INLINE_MAX_TOKENS and all(c.count == c.step.hidden.shape[0] for c in chunks)

    def _compute(self, blocks: tuple[int, int], chunks: list[Chunk]) -> tuple[list[torch.Tensor], float]:
        """In the compute thread (or the loop's, for a small batch on a CPU): one forward for all `chunks`."""
        began = time.perf_counter()
        parts = [c.step.hidden[c.step.computed : c.step.computed + c.count] for c in chunks]
        segments = [Segment(c.step.cache, c.step.position + c.step.computed, c.count) for c in chunks]
        out = self.runner.run(torch.cat(parts), segments, blocks)
        elapsed = time.perf_counter() - began
        self.steps_done += sum(c.count == c.step.remaining for c in chunks)
        return list(out.split([c.count for c in chunks])), elapsed
