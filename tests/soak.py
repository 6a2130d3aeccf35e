"""Soak: clients generating continuously while nodes are killed and restarted.

A bootstrap peer and five nodes (every block served at least twice: [0,15) x2,
[15,30) x2, [0,30)), N clients each generating short greedy replies in a loop
for the whole run, and every `kill_every` seconds one node (in turn) is
SIGKILLed and started again with the same identity. Used at full length by
`benchmarks/soak.py` and shortened by `tests/test_soak.py`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from client.swarm import ClientConfig, SwarmModel
from swarm.model import DEFAULT_MODEL
from tests.nodes import NodeProcess, start_nodes, stop_nodes

SPANS = ["0:15", "0:15", "15:30", "15:30", "0:30"]
KILL_ORDER = [4, 0, 2, 1, 3]  # the whole-model node first: one hop, so every client's cheapest route
PERIOD = ["--gossip-period", "0.5", "--record-ttl", "5"]
SAMPLE_EVERY_S = 5.0


@dataclass
class SoakReport:
    done: int = 0
    failed: list[str] = field(default_factory=list)  # "ErrorType: message" per failed request
    failovers: collections.Counter = field(default_factory=collections.Counter)  # how ("splice", "reroute") -> count
    kills: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per request
    growth: dict[str, int] = field(default_factory=dict)  # peer -> resident bytes gained since its (re)start
    samples: dict[str, list[int]] = field(default_factory=dict)  # node process -> resident bytes every SAMPLE_EVERY_S

    @property
    def halves(self) -> list[tuple[int, int]]:
        """Per node process with enough samples: growth in the first and in the second half of its life."""
        return [(s[len(s) // 2] - s[0], s[-1] - s[len(s) // 2]) for s in self.samples.values() if len(s) >= 4]


def _rss(node: NodeProcess) -> int:
    try:
        return psutil.Process(node.proc.pid).memory_info().rss
    except psutil.Error:
        return 0


async def soak(tmp: Path, seconds: float, clients: int, kill_every: float, new_tokens: int, say: Callable[[str], None] = print) -> SoakReport:
    say("starting a bootstrap peer and five nodes ...")
    (bootstrap,) = start_nodes([["--no-model", *PERIOD]], tmp / "b")
    nodes = start_nodes([["--blocks", s, "--bootstrap", bootstrap.url, *PERIOD] for s in SPANS], tmp)
    keys = [tmp / f"node{i}-{os.getpid()}.key" for i in range(len(SPANS))]  # the identities start_nodes gave them
    rss_start = {n.peer_id: _rss(n) for n in nodes}
    model = SwarmModel(DEFAULT_MODEL, bootstrap=[bootstrap.url], config=ClientConfig(wire_dtype="bfloat16", refresh_s=1.0))
    report = SoakReport()
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        prompts = [f"Count from {index} to {index + 5}.", "Name a fruit.", "What is the capital of France?"]
        turn = 0
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                result = await model.agenerate(prompts[turn % len(prompts)], max_new_tokens=new_tokens)
            except Exception as exc:  # noqa: BLE001 - every failure is what the soak counts
                report.failed.append(f"{type(exc).__name__}: {exc}")
            else:
                report.done += 1
                report.failovers.update(f.how for f in result.stats.failovers)
                report.latencies.append(time.monotonic() - began)
            turn += 1

    async def sample() -> None:
        while time.monotonic() < deadline:
            for node in nodes:
                if rss := _rss(node) if node.proc.poll() is None else 0:  # a killed process has no memory to show
                    report.samples.setdefault(f"{node.peer_id}:{node.proc.pid}", []).append(rss)
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def chaos() -> None:
        while time.monotonic() + kill_every < deadline:
            await asyncio.sleep(kill_every)
            index = KILL_ORDER[report.kills % len(KILL_ORDER)]
            victim = nodes[index]
            say(f"killing {victim.blocks} node {victim.peer_id[:8]} and starting it again")
            victim.kill()
            (back,) = await asyncio.to_thread(
                start_nodes, [["--blocks", SPANS[index], "--bootstrap", bootstrap.url, *PERIOD, "--identity", str(keys[index])]], tmp / f"restart{report.kills}"
            )
            nodes[index] = back
            rss_start[back.peer_id] = _rss(back)  # a restarted node is measured from its new start
            report.kills += 1

    try:
        await asyncio.gather(chaos(), sample(), *(client(i) for i in range(clients)))
        report.growth = {n.peer_id: _rss(n) - rss_start[n.peer_id] for n in nodes if n.peer_id in rss_start}
    finally:
        stop_nodes([bootstrap, *nodes])
    return report
