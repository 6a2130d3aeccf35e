"""One head call for the generations of one client that need logits at the same time.

The LM head reads a [D, V] matrix to turn one hidden row into logits: 0.5 GB for a
128k vocabulary in bf16, 2 GB in float32. Sessions that each call it read it once per
token each; stacked into one [n, D] @ [D, V] they read it once for all (on the
2-core test box, one thread, 16 rows of the default model's head cost ~5x one
row, not 16x; on a GPU a few rows cost about what one does).

`HeadBatcher` does this for the generations running in one event loop. Each
generation registers for its lifetime (`generation()`); when it needs logits it
awaits `score(row)`, its logits and their argmax (computed for the whole batch at
once: on a GPU one device sync a batch instead of one a session):
- alone (the only generation of its loop), the head runs at once, inline: no extra
  loop turn, the single-session path costs what it did before the batcher;
- otherwise the row waits for the others. The batch runs as soon as every registered
  generation is waiting, or when a loop turn passes that brought no new row (the rest
  are still on the network), or after `MAX_TURNS` turns: a late session never holds
  the others back by more than a few loop turns.

The head runs on the loop's thread, as it did before: on a GPU it only launches kernels.
A waiter that is cancelled drops out of its batch; an error of the head reaches every
waiter of that batch.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from swarm.model.head import Head

MAX_TURNS = 8  # loop turns a batch may wait for more rows while rows keep coming


@dataclass
class _LoopState:
    """The batch being gathered in one event loop."""

    active: int = 0  # generations registered in this loop
    waiting: list[tuple[torch.Tensor, asyncio.Future]] = field(default_factory=list)  # rows [n, D] and their waiters
    handle: asyncio.Handle | None = None  # the turn-end check, while rows wait
    turns: int = 0  # turns the current batch has waited


class HeadBatcher:
    """Shares one head call among the generations of one event loop that need logits in the same turn."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self.calls = 0  # head calls made
        self.rows = 0  # rows they computed (rows / calls: the mean batch)

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Registers one generation in the running loop for the block's lifetime."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        state.active += 1
        try:
            yield
        finally:
            state.active -= 1
            if state.active == 0 and not state.waiting:
                self._loops.pop(loop, None)

    async def score(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One last-block output [D] or [1, D] -> (its logits [V], float32 on the head's device; their argmax)."""
        logits, best = await self.score_rows(hidden.reshape(1, -1))
        return logits[0], best[0]

    async def score_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Rows [n, D] of one generation (a speculative step's) -> (their logits [n, V]; each row's argmax),
        in one head call with the other generations' rows."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None or (state.active <= 1 and not state.waiting):
            return self._run([hidden])  # alone: inline, as without a batcher
        future = loop.create_future()
        state.waiting.append((hidden, future))
        if len(state.waiting) >= state.active:
            self._flush(state)  # every generation of the loop is here: nobody else to wait for
        elif state.handle is None:
            state.turns = 0
            state.handle = loop.call_soon(self._turn_end, state, len(state.waiting))
        return await future

    def _turn_end(self, state: _LoopState, seen: int) -> None:
        """A loop turn has passed: wait one more while it brought rows, else run the batch."""
        state.handle = None
        state.turns += 1
        if len(state.waiting) > seen and state.turns < MAX_TURNS:
            state.handle = asyncio.get_running_loop().call_soon(self._turn_end, state, len(state.waiting))
            return
        self._flush(state)

    def _flush(self, state: _LoopState) -> None:
        waiting, state.waiting = state.waiting, []
        if state.handle is not None:
            state.handle.cancel()
            state.handle = None
        waiting = [(row, future) for row, future in waiting if not future.done()]  # cancelled waiters drop out
        if not waiting:
            return
        try:
            logits, best = self._run([rows for rows, _ in waiting])
        except Exception as exc:  # the head failed: every waiter of this batch hears it
            for _, future in waiting:
                future.set_exception(exc)
            return
        at = 0
        for rows, future in waiting:
            n = rows.shape[0]
            future.set_result((logits[at : at + n], best[at : at + n]))
            at += n

    def _run(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """blocks of rows [n_i, D] -> (logits [sum n_i, V], each row's argmax): one head call, one device sync."""
        self.calls += 1
        self.rows += sum(r.shape[0] for r in rows)
        first = rows[0]
        stacked = first if len(rows) == 1 else torch.cat([r.to(first.device, first.dtype) for r in rows])
        logits = self.head.logits(stacked)
        return logits, logits.argmax(-1).tolist()
