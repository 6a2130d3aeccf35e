"""Start a local swarm of real `swarm-node` processes: what `swarm demo` runs.

A bootstrap peer that holds no blocks plus one node per span, each a separate
process with its own identity, all on loopback. `LocalSwarm` is an async context
manager: it waits for every node's ready line and stops them all with SIGTERM
(then SIGKILL after a grace period) on the way out, also after errors.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from swarm.errors import SwarmError
from swarm.transport import Transport

_READY = re.compile(r"^ready peer=(\S+) url=(\S+) ")


@dataclass
class LaunchedNode:
    process: asyncio.subprocess.Process
    name: str
    peer_id: str = ""
    url: str = ""
    output: list[str] = field(default_factory=list)


class LocalSwarm:
    def __init__(
        self,
        model: str,
        spans: list[tuple[int, int]],
        extra_args: list[str] | None = None,
        progress: Callable[[str], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.model = model
        self.transport = transport or Transport()  # the nodes serve TLS unless it is insecure_http
        self.spans = spans
        self.extra_args = extra_args or []
        self.progress = progress or (lambda message: None)
        self.nodes: list[LaunchedNode] = []
        self._drains: set[asyncio.Task] = set()  # keep reading each node's output so its pipe never fills
        self._tmp = tempfile.TemporaryDirectory(prefix="layerswarm-demo-")

    @property
    def bootstrap_url(self) -> str:
        return self.nodes[0].url

    async def __aenter__(self) -> LocalSwarm:
        try:
            (bootstrap,) = await self._start([("bootstrap", ["--no-model"])])
            # The nodes share this machine's cores: a share each, not every core each. Measured on 2
            # cores (benchmarks/api_load.py --threads 1): one client as fast, 16 clients 2.5x the
            # tokens/s, the nodes' CPU per token 17 -> 5 ms; intra-op threads only wait on each other.
            threads = ["--threads", str(max(1, (os.cpu_count() or 1) // len(self.spans)))]
            specs = [(f"node[{s}:{e})", ["--model", self.model, "--blocks", f"{s}:{e}", "--bootstrap", bootstrap.url, *threads]) for s, e in self.spans]
            await self._start(specs)
            await self._wait_discovered()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _start(self, specs: list[tuple[str, list[str]]], timeout: float = 300.0) -> list[LaunchedNode]:
        started = []
        for name, args in specs:
            key = Path(self._tmp.name) / f"{len(self.nodes)}.key"
            insecure = ["--insecure-http"] if self.transport.insecure_http else []
            argv = [sys.executable, "-m", "node.cli", "--identity", str(key), "--gossip-period", "1", *insecure, *self.extra_args, *args]
            process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            node = LaunchedNode(process, name)
            self.nodes.append(node)
            started.append(node)
        self.progress(f"starting {', '.join(n.name for n in started)} ...")
        await asyncio.wait_for(asyncio.gather(*(self._ready(n) for n in started)), timeout)
        return started

    async def _wait_discovered(self, timeout: float = 60.0) -> None:
        """Until the bootstrap peer's table lists every node (they announce themselves on start)."""
        from swarm.discovery.peers_http import fetch_peers

        expected = {n.peer_id for n in self.nodes}
        async with self.transport.client_session() as http:
            deadline = asyncio.get_running_loop().time() + timeout
            while {r.peer_id for r in await fetch_peers(http, self.bootstrap_url, 5.0)} < expected:
                if asyncio.get_running_loop().time() > deadline:
                    raise SwarmError("the nodes did not reach the bootstrap peer's table in time")
                await asyncio.sleep(0.1)  # another process's table: nothing to await but its answer
        self.progress("every node is in the bootstrap peer's table")

    async def _ready(self, node: LaunchedNode) -> None:
        assert node.process.stdout is not None
        while True:
            line = (await node.process.stdout.readline()).decode(errors="replace")
            if not line:
                raise SwarmError(f"{node.name} exited before it was ready:\n{''.join(node.output[-20:])}")
            node.output.append(line)
            match = _READY.match(line)
            if match:
                node.peer_id, node.url = match.groups()
                self.progress(f"{node.name} ready at {node.url}")
                drain = asyncio.create_task(self._drain(node))
                self._drains.add(drain)
                drain.add_done_callback(self._drains.discard)
                return

    @staticmethod
    async def _drain(node: LaunchedNode) -> None:
        assert node.process.stdout is not None
        while line := await node.process.stdout.readline():
            node.output = node.output[-200:] + [line.decode(errors="replace")]

    async def stop(self, grace: float = 30.0) -> None:
        for node in self.nodes:
            if node.process.returncode is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                await asyncio.wait_for(node.process.wait(), grace)
            except asyncio.TimeoutError:
                node.process.kill()
                await node.process.wait()
        for drain in list(self._drains):
            drain.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self.nodes.clear()
        self._tmp.cleanup()
