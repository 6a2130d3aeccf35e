"""`--serve-head`: the node serving a model's last blocks also applies its final norm and LM head.

A client without a GPU spends more time on the head (a [D] x [D, V] product per
token, 16.8 ms on a CPU for a 128k vocabulary) than a GPU swarm spends on all
the blocks. A node that holds the last blocks can do it for the client and send
back only what sampling needs: the top K candidates (ids, logits) and the
logsumexp over all V logits (swarm/head_protocol.py). The client opts in per
session (`Open.head = K`).

The head is applied to every row the step sends (the last position's for output
"last"; all of them for output "all", at most MAX_HEAD_ROWS: a speculative
step's k+1 positions), each exactly as it is sent on the
wire (`sent`: rounded to the session's wire dtype), the very tensor a client
running its own head would use: on the same device and dtype both sides get the
same logits, so greedy text does not change when the client falls back to its
own head (failover to a hop without `--serve-head`).

`check_open` refuses a head request whole, before the session exists: from a
node not started with `--serve-head` or for a session not ending at the model's
last block (`HeadNotServed`); `check_head_step` refuses a step asking the head
for more than MAX_HEAD_ROWS rows before it computes (`BadRequest`). K itself was range-checked by `Open.from_wire`
(1..MAX_HEAD_K, an integer). The product runs on the node's compute executor,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swarm.errors import BadRequest, HeadNotServed, ShuttingDown, SwarmError
from swarm.head_protocol import MAX_HEAD_ROWS, HeadResult
from swarm.model.config import ModelConfig
from swarm.protocol import Error, Result

HEAD_CHUNK_ROWS = 256  # rows in one head product: many speculating sessions' steps at once must not hold [rows, V] all together


@dataclass(frozen=True)
class TopK:
    ids: torch.Tensor  # [K] int64, most likely first
    logits: torch.Tensor  # [K] float32, descending
    logsumexp: float  # over all V logits


class LMHead:
    """The final RMSNorm and the LM head, nothing else (no embeddings, no tokenizer).

    The same product as the client's `swarm.model.head.Head.logits`: RMSNorm in the
    head's dtype, then `h @ lm_head_t`, then float32."""

    def __init__(self, config: ModelConfig, norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        self.config = config
        self.norm_weight = norm  # [D]
        self.lm_head_t = lm_head.t().contiguous()  # [D, V]: the layout Head uses, for the same sums

    def top(self, hidden: torch.Tensor, k: int) -> TopK:
        """hidden [1, D] -> the top `k` of its logits and the logsumexp of all of them."""
        return self.top_batch(hidden, [k])[0]

    @torch.inference_mode()
    def top_batch(self, hidden: torch.Tensor, ks: list[int]) -> list[TopK]:
        """hidden [n, D] (rows of one or more sessions' steps) -> each row's top `ks[i]` and logsumexp:
        one [n, D] x [D, V] product per HEAD_CHUNK_ROWS rows (bounding the [rows, V] float32 logits)."""
        out: list[TopK] = []
        for at in range(0, hidden.shape[0], HEAD_CHUNK_ROWS):
            chunk, chunk_ks = hidden[at : at + HEAD_CHUNK_ROWS], ks[at : at + HEAD_CHUNK_ROWS]
            h = chunk.to(device=self.lm_head_t.device, dtype=self.lm_head_t.dtype)
            h = F.rms_norm(h, (self.config.hidden_size,), self.norm_weight, self.config.rms_eps)
            logits = (h @ self.lm_head_t).float()  # [n, V]
            values, ids = torch.topk(logits, min(max(chunk_ks), logits.shape[1]), dim=1)  # [n, K]
            values, ids, lse = values.cpu(), ids.cpu(), torch.logsumexp(logits, 1).cpu()  # one copy each, one sync
            out += [TopK(ids[i, :k], values[i, :k], float(lse[i])) for i, k in enumerate(chunk_ks)]
        return out


def load_lm_head(checkpoint, dtype: torch.dtype, device: torch.device) -> LMHead:
    """The final norm and LM head of `checkpoint` (tied: the embeddings), on `device` in `dtype`."""
    weights = checkpoint.head_weights(dtype)
    lm_head = weights.get("lm_head", weights["embed"])
    return LMHead(checkpoint.config, weights["norm"].to(device), lm_head.to(device))


class HeadService:
    """Applies the LM head for sessions that asked for it, on the node's compute executor.

    The steps of one batch finish in the same turn of the event loop; their heads are gathered
    until that turn ends and run as one [n, D] x [D, V] product (on a GPU the weights are read
    once for all of them, which is the whole cost). A row's logits may then differ in the last
    bits from the same row run alone, as they would in the client's own batched head. A step of
    several rows (output "all") puts all of them in the product, beside the other sessions' rows."""

    def __init__(self, head: LMHead, executor: concurrent.futures.Executor | None = None) -> None:
        self.head = head
        self.executor = executor  # None: the loop's default executor (in-process tests)
        self.served = 0  # steps answered with candidates, since start (shown in /info)
        self.rows = 0  # rows answered with candidates (more than `served` when steps output all their rows)
        self.batches = 0  # head products run (served / batches: the mean batch)
        self._waiting: list[tuple[torch.Tensor, int, asyncio.Future]] = []  # this loop turn's requests: rows [T, D], K

    def check_open(self, blocks: tuple[int, int], span_end: int) -> None:
        """Refuse a head request for a session that does not end at the model's last block."""
        num_layers = self.head.config.num_layers
        if blocks[1] != num_layers:
            raise HeadNotServed(
                f"the head is applied only after the model's last block ({num_layers}): this session ends at block {blocks[1]}"
            )
        if span_end != num_layers:
            raise HeadNotServed(f"this node does not hold the model's last block ({num_layers}): it serves no head now")

    async def top(self, hidden: torch.Tensor, k: int) -> list[TopK]:
        """The candidates of each row of hidden [T, D] (the rows the step sends, as sent on the wire)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((hidden, k, future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush, loop)  # after the other steps finishing in this turn have joined
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._waiting = self._waiting, []
        hidden = torch.cat([h.float() for h, _, _ in batch])  # float32 holds every wire dtype exactly
        try:
            run = loop.run_in_executor(self.executor, self.head.top_batch, hidden, [k for h, k, _ in batch for _ in range(h.shape[0])])
        except RuntimeError:  # the compute thread has stopped: the node is going
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(ShuttingDown("node is shutting down: move the session elsewhere"))
            return
        run.add_done_callback(lambda done: self._deliver(batch, done))
        self.batches += 1

    def _deliver(self, batch: list[tuple[torch.Tensor, int, asyncio.Future]], done: asyncio.Future) -> None:
        failure = None if done.cancelled() else done.exception()
        rows = done.result() if not done.cancelled() and failure is None else None
        at = 0
        for hidden, _, future in batch:
            answer, at = (None if rows is None else rows[at : at + hidden.shape[0]]), at + hidden.shape[0]
            if future.done():
                continue  # its step was cancelled meanwhile (shutdown)
            if done.cancelled():
                future.cancel()
            elif failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(answer)
                self.served += 1
                self.rows += hidden.shape[0]


def check_head_step(head: int, output: str, rows: int) -> None:
    """Refuse (`BadRequest`) a step of a head session that would ask the head for more than MAX_HEAD_ROWS rows."""
    if head and output == "all" and rows > MAX_HEAD_ROWS:
        raise BadRequest(f"the head is applied to at most {MAX_HEAD_ROWS} rows of a step: this one outputs {rows}")


def refuse_head(blocks: tuple[int, int]) -> HeadNotServed:
    """What a node without `--serve-head` answers a session asking for the head."""
    return HeadNotServed(
        f"this node does not serve the LM head (it runs without --serve-head): apply it yourself (blocks {blocks[0]}:{blocks[1]})"
    )


def check_head_request(service: HeadService | None, blocks: tuple[int, int], span_end: int) -> None:
    """Refuse an `open` asking for the head (`HeadNotServed`) unless this node can serve it for `blocks`."""
    if service is None:
        raise refuse_head(blocks)
    service.check_open(blocks, span_end)


async def with_head(service: HeadService, result: Result, k: int) -> HeadResult | Error:
    """`result` (sealed as usual) with the top `k` of each row's logits added (every row it sends: the
    last position's, or all for output "all"), or the error for the session's owner."""
    try:
        check_head_step(k, "all", result.hidden.shape[0])  # a step past the limit was refused before it ran
        rows = await service.top(result.hidden, k)
    except SwarmError as exc:
        return Error.of(exc, session=result.session, step=result.step)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    ids, logits = torch.stack([r.ids for r in rows]), torch.stack([r.logits for r in rows])
    lse = torch.tensor([r.logsumexp for r in rows], dtype=torch.float32)
    return HeadResult(**fields, ids=ids, logits=logits, logsumexp=lse)
