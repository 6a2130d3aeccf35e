"""The GPU decode path: a static KV pool of per-session slots, one batched attention, CUDA graphs.

Why it exists. On a GPU, a one-token step of a 32-block Llama-3-8B reads 14 GB of
weights in ~5 ms, but eager PyTorch spends ~10 ms of host time launching its ~750
kernels, and the ragged path (block.py) adds a Python loop over sessions in every
block. A CUDA graph replays all of a step's kernels with one launch; it needs every
tensor it touches to live at a fixed address and every shape fixed, so:

- KV memory is one pool allocated at start, `[blocks, slots, kv_heads, max_length + 1,
  head_dim]` for keys and again for values. A session owns a slot; its `SlotCache`
  is a `KVCache` whose k/v are views of its slot, so prefill (the ragged path in
  block.py) writes into the pool unchanged.
- A decode batch is the slots [0, B) for a bucket B (1, 2, 4, ...), not a gather of
  the sessions' slots: gathering would copy every session's whole KV each step.
  Sessions not stepping in this batch still ride along; their row writes its key
  into the slot's spare last position (`max_length`), which no session can reach,
  and its output is dropped. To keep B small, live sessions are kept in the lowest
  slots: a free low slot takes the highest live session (one copy of its KV).
- Attention reads each slot's first Lb positions, Lb a length bucket (64, 128, ...)
  covering the longest session in the batch, with a mask for the shorter ones.
- One graph per (B, Lb), captured the first time that pair is needed.
- A short multi-token step of one session (a speculative step: the current token
  and its drafts, client/speculate.py) is a *verify* step: its T rows write their
  keys into the session's slot at consecutive positions and attend through a causal
  mask, with the query heads of a KV head folded into one matrix as in block.py.
  It has graphs of its own per (Tb, Lb), Tb a row bucket (2, 4, 8, 16), padding
  rows writing into the slot's spare position, and a compiled block function of its
  own, compiled at start by `warm` so no speculative step stalls on it. On an H100
  with Llama-3-8B's shape a verify step of 2 rows costs 1.09x a one-token step and
  one of 16 rows 1.13x (uncompiled: 1.40x).
  A rejected draft needs no undo: the next step starts
  at its position and overwrites it, and nothing reads past a session's position.

Input and output cross to the host through pinned buffers with asynchronous copies
and one event wait for the result, instead of pageable copies and `.cpu()` syncs.

The same batched code runs without graphs on any device (tests compare it with the
ragged path on the CPU). CPU nodes do not use this module: their ragged path is
faster there (block.py's notes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence

import torch

from swarm.errors import Busy, LengthExceeded
from swarm.model.block import KVCache, Segment, Span, rope_tables
from swarm.model.engine_blocks import block_tensors, decode_block, verify_block

log = logging.getLogger(__name__)

# torch's SDPA dispatch (cuDNN's kernel on an H100), or plain matmuls. Measured on an H100 with
# Llama-3-8B's shape, compiled, batch 1: 6.44 ms a step with SDPA; its memory-efficient kernel
# 6.57 ms, FlexAttention's decoding kernel 6.47 ms (and 1.5x slower at batch 64), matmuls 6.56 ms.
ATTENTION = ("sdpa", "matmul")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VERIFY_BUCKETS = (2, 4, 8, 16)  # rows of a verify step (one session's token and drafts)
MIN_LENGTH_BUCKET = 64


class SlotCache(KVCache):
    """One session's KV: views of its slot in the pool, for blocks [first, last) of the span."""

    def __init__(self, pool: DecodeEngine, slot: int, layers: tuple[int, int], max_length: int) -> None:
        # No super().__init__: the memory is the pool's.
        self.pool = pool
        self.layers = layers  # indexes into the span's blocks
        self.max_length = max_length
        self.length = 0
        self.released = False
        self._bind(slot)

    def _bind(self, slot: int) -> None:
        self.slot = slot
        first, last = self.layers
        self.k = self.pool.k[first:last, slot]  # [blocks, kv_heads, max_length + 1, head_dim]
        self.v = self.pool.v[first:last, slot]

    @property
    def nbytes(self) -> int:
        return self.pool.slot_bytes


