"""Where a GPU pipeline's step time goes: round trip, each hop's compute, and the rest, per hop.

Real `swarm-node` processes on one device hold a checkpoint's blocks (one node with
all of them, then two with half each); a `RouteSession` steps one token at a time
(no head, no sampling) and each hop's ack says how long its compute took. The
difference is protocol: frames, the event loop, the hand-off to the compute thread,
and (with the tap on) the copy each hop sends the client. Also reported: the node's
own view from /metrics (queue wait, step latency, batch compute).

Run: `python benchmarks/gpu_hops.py --model DIR [--device cuda] [--steps 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from client.session import RemoteHop, RouteSession, SessionConfig  # noqa: E402
from swarm.model import open_checkpoint  # noqa: E402
from swarm.transport import Transport  # noqa: E402
from tests.nodes import start_nodes, stop_nodes  # noqa: E402

TRANSPORT = Transport(insecure_http=True)


async def steps(hops: list[RemoteHop], digest: str, hidden: int, count: int, tap: bool) -> tuple[float, list[float]]:
    """(median round trip, median compute of each hop), seconds."""
    x = torch.randn(1, hidden)
    rtts, computes = [], []
    config = SessionConfig(wire_dtype="bfloat16", tap=tap)
    async with TRANSPORT.client_session() as http, RouteSession(http, hops, digest, count + 32, config, TRANSPORT) as session:
        for position in range(count + 20):
            begin = time.perf_counter()
            await session.forward(x, position)
            if position >= 20:
                rtts.append(time.perf_counter() - begin)
                computes.append([ms / 1e3 for ms in session.compute_ms])
    return statistics.median(rtts), [statistics.median(c[i] for c in computes) for i in range(len(hops))]


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        return await response.text() if response.status == 200 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with open_checkpoint(args.model) as ck:
        digest, layers, hidden = ck.fingerprint().digest, ck.config.num_layers, ck.config.hidden_size
    common = ["--model", args.model, "--device", args.device, "--max-length", "512", "--kv-memory", "4GiB", "--max-sessions", "4", "--metrics-port", "0"]
    tmp = Path(tempfile.mkdtemp())
    for split in ([(0, layers)], [(0, layers // 2), (layers // 2, layers)]):
        nodes = start_nodes([[*common, "--blocks", f"{a}:{b}"] for a, b in split], tmp, timeout=600)
        try:
            hops = [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]
            for tap in (True, False):
                rtt, compute = asyncio.run(steps(hops, digest, hidden, args.steps, tap))
                overhead = (rtt - sum(compute)) / len(hops)
                params = {"nodes": len(hops), "tap": tap, "layers": layers}
                emit("gpu_hops.round_trip", rtt * 1e3, "ms", params, args.device,
                     f"{len(hops)} node(s), tap {'on' if tap else 'off'}: round trip {rtt * 1e3:.2f} ms, compute "
                     f"{' + '.join(f'{c * 1e3:.2f}' for c in compute)} ms, overhead {overhead * 1e3:.2f} ms a hop")  # fmt: skip
                emit("gpu_hops.overhead_per_hop", overhead * 1e3, "ms", params, args.device)
        finally:
            stop_nodes(nodes)


if __name__ == "__main__":
    main()
