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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from client.session import RemoteHop, RouteSession, SessionConfig  # noqa: E402
from swarm.model import open_checkpoint  # noqa: E402
from swarm.transport import Transport  # noqa: E402
from tests.nodes import start_swarm, stop_nodes, until_routed  # noqa: E402

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


async def generation(model: str, bootstrap: str, device: str, tokens: int, profile: bool) -> float:
    """Tokens/s of one greedy generation by the real client (head on `device`) over `nodes`;
    with `profile`, the client's Python profile (top functions by own time) on stderr."""
    import cProfile
    import pstats

    from client.generate import GenerationStats
    from client.sampling import SamplingParams
    from client.swarm import ClientConfig, SwarmModel

    client = SwarmModel(model, bootstrap=[bootstrap], config=ClientConfig(verify_fraction=0.0), insecure_http=True, device=device)
    params = SamplingParams(max_new_tokens=tokens, stop_at_eos=False, speculate=False)
    await until_routed(client)
    waited = [0.0, 0]  # seconds inside RouteSession.forward (the route's round trips), calls

    async def timed(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return await forward(self, *args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - begin
            waited[1] += 1

    forward, RouteSession.forward = RouteSession.forward, timed  # this process only: a diagnostic
    for attempt in range(2):  # the first warms the nodes' graphs
        waited[:] = [0.0, 0]
        stats = GenerationStats()
        profiler = cProfile.Profile() if profile and attempt else None
        if profiler:
            profiler.enable()
        async for _ in client.stream_generation([1, 2, 3, 4], params, stats, verify=False):
            pass
        if profiler:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    RouteSession.forward = forward
    per_token = stats.decode_s / max(1, stats.new_tokens - 1)
    print(f"  per token {per_token * 1e3:.2f} ms, of which in the route's round trips {waited[0] / waited[1] * 1e3:.2f} ms", file=sys.stderr)
    return stats.decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="profile the client's Python during a generation over 2 nodes")
    args = parser.parse_args()
    with open_checkpoint(args.model) as ck:
        digest, layers, hidden = ck.fingerprint().digest, ck.config.num_layers, ck.config.hidden_size
    common = ["--model", args.model, "--device", args.device, "--max-length", "512", "--kv-memory", "4GiB", "--max-sessions", "4", "--metrics-port", "0"]
    tmp = Path(tempfile.mkdtemp())
    for split in ([(0, layers)], [(0, layers // 2), (layers // 2, layers)]):
        bootstrap, nodes = start_swarm(tmp, [f"{a}:{b}" for a, b in split], extra=common)
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
            rate = asyncio.run(generation(args.model, bootstrap.url, args.device, 128, args.profile and len(hops) == 2))
            emit("gpu_hops.client_generation", rate, "tokens/s", {"nodes": len(hops)}, args.device,
                 f"{len(hops)} node(s): the real client generates {rate:.1f} tokens/s (round trip alone: {1 / rtt:.1f} steps/s)")  # fmt: skip
        finally:
            stop_nodes([bootstrap, *nodes])


if __name__ == "__main__":
    main()
