"""Soak: clients generating continuously while nodes are killed and restarted.

A bootstrap peer and five nodes (every block served at least twice: [0,15) x2,
[15,30) x2, [0,30)), N clients each generating short greedy replies in a loop
for the whole run, and `kills` times the busiest node (most sessions now) is SIGKILLed and
started again with the same identity. The run is driven by events, not by the
clock: a kill comes once `kill_every` seconds have passed since the previous
one *and* the clients completed `settle` requests since the previous node came
back; after the last kill the run ends once `settle` more requests completed.
So every kill is followed by service on a busy machine as on a quiet one, and
`max_seconds` is only a bound for a swarm that stopped answering. Used at full
length by `benchmarks/soak.py` and shortened by `tests/test_soak.py`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp
import psutil

from client.swarm import ClientConfig, SwarmModel
from swarm.model import DEFAULT_MODEL
from tests.nodes import NodeProcess, reserve_url, start_nodes, stop_nodes, until_routed

SPANS = ["0:15", "0:15", "15:30", "15:30", "0:30"]
PERIOD = ["--gossip-period", "0.5", "--record-ttl", "5"]
SAMPLE_EVERY_S = 5.0


@dataclass
class SoakReport:
    done: int = 0
    failed: list[str] = field(default_factory=list)  # "ErrorType: message" per failed request
    failovers: collections.Counter = field(default_factory=collections.Counter)  # how ("splice", "reroute") -> count
    kills: int = 0
    timed_out: bool = False  # max_seconds passed before every kill was made and followed by requests
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per request
    growth: dict[str, int] = field(default_factory=dict)  # peer -> resident bytes gained since its (re)start
    samples: dict[str, list[int]] = field(default_factory=dict)  # node process -> resident bytes every SAMPLE_EVERY_S

    @property
    def halves(self) -> list[tuple[int, int]]:
        """Per node process with enough samples: growth in the first and in the second half of its life."""
        return [(s[len(s) // 2] - s[0], s[-1] - s[len(s) // 2]) for s in self.samples.values() if len(s) >= 4]


async def _busiest(nodes: list[NodeProcess]) -> int:
    """The index of the node holding the most sessions now (then: opened the most), so a kill always
    lands on live traffic: clients route by measured speed and may all avoid some nodes."""
    async def load(node: NodeProcess) -> tuple[int, int]:
        try:
            async with http.get(f"{node.url}/info", timeout=aiohttp.ClientTimeout(total=5)) as response:
                info = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return (-1, -1)
        return (info.get("sessions", 0), info.get("sessions_opened", 0))

    async with aiohttp.ClientSession() as http:
        loads = await asyncio.gather(*(load(node) for node in nodes))
    return max(range(len(nodes)), key=lambda index: loads[index])


def _rss(node: NodeProcess) -> int:
    try:
        return psutil.Process(node.proc.pid).memory_info().rss
    except psutil.Error:
        return 0


async def soak(
    tmp: Path,
    kills: int,
    clients: int,
    new_tokens: int,
    *,
    kill_every: float = 0.0,
    settle: int | None = None,
    max_seconds: float = 600.0,
    say: Callable[[str], None] = print,
) -> SoakReport:
    """`kills` kill-and-restart rounds under `clients` looping clients (see the module docstring).

    `settle` (default: `clients`) requests must complete after each restart before the next kill.
    """
    settle = clients if settle is None else settle
    say("starting a bootstrap peer and five nodes ...")
    # all at once: the bootstrap peer's port is reserved, so the nodes need not wait for it (`reserve_url`)
    port, url = reserve_url()
    identity = ["--identity", str(tmp / "b" / f"node0-{os.getpid()}.key")]
    *nodes, bootstrap = start_nodes([*(["--blocks", s, "--bootstrap", url, *PERIOD] for s in SPANS), ["--no-model", *port, *identity, *PERIOD]], tmp)
    keys = [tmp / f"node{i}-{os.getpid()}.key" for i in range(len(SPANS))]  # the identities start_nodes gave them
    rss_start = {n.peer_id: _rss(n) for n in nodes}
    model = SwarmModel(DEFAULT_MODEL, insecure_http=True, bootstrap=[bootstrap.url], config=ClientConfig(wire_dtype="bfloat16", refresh_s=1.0))
    report = SoakReport()
    stop = asyncio.Event()
    progress = asyncio.Condition()  # notified whenever a request completes
    began_at = time.monotonic()
    restarts: list[asyncio.Future] = []

    async def client(index: int) -> None:
        prompts = [f"Count from {index} to {index + 5}.", "Name a fruit.", "What is the capital of France?"]
        turn = 0
        while not stop.is_set():
            began = time.monotonic()
            try:
                result = await model.agenerate(prompts[turn % len(prompts)], max_new_tokens=new_tokens)
            except Exception as exc:  # noqa: BLE001 - every failure is what the soak counts
                report.failed.append(f"{type(exc).__name__}: {exc}")
            else:
                report.done += 1
                report.failovers.update(f.how for f in result.stats.failovers)
                report.latencies.append(time.monotonic() - began)
            async with progress:
                progress.notify_all()
            turn += 1

    async def served(count: int) -> None:
        """Until `count` more requests (done or failed) have completed."""
        target = report.done + len(report.failed) + count
        async with progress:
            await progress.wait_for(lambda: report.done + len(report.failed) >= target)

    async def sample() -> None:
        while not stop.is_set():
            for node in nodes:
                if rss := _rss(node) if node.proc.poll() is None else 0:  # a killed process has no memory to show
                    report.samples.setdefault(f"{node.peer_id}:{node.proc.pid}", []).append(rss)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)

    async def chaos() -> None:
        await served(settle)  # every client is up and answering
        last_kill = time.monotonic()
        for _ in range(kills):
            await asyncio.sleep(max(0.0, last_kill + kill_every - time.monotonic()))
            index = await _busiest(nodes)
            victim = nodes[index]
            say(f"killing {victim.blocks} node {victim.peer_id[:8]} and starting it again")
            last_kill = time.monotonic()
            victim.kill()
            restart = asyncio.ensure_future(asyncio.to_thread(
                start_nodes, [["--blocks", SPANS[index], "--bootstrap", bootstrap.url, *PERIOD, "--identity", str(keys[index])]], tmp / f"restart{report.kills}"
            ))
            restarts.append(restart)  # a thread cannot be cancelled: if the run times out now, its node is stopped at the end
            (back,) = await asyncio.shield(restart)
            nodes[index] = back
            rss_start[back.peer_id] = _rss(back)  # a restarted node is measured from its new start
            report.kills += 1
            await served(settle)

    async def run() -> None:
        workers = [asyncio.create_task(client(i)) for i in range(clients)] + [asyncio.create_task(sample())]
        try:
            await asyncio.wait_for(chaos(), max_seconds)
        except asyncio.TimeoutError:
            report.timed_out = True
        finally:
            stop.set()
            await asyncio.gather(*workers)

    try:
        await until_routed(model)  # the nodes reach the bootstrap peer a gossip round after their ready line
        await run()
        report.seconds = time.monotonic() - began_at
        report.growth = {n.peer_id: _rss(n) - rss_start[n.peer_id] for n in nodes if n.peer_id in rss_start}
    finally:
        started = await asyncio.gather(*restarts, return_exceptions=True)
        strays = [n for found in started if isinstance(found, list) for n in found if n not in nodes]
        stop_nodes([bootstrap, *nodes, *strays])
    return report
