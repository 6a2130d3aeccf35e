"""What verified outputs cost: aggregate decode tokens/s of a loopback swarm, checking vs not, same run.

Several clients (one `SwarmModel` each, concurrently in this process) each run
greedy generations back to back through a swarm of real node processes. Arms,
alternated round by round so that drift in the machine's speed hits all alike:

- `untapped`: sessions opened without `tap` and nothing checked (the client before verification);
- `tapped`: every session tapped (the default: hops send their outputs), nothing checked;
- `f=0.25` (the default fraction), and `f=1` (every generation checked).

So that the count of checks is not itself noise, a checked arm checks exactly
that share: with f=0.25 each client checks every fourth generation (`verify=True`,
staggered across clients) instead of drawing; what a check costs does not depend
on how it was chosen. Client i takes route i of `plan_routes` in every arm (spread over the
replicas), so that no arm is faster only because its clients planned other
routes. The ratios are paired per round (each arm against the
`tapped` arm of the same round) and their median is reported.

Aggregate tokens/s is every client's new tokens over the wall time of the whole
arm, so a check (it runs after a generation's text and before that client's
next generation) and the replicas' re-runs (they compete with decode for the
nodes' compute) both count. Spans default to three nodes holding every block
(each hop then has two other replicas: a re-run and a third); `--spans` takes
others, e.g. two replica chains `0:10,10:20,20:30,0:10,10:20,20:30`.

Run: `python benchmarks/verify_cost.py [--clients 4] [--generations 6] [--new-tokens 32] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from client.launcher import LocalSwarm  # noqa: E402
from client.sampling import SamplingParams  # noqa: E402
from client.session import SessionConfig  # noqa: E402
from client.swarm import ClientConfig, SwarmModel  # noqa: E402
from client.verify import Verdict  # noqa: E402
from swarm.model import DEFAULT_MODEL  # noqa: E402

PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain how tides work.", "List ten uses of a brick.", "Describe a city at night."]
ARMS = {"untapped": (False, 0), "tapped": (True, 0), "f=0.25": (True, 4), "f=1": (True, 1)}  # (tap, check every n-th; 0: never)


async def one_client(model: SwarmModel, route, ids: list[int], params: SamplingParams, generations: int, every: int, offset: int) -> tuple[int, list[float], list[str]]:
    """`generations` back to back, checking every `every`-th; (new tokens, seconds each check took, verdicts)."""
    tokens, checks, verdicts = 0, [], []
    for generation in range(generations):
        stats, done_at = None, 0.0
        check = every > 0 and (generation + offset) % every == 0
        async for _, stats, _ in model.stream_result(ids, params, route, verify=check):
            done_at = time.perf_counter()
        tokens += stats.new_tokens
        if stats.verification is not None:
            checks.append(time.perf_counter() - done_at)
            verdicts.append(stats.verification.verdict.value)
    return tokens, checks, verdicts


async def run_arm(models: list[SwarmModel], routes: list, prompts: list[list[int]], params: SamplingParams, generations: int, every: int) -> tuple[float, list[float], list[str]]:
    began = time.perf_counter()
    runs = (one_client(m, r, ids, params, generations, every, i) for i, (m, r, ids) in enumerate(zip(models, routes, prompts)))
    results = await asyncio.gather(*runs)
    wall = time.perf_counter() - began
    return sum(r[0] for r in results) / wall, [c for r in results for c in r[1]], [v for r in results for v in r[2]]


def _spans(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", default="0:30,0:30,0:30", help="node spans (default three full replicas)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--generations", type=int, default=4, help="generations per client per arm and round (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (default 32)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    parser.add_argument("--wire-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which arms, comma separated (default {','.join(ARMS)})")
    args = parser.parse_args()
    arms = args.arms.split(",")
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False, speculate=False)
    spans = _spans(args.spans)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    tps: dict[str, list[float]] = {arm: [] for arm in arms}
    checks: dict[str, list[float]] = {arm: [] for arm in arms}
    verdicts: dict[str, list[str]] = {arm: [] for arm in arms}
    async with LocalSwarm(DEFAULT_MODEL, spans, progress=say) as swarm:
        models: dict[str, list[SwarmModel]] = {}
        for arm in arms:
            tap, _ = ARMS[arm]
            models[arm] = [
                SwarmModel(
                    DEFAULT_MODEL, bootstrap=[swarm.bootstrap_url],
                    config=ClientConfig(wire_dtype=args.wire_dtype, session=replace(SessionConfig(), tap=tap), verify_seed=i),
                )  # fmt: skip
                for i in range(args.clients)
            ]
        prompts = [models[arms[0]][0].head.encode_prompt(PROMPTS[i % len(PROMPTS)], chat=True) for i in range(args.clients)]
        first = models[arms[0]][0]
        async with first.config.transport.client_session() as http:
            await first.refresh(http, force=True)
        routes = first.planner.plan_routes(args.clients)
        say("routes: " + "; ".join(str(r) for r in routes))
        for arm in arms:  # warm up, uncounted: every client's view and round trips, the nodes' caches and allocator
            await run_arm(models[arm], routes, prompts, params, 1, ARMS[arm][1])
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else reversed(arms):
                value, took, said = await run_arm(models[arm], routes, prompts, params, args.generations, ARMS[arm][1])
                tps[arm].append(value)
                checks[arm] += took
                verdicts[arm] += said
                say(f"round {round_} {arm}: {value:.1f} tokens/s, {len(took)} checks")
    p = {"spans": args.spans, "clients": args.clients, "generations": args.generations * args.rounds, "new_tokens": args.new_tokens, "wire": args.wire_dtype}
    base = "tapped" if "tapped" in tps else arms[0]
    for arm in arms:
        value = statistics.median(tps[arm])
        emit("verify_aggregate_tokens_per_s", value, "tokens/s", {**p, "arm": arm})
        if checks[arm]:
            disagreements = sum(v != Verdict.AGREE.value for v in verdicts[arm])
            emit(
                "verify_check_s_median", statistics.median(checks[arm]), "s", {**p, "arm": arm, "checks": len(checks[arm]), "not_agree": disagreements},
                human=f"{arm}: {len(checks[arm])} checks, median {statistics.median(checks[arm]) * 1e3:.0f} ms after the text, {disagreements} not 'agree'",
            )  # fmt: skip
        if arm != base:
            ratio = statistics.median(a / b for a, b in zip(tps[arm], tps[base]))  # paired by round
            emit("verify_throughput_vs_" + base, ratio, "ratio", {**p, "arm": arm}, human=f"{arm} vs {base}: {ratio:.3f}x aggregate tokens/s ({(1 - ratio) * 100:+.1f}% cost)")


if __name__ == "__main__":
    asyncio.run(main())
