"""What trust costs: TLS and verified outputs against plain http without them, same run.

Two loopback swarms of real node processes, alike but for the transport: one
serves plain http (`--insecure-http`), one TLS (the default). Each holds the
model twice over as 3-hop chains ([0,10) [10,20) [20,30), twice), so a
verified generation has another replica of the checked hop to re-run on.

Arms, alternated round by round so that drift in the machine's speed hits all alike:
- `http`: plain http, sessions untapped, nothing verified (the swarm before issue 12);
- `tls`: TLS pinned to identities, sessions untapped, nothing verified;
- `tls+verify`: the defaults: TLS, every session tapped and sealed, and the default
  fraction of generations verified (exactly that share: every n-th generation of
  each client, staggered, so the number of checks is not itself noise).

Figures: one client's 3-hop decode tokens/s (TLS against http: the aim is under
5% lost), the per-hop overhead that difference implies, and the aggregate
tokens/s of several concurrent clients (the defaults against http: verification's
aim is under 10% lost; its re-runs compete with decode for the same nodes).

Run: `python benchmarks/trust_cost.py [--rounds 3] [--new-tokens 32] [--clients 4]`.
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
from swarm.model import DEFAULT_MODEL  # noqa: E402
from swarm.routing import Route  # noqa: E402
from swarm.transport import Transport  # noqa: E402

SPANS = [(0, 10), (10, 20), (20, 30)] * 2
HOPS = 3
PROMPTS = ["Write a long story about a dragon who learns to cook.", "Explain how tides work.", "List ten uses of a brick.", "Describe a city at night."]
DEFAULT_FRACTION = ClientConfig().verify_fraction


def clients(url: str, arm: str, count: int, wire: str) -> list[SwarmModel]:
    tap = arm == "tls+verify"
    config = ClientConfig(wire_dtype=wire, session=replace(SessionConfig(), tap=tap), verify_fraction=0.0)
    return [SwarmModel(DEFAULT_MODEL, bootstrap=[url], config=config, insecure_http=arm == "http") for _ in range(count)]


async def generate(model: SwarmModel, route: Route, ids: list[int], params: SamplingParams, verify: bool) -> tuple[int, float]:
    """One greedy generation along `route`: (new tokens, decode tokens/s)."""
    stats = None
    async for _, stats, _ in model.stream_result(ids, params, route, verify=verify):
        pass
    return stats.new_tokens, stats.decode_tokens_per_s


async def aggregate(models: list[SwarmModel], routes: list[Route], prompts: list[list[int]], params: SamplingParams, generations: int, every: int) -> float:
    """Every client runs `generations` back to back (checking every `every`-th, 0: none); tokens/s of all together."""

    async def one(i: int) -> int:
        tokens = 0
        for g in range(generations):
            new, _ = await generate(models[i], routes[i], prompts[i], params, every > 0 and (g + i) % every == 0)
            tokens += new
        return tokens

    began = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(len(models))))
    return sum(tokens) / (time.perf_counter() - began)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per generation (default 32)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the aggregate figure (default 4)")
    parser.add_argument("--generations", type=int, default=4, help="generations per client per arm and round, aggregate (default 4)")
    parser.add_argument("--wire-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    args = parser.parse_args()
    every = round(1 / DEFAULT_FRACTION) if DEFAULT_FRACTION else 0
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False, speculate=False)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    arms = ("http", "tls", "tls+verify")
    single: dict[str, list[float]] = {arm: [] for arm in arms}
    total: dict[str, list[float]] = {arm: [] for arm in arms}
    async with (
        LocalSwarm(DEFAULT_MODEL, SPANS, progress=say, transport=Transport(insecure_http=True)) as plain,
        LocalSwarm(DEFAULT_MODEL, SPANS, progress=say) as tls,
    ):
        urls = {"http": plain.bootstrap_url, "tls": tls.bootstrap_url, "tls+verify": tls.bootstrap_url}
        models = {arm: clients(urls[arm], arm, args.clients, args.wire_dtype) for arm in arms}
        prompts = [models["http"][0].head.encode_prompt(PROMPTS[i % len(PROMPTS)], chat=True) for i in range(args.clients)]
        # Client i takes route i of its swarm in every arm (spread over both chains alike), so that
        # where the planner happens to put clients is not part of the comparison.
        routes: dict[str, list[Route]] = {}
        for arm in ("http", "tls"):
            first = models[arm][0]
            async with first.config.transport.client_session() as http:
                await first.refresh(http, force=True)
            routes[arm] = first.planner.plan_routes(args.clients)
            say(f"{arm} routes: " + "; ".join(map(str, routes[arm])))
        routes["tls+verify"] = routes["tls"]
        for arm in arms:  # every client's view of the swarm, connections, the nodes' first steps and allocator
            await aggregate(models[arm], routes[arm], prompts, params, 1, 0)
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else reversed(arms):
                # one client alone: decode speed through 3 hops (a checked generation's re-run comes after its text)
                _, tps = await generate(models[arm][0], routes[arm][0], prompts[0], params, verify=False)
                single[arm].append(tps)
                total[arm].append(await aggregate(models[arm], routes[arm], prompts, params, args.generations, every if arm == "tls+verify" else 0))
                say(f"round {round_} {arm}: one client {tps:.1f} tok/s, {args.clients} clients {total[arm][-1]:.1f} tok/s")
    p = {"spans": "0:10,10:20,20:30 x2", "hops": HOPS, "new_tokens": args.new_tokens, "wire": args.wire_dtype, "rounds": args.rounds}
    best = {arm: max(v) for arm, v in single.items()}
    for arm in arms:
        emit("trust_decode_tokens_per_s", best[arm], "tokens/s", {**p, "arm": arm})
        emit("trust_aggregate_tokens_per_s", statistics.median(total[arm]), "tokens/s", {**p, "arm": arm, "clients": args.clients})
    tls_ratio = best["tls"] / best["http"]
    per_hop_ms = (1 / best["tls"] - 1 / best["http"]) * 1e3 / HOPS
    emit("tls_decode_vs_http", tls_ratio, "ratio", p, human=f"TLS decode {best['tls']:.1f} vs http {best['http']:.1f} tok/s = {tls_ratio:.3f}x ({per_hop_ms:+.3f} ms per hop)")
    emit("tls_hop_overhead_ms", per_hop_ms, "ms", p)
    # paired by round: each round's defaults against that round's plain http
    paired = statistics.median(v / h for v, h in zip(total["tls+verify"], total["http"]))
    emit(
        "defaults_aggregate_vs_http", paired, "ratio", {**p, "clients": args.clients, "verify_fraction": DEFAULT_FRACTION},
        human=f"TLS + tapped + verifying {DEFAULT_FRACTION:.0%} of generations: {paired:.3f}x the aggregate tokens/s of plain http without verification",
    )  # fmt: skip
    alone = statistics.median(v / t for v, t in zip(total["tls+verify"], total["tls"]))
    emit("verify_aggregate_vs_tls", alone, "ratio", {**p, "clients": args.clients, "verify_fraction": DEFAULT_FRACTION},
         human=f"verification alone (over TLS): {alone:.3f}x aggregate tokens/s")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
