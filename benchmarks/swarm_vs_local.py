"""A 3-node loopback swarm against single-process generation, same machine, same run.

Decode tokens/s and time to first token of greedy generation through a bootstrap
peer and three real node processes ([0,10) [10,20) [20,30)), against the whole
model in this process, as ratios; and route planning time for 1000 peers.

Run: `python benchmarks/swarm_vs_local.py [--new-tokens 64] [--trials 3] [--model DIR]` (a random
checkpoint of the default model's shape stands in where the model is not: tests/random_checkpoint.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from benchmarks.route_planning import random_table, time_plan  # noqa: E402
from client.generate import GenerationStats, LocalBlocks, stream_tokens  # noqa: E402
from client.launcher import LocalSwarm  # noqa: E402
from client.local import LocalModel  # noqa: E402
from client.sampling import SamplingParams  # noqa: E402
from client.swarm import ClientConfig, SwarmModel  # noqa: E402
from swarm.model import DEFAULT_MODEL  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to cook."


async def local_runs(model: LocalModel, ids: list[int], params: SamplingParams, trials: int) -> list[GenerationStats]:
    runs = []
    for _ in range(trials):
        stats = GenerationStats()
        async for _ in stream_tokens(model.head, LocalBlocks(model.span, len(ids) + params.max_new_tokens), ids, params, stats):
            pass
        runs.append(stats)
    return runs


async def swarm_runs(client: SwarmModel, ids: list[int], params: SamplingParams, trials: int) -> list[GenerationStats]:
    runs = []
    for _ in range(trials):
        stats = None
        async for _, stats, _ in client.stream_result(ids, params):
            pass
        runs.append(stats)
    return runs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf or HF directory of 30 blocks (default: the default model)")
    args = parser.parse_args()
    # One token a step on both sides: this compares the pipeline's cost, not speculation's gain (benchmarks/latency.py).
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False, speculate=False)
    local = LocalModel.load(args.model)
    ids = local.head.encode_prompt(PROMPT, chat=True)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    async with LocalSwarm(args.model, [(0, 10), (10, 20), (20, 30)], progress=say) as swarm:
        for wire in ("float32", "bfloat16"):
            client = SwarmModel(args.model, bootstrap=[swarm.bootstrap_url], config=ClientConfig(wire_dtype=wire))
            # alternate, so drift in the machine's speed hits both sides alike
            ours, theirs = [], []
            for _ in range(args.trials):
                ours += await swarm_runs(client, ids, params, 1)
                theirs += await local_runs(local, ids, params, 1)
            p = {"new_tokens": args.new_tokens, "wire": wire, "hops": 3, "prompt_tokens": len(ids)}
            swarm_tps = max(s.decode_tokens_per_s for s in ours)
            local_tps = max(s.decode_tokens_per_s for s in theirs)
            swarm_ttft = min(s.time_to_first_token_s for s in ours)
            local_ttft = min(s.time_to_first_token_s for s in theirs)
            emit("swarm_decode_tokens_per_s", swarm_tps, "tokens/s", p)
            emit("local_decode_tokens_per_s", local_tps, "tokens/s", p)
            emit("swarm_decode_vs_local", swarm_tps / local_tps, "ratio", p, human=f"{wire} wire: swarm {swarm_tps:.1f} tok/s vs local {local_tps:.1f} tok/s = {swarm_tps / local_tps:.2f}x")
            emit("swarm_ttft_vs_local", swarm_ttft / local_ttft, "ratio", p, human=f"{wire} wire: first token {swarm_ttft * 1e3:.0f} ms vs local {local_ttft * 1e3:.0f} ms = {swarm_ttft / local_ttft:.2f}x")
    table = random_table(random.Random(0), 1000, 30, 15)
    planning = statistics.median(time_plan(table, 30, 200)) * 1e3
    emit("route_planning_1000_peers_median", planning, "ms", {"peers": len(table), "num_layers": 30})


if __name__ == "__main__":
    asyncio.run(main())
