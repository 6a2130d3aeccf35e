"""What one batch computes with: the span's ragged path on a CPU, the decode engine on CUDA.

The backend (node/backend.py) decides which steps ride together; this runs them,
in the compute thread, hidden states in and out on the host.

GPU. On CUDA the KV lives in a `DecodeEngine` (swarm/model/engine.py): a static
pool of `min(max_sessions, kv_memory_bytes // slot bytes)` slots of `max_length`
tokens each, allocated at start. A session or forward takes a slot (`Busy` when
none is free); one-token steps of whole-span sessions run as one CUDA graph replay
with pinned host I/O; the rest (prefill chunks, sub-spans) takes the ragged path
over the same slots. CPU nodes keep the ragged path: it is the faster one there.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from swarm.errors import Busy, SwarmError
from swarm.model.block import KVCache, Segment, Span
from swarm.model.engine import DecodeEngine, slot_bytes

log = logging.getLogger(__name__)


class SpanRunner:
    def __init__(self, span: Span, max_sessions: int, kv_memory_bytes: int, max_length: int) -> None:
        self.span = span
        self.engine = _engine(span, max_sessions, kv_memory_bytes, max_length) if span.device.type == "cuda" else None

    def run(self, x: torch.Tensor, segments: list[Segment], blocks: tuple[int, int]) -> torch.Tensor:
        """x [N, D] on the host (the segments' tokens in order) -> [N, D] on the host."""
        span, engine = self.span, self.engine
        if engine is None:
            return span(x.to(device=span.device, dtype=span.dtype), segments, blocks).cpu()
        if blocks == (span.start, span.end) and all(seg.length == 1 for seg in segments):
            return engine.decode_host(x, [seg.cache for seg in segments], [seg.start for seg in segments])
        return engine.forward(x.to(device=span.device, dtype=span.dtype), segments, blocks).cpu()

    def self_benchmark(self, steps: int = 8) -> float:
        """Blocks per second for one-token steps through the whole span (compute thread). On CUDA
        this also captures the graphs of batches up to 16 for short sessions."""
        span, engine = self.span, self.engine
        x = torch.randn(1, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
        cache: KVCache = span.new_cache(steps + 2) if engine is None else engine.open(steps + 2)
        times = []
        try:
            for position in range(steps + 2):
                begin = time.perf_counter()
                self.run(x, [Segment(cache, position, 1)], (span.start, span.end))  # waits for its result
                times.append(time.perf_counter() - begin)
        finally:
            if engine is not None:
                engine.release(cache)
        if engine is not None:
            engine.warm(engine.batch_buckets[:5])
        per_step = statistics.median(times[2:])  # the first steps warm caches, allocators and graphs
        return span.num_blocks / per_step


def _engine(span: Span, max_sessions: int, kv_memory_bytes: int, max_length: int) -> DecodeEngine:
    """The CUDA KV pool: as many `max_length` slots as the KV budget and session limit allow."""
    slots = min(max_sessions, kv_memory_bytes // slot_bytes(span, max_length))
    if slots < 1:
        raise ValueError(
            f"--kv-memory {kv_memory_bytes} bytes holds no session of --max-length {max_length} over "
            f"{span.num_blocks} blocks ({slot_bytes(span, max_length)} bytes each): raise it or lower --max-length"
        )
    engine = DecodeEngine(span, slots, max_length)
    log.info("KV pool: %d slots of %d tokens, %.2f GiB", slots, max_length, engine.nbytes / 2**30)
    return engine


def compute_error(exc: Exception) -> SwarmError:
    """What the steps of a batch whose compute raised `exc` are told (out of memory: `busy`)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return Busy("device ran out of memory for this batch")
    log.exception("compute failed", exc_info=exc)
    return SwarmError(f"compute failed: {type(exc).__name__}")
