"""A CPU-head client against a two-node swarm, applying its own LM head or having the last node apply it.

Two real node processes ([0, L/2) and [L/2, L), the second with `--serve-head`,
on `--device`) behind a bootstrap peer; one `SwarmModel` client whose head is on
the CPU in float32 (a client without a GPU). Greedy decode tokens/s with
`remote_head` "never" (the client's head) and "always" (the last node's), in
alternating trials of the same run, whether both give the same tokens, and the
client's own head time per token (one [1, D] x [D, V] product on its CPU).

Run here: `python benchmarks/serve_head.py` (default model, CPU nodes).
On a GPU box: `python benchmarks/serve_head.py --model DIR --device cuda --new-tokens 64`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import emit
from client.generate import GenerationStats
from client.launcher import LocalSwarm
from client.planner import ClientConfig
from client.sampling import SamplingParams
from client.session import SessionConfig
from client.swarm import SwarmModel
from swarm.model import DEFAULT_MODEL, open_checkpoint
from swarm.transport import Transport
from tests.nodes import until_routed

PROMPT = "Write a long story about a dragon who learns to cook."


async def decode(client: SwarmModel, ids: list[int], params: SamplingParams) -> GenerationStats:
    stats = GenerationStats()
    async for _ in client.stream_generation(ids, params, stats):
        pass
    return stats


def head_ms(client: SwarmModel, repeats: int = 20) -> float:
    """The client's own head on one position: what serving the head saves it per token."""
    hidden = torch.randn(1, client.head.config.hidden_size)
    client.head.logits(hidden)
    began = time.perf_counter()
    for _ in range(repeats):
        client.head.logits(hidden)
    return (time.perf_counter() - began) / repeats * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", help="the nodes' device (the client's head is always on the CPU)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--wire-dtype", default=None, help="default: float32 for cpu nodes, bfloat16 for cuda")
    args = parser.parse_args()
    say = lambda message: print(message, file=sys.stderr, flush=True)
    with open_checkpoint(args.model) as checkpoint:
        layers = checkpoint.config.num_layers
    wire_dtype = args.wire_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False, speculate=False)
    extra = ["--serve-head", "--device", args.device]  # the first node ignores --serve-head: it does not end at the last block
    async with LocalSwarm(
        args.model, [(0, layers // 2), (layers // 2, layers)], extra, say, Transport(insecure_http=True)
    ) as swarm:
        clients = {
            mode: SwarmModel(
                args.model,
                bootstrap=[swarm.bootstrap_url],
                insecure_http=True,
                device="cpu",  # a client without a GPU, on any box
                config=ClientConfig(wire_dtype=wire_dtype, verify_fraction=0.0, session=SessionConfig(remote_head=mode)),
            )
            for mode in ("never", "always")
        }
        await until_routed(clients["never"])
        ids = clients["never"].head.encode_prompt(PROMPT, chat=True)
        for client in clients.values():  # warm: routes planned, caches allocated
            await decode(client, ids, SamplingParams(max_new_tokens=4, stop_at_eos=False, speculate=False))
        runs: dict[str, list[GenerationStats]] = {mode: [] for mode in clients}
        for _ in range(args.trials):
            for mode, client in clients.items():
                runs[mode].append(await decode(client, ids, params))
        common = {
            "model": args.model,
            "device": args.device,
            "wire_dtype": wire_dtype,
            "new_tokens": args.new_tokens,
            "trials": args.trials,
        }
        speeds = {}
        for mode, stats in runs.items():
            speeds[mode] = statistics.median(s.decode_tokens_per_s for s in stats)
            emit(f"serve_head.decode_tokens_per_s.{mode}", speeds[mode], "tokens/s", {**common, "remote_head": mode}, args.device)
        emit("serve_head.speedup", speeds["always"] / speeds["never"], "x", common, args.device)
        same = all(s.token_ids == runs["never"][0].token_ids for stats in runs.values() for s in stats)
        emit("serve_head.same_tokens", float(same), "bool", common, args.device)
        emit(
            "serve_head.client_head_ms",
            head_ms(clients["never"]),
            "ms/token",
            {**common, "vocab": clients["never"].head.config.vocab_size},
            "cpu",
        )


if __name__ == "__main__":
    asyncio.run(main())
