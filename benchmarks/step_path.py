"""CPU cost of the step path alone: two nodes and a client on one event loop, one process.

Across processes (hop_overhead.py) the figures of a 2-core box swing by 20% from run
to run, more than the protocol's own cost. Here the nodes (blocks [0, 1) and [1, 2)
of the default model, compute in a worker thread) and a client share one loop, so a
one-token 2-hop step measures frames, checks, batching and pushes with little noise.
`defence_cost.py` runs it in a tree before a change and in this one.

Run: `python benchmarks/step_path.py [--steps 4000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the tree to measure is the working directory (see defence_cost.py)

import aiohttp  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from client.session import RemoteHop, RouteSession, SessionConfig  # noqa: E402
from node.server import serve  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.model import DEFAULT_MODEL, load_span, open_checkpoint  # noqa: E402

try:
    from node.state import NodeConfig  # noqa: E402
except ImportError:  # trees before node/server.py was split
    from node.server import NodeConfig  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args()
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        fingerprint = checkpoint.fingerprint()
        spans = [load_span(checkpoint, 0, 1), load_span(checkpoint, 1, 2)]
    states, stops, servers = [], [], []
    for span in spans:
        ready, stop = asyncio.Event(), asyncio.Event()
        stops.append(stop)
        servers.append(asyncio.ensure_future(serve(span, fingerprint, Identity.generate(), NodeConfig(), ready=lambda s, r=ready: (states.append(s), r.set()), stop=stop)))
        await ready.wait()
    hops = [RemoteHop(s.url, s.span.start, s.span.end, s.identity.peer_id) for s in states]
    x = torch.randn(1, spans[0].config.hidden_size)
    async with aiohttp.ClientSession() as http:
        async with RouteSession(http, hops, fingerprint.digest, 4096, SessionConfig(wire_dtype="float32")) as session:
            for position in range(100):  # warm-up
                await session.forward(x, position)
            began = time.perf_counter()
            for step in range(args.steps):
                await session.forward(x, step % 4000)
            per_step = (time.perf_counter() - began) / args.steps
    for stop in stops:
        stop.set()
    await asyncio.gather(*servers)
    emit("step_path_two_hops_ms", per_step * 1e3, "ms", {"steps": args.steps, "hops": 2, "blocks_per_hop": 1}, human=f"2-hop one-token step, one process: {per_step * 1e3:.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