def slot_bytes(span: Span, max_length: int) -> int:
    """Bytes of keys and values one slot holds for the whole span."""
    return KVCache.nbytes_for(span.config, span.num_blocks, max_length + 1, span.dtype)


def length_buckets(max_length: int) -> list[int]:
    buckets, length = [], MIN_LENGTH_BUCKET
    while length < max_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_length]


class DecodeEngine:
    """A span's KV pool and batched decode. `graphs`: capture CUDA graphs (default: on CUDA).

    Thread use: `open` and `release` may be called from the event loop's thread while
    the compute thread runs `decode`/`forward`; a lock guards the slot table. The
    caller releases a cache only when none of its steps is computing (node/backend.py).
    """

    def __init__(self, span: Span, slots: int, max_length: int, graphs: bool | None = None, attention: str = "sdpa", compile: bool | None = None) -> None:
        if slots < 1:
            raise ValueError("a decode engine needs at least one slot")
        c = span.config
        self.span = span
        self.slots = slots
        self.max_length = max_length
        self.slot_bytes = slot_bytes(span, max_length)
        shape = (span.num_blocks, slots, c.num_kv_heads, max_length + 1, c.head_dim)
        # Every buffer is made (and only ever written) in inference mode, like the tensors the
        # blocks make, so the compiled block sees one kind of tensor and compiles once.
        with torch.inference_mode():
            # zeros, not empty: rows riding along in a batch read their slot's stale keys
            self.k = torch.zeros(shape, dtype=span.dtype, device=span.device)
            self.v = torch.zeros(shape, dtype=span.dtype, device=span.device)
            self._x = torch.zeros(slots, c.hidden_size, dtype=span.dtype, device=span.device)
            self._pos = torch.full((slots,), max_length, dtype=torch.long, device=span.device)
            self._rows = torch.arange(slots, device=span.device)
            self._arange = torch.arange(max_length, device=span.device)
        self.graphs = span.device.type == "cuda" if graphs is None else graphs
        if attention not in ATTENTION:
            raise ValueError(f"attention is one of {', '.join(ATTENTION)}")
        self.attention = attention
        self.compiled = self.graphs if compile is None else compile
        # One compiled function serves every block and bucket: weights are arguments, shapes symbolic.
        self._block = torch.compile(decode_block, dynamic=True) if self.compiled else decode_block
        self._verify_block = torch.compile(verify_block, dynamic=True) if self.compiled else verify_block
        self._weights = [block_tensors(block) for block in span.blocks]
        self.batch_buckets = sorted({b for b in BATCH_BUCKETS if b < slots} | {slots})
        self.length_buckets = length_buckets(max_length)
        self._owners: list[SlotCache | None] = [None] * slots
        self._lock = threading.Lock()
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Verify steps: static inputs (rows, their positions, the slot) and graphs per (rows, length) bucket.
        with torch.inference_mode():
            top = VERIFY_BUCKETS[-1]
            self._vx = torch.zeros(top, c.hidden_size, dtype=span.dtype, device=span.device)
            self._vpos = torch.full((top,), max_length, dtype=torch.long, device=span.device)
            self._vslot = torch.zeros(1, dtype=torch.long, device=span.device)
        self._verify_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None
        pin = span.device.type == "cuda"
        self._host_x = torch.zeros(slots, c.hidden_size, dtype=span.dtype, pin_memory=pin)
        self._host_pos = torch.full((slots,), max_length, dtype=torch.long, pin_memory=pin)
        self._host_out = torch.zeros(slots, c.hidden_size, dtype=span.dtype, pin_memory=pin)
        self._done = torch.cuda.Event() if pin else None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def sessions(self) -> int:
        return sum(owner is not None for owner in self._owners)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, length) buckets that have a CUDA graph so far."""
        return sorted(self._captured)

    # --- slots ------------------------------------------------------------------------

    def open(self, max_length: int, blocks: tuple[int, int] | None = None) -> SlotCache:
        """A slot for a session over `blocks` (absolute numbers, default the span), or `Busy`."""
        if not 1 <= max_length <= self.max_length:
            raise LengthExceeded(f"max_length {max_length} is outside [1, {self.max_length}] on this node")
        first, last = blocks or (self.span.start, self.span.end)
        layers = (first - self.span.start, last - self.span.start)
        with self._lock:
            try:
                slot = self._owners.index(None)
            except ValueError:
                raise Busy(f"all {self.slots} KV slots are in use") from None
            cache = SlotCache(self, slot, layers, max_length)
            self._owners[slot] = cache
        return cache

    def release(self, cache: SlotCache) -> None:
        with self._lock:
            if not cache.released and self._owners[cache.slot] is cache:
                self._owners[cache.slot] = None
            cache.released = True

    def _compact(self) -> None:
        """Move the highest live sessions into free lower slots (compute thread only)."""
        if self.slots == 1:
            return
        with self._lock:
            while True:
                live = [i for i, owner in enumerate(self._owners) if owner is not None]
                free = [i for i, owner in enumerate(self._owners) if owner is None]
                if not live or not free or free[0] > live[-1]:
                    return
                src, dst = live[-1], free[0]
                cache = self._owners[src]
                length = cache.length
                self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
                self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])
                self._owners[dst], self._owners[src] = cache, None
                cache._bind(dst)

    # --- compute ------------------------------------------------------------------------

    def _on_device(self):
        """CUDA streams, graphs and events belong to the thread's current device: make it ours."""
        return torch.cuda.device(self.span.device) if self.span.device.type == "cuda" else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], blocks: tuple[int, int] | None = None) -> torch.Tensor:
        """Like `Span.forward` over SlotCaches (x on the span's device): one-token segments through
        the batched decode (graphs where they apply), longer ones through the ragged path."""
        with torch.inference_mode(), self._on_device():
            return self._forward(x, segments, blocks)

    def _forward(self, x: torch.Tensor, segments: Sequence[Segment], blocks: tuple[int, int] | None = None) -> torch.Tensor:
        blocks = blocks or (self.span.start, self.span.end)
        x = x.to(self.span.dtype)
        ones = [i for i, seg in enumerate(segments) if seg.length == 1]
        if len(ones) < len(segments):
            if not ones:
                return self._longer(x, segments, blocks)
            offsets = torch.tensor([0] + [seg.length for seg in segments]).cumsum(0).tolist()
            rest = [i for i in range(len(segments)) if segments[i].length != 1]
            out = torch.empty_like(x)
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in rest]).to(x.device)
            out[rows] = self._longer(x[rows], [segments[i] for i in rest], blocks)
            one_rows = torch.tensor([offsets[i] for i in ones], device=x.device)
            out[one_rows] = self._forward(x[one_rows], [segments[i] for i in ones], blocks)
            return out
        for seg in segments:
            seg.cache.check_step(seg.start, 1)
        self._compact()
        batch, length = self._buckets(segments)
        self._pos[:batch].fill_(self.max_length)
        if len(segments) == 1:  # a local run: scalars into the buffers, no index tensor to copy over
            slot = segments[0].cache.slot
            self._pos[slot : slot + 1].fill_(segments[0].start)
            self._x[slot : slot + 1].copy_(x)
            out = self._run(batch, length, blocks)[slot : slot + 1].clone()
        else:
            slots = torch.tensor([seg.cache.slot for seg in segments], device=self.span.device)
            self._pos.index_copy_(0, slots, torch.tensor([seg.start for seg in segments], device=self.span.device))
            self._x.index_copy_(0, slots, x)
            out = self._run(batch, length, blocks).index_select(0, slots)
        for seg in segments:
            seg.cache.length = seg.start + 1
        return out

    def _longer(self, x: torch.Tensor, segments: Sequence[Segment], blocks: tuple[int, int]) -> torch.Tensor:
        """Segments of several tokens: verify steps one session at a time when all are short
        (speculative steps), else the ragged path (prefill, replays)."""
        if all(seg.length <= VERIFY_BUCKETS[-1] for seg in segments):
            outs, offset = [], 0
            for seg in segments:
                outs.append(self._verify(x[offset : offset + seg.length], seg, blocks))
                offset += seg.length
            return torch.cat(outs)
        return self.span(x, segments, blocks)

    def _verify(self, x: torch.Tensor, seg: Segment, blocks: tuple[int, int]) -> torch.Tensor:
        """One session's T rows at positions [start, start + T) in its slot, T <= the largest row bucket."""
        seg.cache.check_step(seg.start, seg.length)
        self._compact()  # its slot may move: read it after
        rows = next(b for b in VERIFY_BUCKETS if b >= seg.length)
        length = next(n for n in self.length_buckets if n >= seg.start + seg.length)
        self._vslot.fill_(seg.cache.slot)
        self._vpos[:rows].fill_(self.max_length)  # padding rows write the spare position only
        self._vpos[: seg.length].copy_(torch.arange(seg.start, seg.start + seg.length))
        self._vx[: seg.length].copy_(x)
        if self.graphs and blocks == (self.span.start, self.span.end):
            captured = self._verify_graphs.get((rows, length))
            if captured is None:
                captured = self._capture_verify(rows, length)
            captured[0].replay()
            out = captured[1]
        else:
            out = self._verify_rows(rows, length, blocks)
        seg.cache.length = seg.start + seg.length
        return out[: seg.length].clone()

    def _capture_verify(self, rows: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        whole = (self.span.start, self.span.end)
        saved = self._vpos[:rows].clone()
        self._vpos[:rows].fill_(self.max_length)  # warm-up and capture write only the spare position
        graph = self._record(lambda: self._verify_rows(rows, length, whole))
        self._vpos[:rows].copy_(saved)
        self._verify_graphs[(rows, length)] = graph
        log.debug("captured a verify graph for %d rows, length %d", rows, length)
        return graph

    def _verify_rows(self, rows: int, length: int, blocks: tuple[int, int]) -> torch.Tensor:
        x, pos = self._vx[:rows], self._vpos[:rows]
        cos, sin = rope_tables(self.span.inv_freq, pos, x.dtype)
        visible = self._arange[:length][None, :] <= pos[:, None]  # [T, Lb]: causal within the step too
        c = self.span.config
        for layer in range(blocks[0] - self.span.start, blocks[1] - self.span.start):
            x = self._verify_block(x, cos, sin, self.k[layer], self.v[layer], self._vslot, pos, visible, *self._weights[layer], c.num_heads, c.num_kv_heads, c.head_dim, c.rms_eps)
        return x

    def decode_host(self, x: torch.Tensor, caches: Sequence[SlotCache], positions: Sequence[int]) -> torch.Tensor:
        """One-token steps of whole-span sessions, host tensors in and out: x [N, D] on the CPU
        (any dtype) -> [N, D] on the CPU in the span's dtype. Through pinned buffers."""
        with torch.inference_mode(), self._on_device():
            return self._decode_host(x, caches, positions)

    def _decode_host(self, x: torch.Tensor, caches: Sequence[SlotCache], positions: Sequence[int]) -> torch.Tensor:
        segments = [Segment(cache, position, 1) for cache, position in zip(caches, positions)]
        for seg in segments:
            seg.cache.check_step(seg.start, 1)
        self._compact()
        slots = [cache.slot for cache in caches]
        batch, length = self._buckets(segments)
        host_x, host_pos = self._host_x, self._host_pos
        host_pos[:batch].fill_(self.max_length)
        index = torch.tensor(slots)
        host_pos.index_copy_(0, index, torch.tensor(list(positions)))
        host_x.index_copy_(0, index, x.to(self.span.dtype))
        self._x[:batch].copy_(host_x[:batch], non_blocking=True)
        self._pos[:batch].copy_(host_pos[:batch], non_blocking=True)
        out = self._run(batch, length, (self.span.start, self.span.end))
        self._host_out[:batch].copy_(out, non_blocking=True)
        if self._done is not None:
            self._done.record()
            self._done.synchronize()  # the one wait: the result is on the host
        for seg in segments:
            seg.cache.length = seg.start + 1
        return self._host_out.index_select(0, index)  # a copy: the buffer is reused next step

    def _buckets(self, segments: Sequence[Segment]) -> tuple[int, int]:
        top = max(seg.cache.slot for seg in segments) + 1
        longest = max(seg.start for seg in segments) + 1
        batch = next(b for b in self.batch_buckets if b >= top)
        length = next(n for n in self.length_buckets if n >= longest)
        return batch, length

    def _run(self, batch: int, length: int, blocks: tuple[int, int]) -> torch.Tensor:
        """Decode the rows in self._x[:batch] at self._pos[:batch]; the graph's output when captured."""
        whole = blocks == (self.span.start, self.span.end)
        if not (self.graphs and whole):
            return self._decode(batch, length, blocks)
        captured = self._captured.get((batch, length))
        if captured is None:
            captured = self._capture(batch, length)
        graph, out = captured
        graph.replay()
        return out[:batch]

    def _capture(self, batch: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record the decode of (batch, length) once; the static buffers are its inputs."""
        whole = (self.span.start, self.span.end)
        saved = self._pos[:batch].clone()
        self._pos[:batch].fill_(self.max_length)  # warm-up runs write only the spare position
        graph = self._record(lambda: self._decode(batch, length, whole))
        self._pos[:batch].copy_(saved)
        self._captured[(batch, length)] = graph
        log.debug("captured a CUDA graph for batch %d, length %d", batch, length)
        return graph

    def _record(self, run) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of `run()` and its output buffer: a first run off the capture stream, as capture requires."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = run()
        return graph, out

    def _decode(self, batch: int, length: int, blocks: tuple[int, int]) -> torch.Tensor:
        """Rows self._x[:batch] of slots [0, batch) through `blocks`, each at its self._pos."""
        x, pos = self._x[:batch], self._pos[:batch]
        cos, sin = rope_tables(self.span.inv_freq, pos, x.dtype)
        visible = (self._arange[:length][None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, Lb]
        rows = self._rows[:batch]
        c = self.span.config
        for layer in range(blocks[0] - self.span.start, blocks[1] - self.span.start):
            x = self._block(x, cos, sin, self.k[layer], self.v[layer], rows, pos, visible, *self._weights[layer], c.num_heads, c.num_kv_heads, c.head_dim, c.rms_eps, self.attention)
        return x

    def warm(self, batches: Sequence[int] = (1,)) -> None:
        """Capture the graphs of the shortest length bucket for these batch sizes and for verify steps (start-up)."""
        if not self.graphs:
            return
        with torch.inference_mode(), self._on_device():
            for batch in batches:
                bucket = next(b for b in self.batch_buckets if b >= min(batch, self.slots))
                if (bucket, self.length_buckets[0]) not in self._captured:
                    self._capture(bucket, self.length_buckets[0])
            for rows in VERIFY_BUCKETS:  # speculative steps: compiles their block function now, not mid-generation
                if (rows, self.length_buckets[0]) not in self._verify_graphs:
                    self._capture_verify(rows, self.length_buckets[0])
