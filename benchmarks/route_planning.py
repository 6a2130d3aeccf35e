"""How long route planning takes on a large peer table, in plain CPython.

The client plans a route per session and again on every failover, so planning must
stay far below one token step (target: under 10 ms for 1000 peers). Tables are
random: each peer holds a random span of 1..L/2 blocks with random speed, load and
RTT, plus a few full-coverage peers so a route always exists.

Prints one JSON object per result to stdout; a human line per result to stderr.
Run: `python benchmarks/route_planning.py [--peers 1000] [--repeats 200]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_sha  # noqa: E402
from swarm.routing import Candidate, plan_route  # noqa: E402

MODEL = "sha256:bench"


def random_table(rng: random.Random, num_peers: int, num_layers: int, max_span: int) -> list[Candidate]:
    table = []
    for i in range(num_peers):
        start = rng.randrange(num_layers)
        end = start + rng.randint(1, min(max_span, num_layers - start))
        table.append(
            Candidate(
                peer_id=f"peer{i:05d}",
                start=start,
                end=end,
                per_block_s=1.0 / rng.uniform(50.0, 1000.0),  # 50..1000 blocks/s
                load=rng.random(),
                rtt_s=rng.uniform(0.001, 0.150),
                model=MODEL,
            )
        )
    for b in range(0, num_layers, max_span):
        table.append(Candidate(f"cover{b:03d}", b, min(b + max_span, num_layers), 0.05, 0.0, 0.2, MODEL))
    return table


def time_plan(table: list[Candidate], num_layers: int, repeats: int) -> list[float]:
    plan_route(table, num_layers, MODEL)  # warm up
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        plan_route(table, num_layers, MODEL)
        times.append(time.perf_counter() - begin)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sha = git_sha()
    for num_layers in (80, 30):
        max_span = num_layers // 2
        table = random_table(random.Random(args.seed), args.peers, num_layers, max_span)
        times = time_plan(table, num_layers, args.repeats)
        median_ms = statistics.median(times) * 1e3
        p90_ms = statistics.quantiles(times, n=10)[-1] * 1e3
        route = plan_route(table, num_layers, MODEL)
        result = {
            "name": "route_planning.plan_route_median",
            "params": {
                "peers": len(table),
                "num_layers": num_layers,
                "max_span": max_span,
                "blocks_held": sum(c.end - c.start for c in table),
                "repeats": args.repeats,
                "seed": args.seed,
                "python": sys.version.split()[0],
            },
            "value": round(median_ms, 4),
            "unit": "ms",
            "git_sha": sha,
            "device": "cpu",
        }
        print(json.dumps(result), flush=True)
        print(
            f"plan_route: {len(table)} peers, {num_layers} blocks: median {median_ms:.2f} ms, "
            f"p90 {p90_ms:.2f} ms, min {min(times) * 1e3:.2f} ms; {len(route.hops)} hops, "
            f"cost {route.cost * 1e3:.1f} ms/token",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
