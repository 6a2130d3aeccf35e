"""The client's head: what one head call costs, and what sharing it among sessions saves.

    python benchmarks/head_batch.py --device cpu --shape small      # here: the default model's head shape
    python benchmarks/head_batch.py --device cuda --shape 8b        # a GPU client, Llama-3-8B's head (128k vocab), bf16

A random head of the shape (no checkpoint needed: only the [D, V] matmul matters) on
`--device` in its default dtype (bf16 on a GPU, float32 on the CPU). Results:
- `head_batcher_alone_overhead`: what `HeadBatcher.logits` adds to a plain head call for
  a generation that is alone in its loop (it runs inline: no extra loop turn), timed on a
  tiny head (64 x 512) so that the head's own time does not drown it;
- `head_tokens_per_s` per session count, one batched head call per step against one
  call per session: N generations in one event loop, each step a loop turn (the network's
  stand-in) then its logits and a greedy argmax (which syncs a GPU, as sampling does).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from client.head_batch import HeadBatcher  # noqa: E402
from swarm.model.config import ModelConfig  # noqa: E402
from swarm.model.device import default_dtype, resolve_device  # noqa: E402
from swarm.model.head import Head  # noqa: E402

SHAPES = {"tiny": (64, 512), "small": (576, 49152), "8b": (4096, 128256), "70b": (8192, 128256)}  # hidden, vocab


def random_head(shape: str, device: torch.device, dtype: torch.dtype) -> Head:
    hidden, vocab = SHAPES[shape]
    config = ModelConfig("llama", 1, hidden, hidden, 1, 1, vocab, tie_embeddings=True)
    generator = torch.Generator(device).manual_seed(0)
    weights = {"norm": torch.ones(hidden, device=device, dtype=dtype), "embed": torch.randn(vocab, hidden, device=device, dtype=dtype, generator=generator) * 0.02}
    return Head(config, weights, tokenizer=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def alone_overhead(head: Head, rows: torch.Tensor, calls: int) -> tuple[float, float]:
    """(plain call, batcher call) median seconds per call+argmax, interleaved in rounds."""
    batcher = HeadBatcher(head)
    plain, batched = [], []
    with batcher.generation():
        for _ in range(7):
            began = time.perf_counter()
            for i in range(calls):
                int(head.logits(rows[i % len(rows)][None])[0].argmax())
            plain.append((time.perf_counter() - began) / calls)
            began = time.perf_counter()
            for i in range(calls):
                (await batcher.score(rows[i % len(rows)]))[1]
            batched.append((time.perf_counter() - began) / calls)
    return statistics.median(plain), statistics.median(batched)


async def sessions_rate(head: Head, rows: torch.Tensor, sessions: int, steps: int, batched: bool) -> float:
    """Aggregate head-only tokens/s of `sessions` generations in one loop."""
    batcher = HeadBatcher(head)

    async def one(index: int) -> None:
        with batcher.generation() if batched else _nothing():
            for step in range(steps):
                await asyncio.sleep(0)  # the network step
                row = rows[(index + step) % len(rows)]
                if batched:
                    await batcher.score(row)  # logits and argmax (one sync a batch)
                else:
                    int(head.logits(row[None])[0].argmax())

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(sessions)))
    return sessions * steps / (time.perf_counter() - began)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="the head's hidden size and vocabulary (default small: the default model's)")
    parser.add_argument("--sessions", default="1,4,16", help="comma-separated session counts (default 1,4,16)")
    parser.add_argument("--steps", type=int, default=0, help="steps per session (default: 40 on a GPU, 10 on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    head = random_head(args.shape, device, dtype)
    rows = torch.randn(16, SHAPES[args.shape][0], generator=torch.Generator().manual_seed(1))
    if device.type == "cuda":
        rows = rows.to(device)  # as a local GPU span would hand them over; a swarm's come from the CPU
    steps = args.steps or (40 if device.type == "cuda" else 10)
    name = str(device)
    params = {"threads": torch.get_num_threads(), "shape": args.shape, "hidden": SHAPES[args.shape][0], "vocab": SHAPES[args.shape][1], "dtype": str(dtype).removeprefix("torch.")}

    tiny = random_head("tiny", device, dtype)
    asyncio.run(alone_overhead(tiny, rows[:, :64], 100))  # warm-up
    plain, batched = asyncio.run(alone_overhead(tiny, rows[:, :64], 2000))
    overhead_us = (batched - plain) * 1e6
    emit(
        "head_batcher_alone_overhead", overhead_us, "us", {"shape": "tiny", "plain_call_us": round(plain * 1e6, 2)}, device=name,
        human=f"one session, tiny head: {plain * 1e6:.1f} us a call plain, {batched * 1e6:.1f} us through the batcher ({overhead_us:+.2f} us)",
    )  # fmt: skip
    asyncio.run(sessions_rate(head, rows, 2, 3, True))  # warm-up: kernels, allocator
    sync(device)
    for sessions in (int(n) for n in args.sessions.split(",")):
        alone = asyncio.run(sessions_rate(head, rows, sessions, steps, batched=False))
        shared = asyncio.run(sessions_rate(head, rows, sessions, steps, batched=True))
        emit(
            "head_tokens_per_s", shared, "tokens/s", {**params, "sessions": sessions, "unbatched_tokens_per_s": round(alone, 1)}, device=name,
            human=f"{sessions:2d} sessions: head {shared:.0f} tokens/s batched, {alone:.0f} one call each ({shared / alone:.2f}x)",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
