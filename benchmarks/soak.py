"""Soak: clients generating continuously while nodes are killed and restarted.

A bootstrap peer and five nodes (every block served at least twice: [0,15) x2,
[15,30) x2, [0,30)), N clients each generating short greedy replies in a loop
for the whole run, and every `--kill-every` seconds one node (in turn) is
SIGKILLed and started again with the same identity. Reports requests done,
requests failed (the aim is none), failovers, and each node's resident memory
at its start and at the end of the run (it must not grow without bound).

Run: `python benchmarks/soak.py [--seconds 120] [--clients 8] [--kill-every 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from client.swarm import ClientConfig, SwarmModel  # noqa: E402
from swarm.model import DEFAULT_MODEL  # noqa: E402
from tests.nodes import start_nodes, stop_nodes  # noqa: E402

SPANS = ["0:15", "0:15", "15:30", "15:30", "0:30"]
KILL_ORDER = [4, 0, 2, 1, 3]  # the whole-model node first: one hop, so every client's cheapest route
PERIOD = ["--gossip-period", "0.5", "--record-ttl", "5"]


def _rss(node) -> int:
    try:
        return psutil.Process(node.proc.pid).memory_info().rss
    except psutil.Error:
        return 0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    say("starting a bootstrap peer and five nodes ...")
    (bootstrap,) = start_nodes([["--no-model", *PERIOD]], tmp / "b")
    nodes = start_nodes([["--blocks", s, "--bootstrap", bootstrap.url, *PERIOD] for s in SPANS], tmp)
    keys = [tmp / f"node{i}-{os.getpid()}.key" for i in range(len(SPANS))]  # the identities start_nodes gave them
    rss_start = {n.peer_id: _rss(n) for n in nodes}
    model = SwarmModel(DEFAULT_MODEL, bootstrap=[bootstrap.url], config=ClientConfig(wire_dtype="bfloat16", refresh_s=1.0))
    params = dict(max_new_tokens=args.new_tokens)
    done, failed, failovers, latencies = 0, [], 0, []
    deadline = time.monotonic() + args.seconds

    async def client(index: int) -> None:
        nonlocal done, failovers
        prompts = [f"Count from {index} to {index + 5}.", "Name a fruit.", "What is the capital of France?"]
        turn = 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                result = await model.agenerate(prompts[turn % len(prompts)], **params)
            except Exception as exc:  # noqa: BLE001 - every failure is what this benchmark counts
                failed.append(f"{type(exc).__name__}: {exc}")
            else:
                done += 1
                failovers += len(result.stats.failovers)
                latencies.append(time.monotonic() - began)
            turn += 1

    samples: dict[str, list[int]] = {}  # peer id -> resident bytes every 5 s (a restart starts a new list)

    async def sample() -> None:
        while time.monotonic() < deadline:
            for node in nodes:
                if rss := _rss(node) if node.proc.poll() is None else 0:  # a killed process has no memory to show
                    samples.setdefault(node.peer_id + str(node.proc.pid), []).append(rss)
            await asyncio.sleep(5)

    async def chaos() -> int:
        kills = 0
        while time.monotonic() + args.kill_every < deadline:
            await asyncio.sleep(args.kill_every)
            index = KILL_ORDER[kills % len(KILL_ORDER)]
            victim = nodes[index]
            say(f"killing {victim.blocks} node {victim.peer_id[:8]} and starting it again")
            victim.kill()
            (back,) = await asyncio.to_thread(
                start_nodes, [["--blocks", SPANS[index], "--bootstrap", bootstrap.url, *PERIOD, "--identity", str(keys[index])]], tmp / f"restart{kills}"
            )
            nodes[index] = back
            rss_start[back.peer_id] = _rss(back)  # a restarted node is measured from its new start
            kills += 1
        return kills

    try:
        results = await asyncio.gather(chaos(), sample(), *(client(i) for i in range(args.clients)))
        kills = results[0]
        growth = {peer: _rss(n) - rss_start[peer] for n in nodes for peer in [n.peer_id] if peer in rss_start}
        p = {"seconds": args.seconds, "clients": args.clients, "kill_every_s": args.kill_every, "nodes": len(nodes)}
        emit("soak_requests_done", done, "requests", p)
        emit("soak_requests_failed", len(failed), "requests", p, human=f"{done} requests, {len(failed)} failed, {failovers} failovers, {kills} kills")
        emit("soak_failovers", failovers, "failovers", p)
        if latencies:
            emit("soak_request_latency_median", statistics.median(latencies), "s", p)
        emit(
            "soak_node_rss_growth_max",
            max(growth.values(), default=0) / 2**20,
            "MiB",
            p,
            human=f"resident memory growth of each node since its (re)start: {', '.join(f'{v / 2**20:+.0f} MiB' for v in growth.values())}",
        )
        # memory over time: growth in each process's second half against its first half shows a plateau
        halves = [(s[len(s) // 2] - s[0], s[-1] - s[len(s) // 2]) for s in samples.values() if len(s) >= 4]
        if halves:
            emit(
                "soak_node_rss_growth_second_half_max",
                max(second for _, second in halves) / 2**20,
                "MiB",
                p,
                human="resident memory per node process, first half / second half of its life: "
                + ", ".join(f"{a / 2**20:+.0f}/{b / 2**20:+.0f} MiB" for a, b in halves),
            )
        for reason in failed[:5]:
            say(f"failed: {reason}")
    finally:
        stop_nodes([bootstrap, *nodes])


if __name__ == "__main__":
    asyncio.run(main())
