"""Per-hop overhead of a one-token step, and aggregate throughput of concurrent sessions.

Overhead: one-token steps through real `swarm-node` processes on loopback; the
client's round-trip time minus the model time each hop reports is what the
protocol costs (frames, websocket, event loop, the hop to the compute thread).
A bare aiohttp websocket echo of the same frame, in the same run, is the floor.

Throughput: N sessions stepping one token at a time, concurrently, through one
node holding the whole model; continuous batching should make 8 sessions much
faster in aggregate than one.

`--tls` runs the nodes on TLS (certificates carrying their identity keys, every dial
pinned) instead of plain http; the bare websocket floor stays plain.

Run: `python benchmarks/hop_overhead.py [--steps 400] [--seconds 6] [--tls]`.
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
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from client.session import RemoteHop, RouteSession, SessionConfig  # noqa: E402
from swarm import wire  # noqa: E402
from swarm.transport import Transport  # noqa: E402
from tests.nodes import start_nodes, stop_nodes  # noqa: E402

TRANSPORT = Transport(insecure_http=True)  # --tls: Transport()


def _quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def bare_echo(steps: int) -> list[float]:
    """Round trips of a one-token frame through a bare aiohttp websocket that forwards it back."""

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.add_routes([web.get("/echo", echo)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    frame = wire.encode({"type": "step", "session": "s", "step": 0, "position": 0, "hidden": wire.pack_tensor(torch.randn(1, 576), "float32")})
    times = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/echo") as ws:
        for _ in range(steps + 20):
            begin = time.perf_counter()
            await ws.send_bytes(frame)
            await ws.receive()
            times.append(time.perf_counter() - begin)
    await runner.cleanup()
    return times[20:]


async def overhead(hops: list[RemoteHop], digest: str, steps: int, hidden: int) -> tuple[list[float], list[float]]:
    """Per step: (round trip minus the model time of every hop, divided by the hop count; model time per hop)."""
    x = torch.randn(1, hidden)
    compute = []
    per_hop = []
    async with TRANSPORT.client_session() as http:
        async with RouteSession(http, hops, digest, steps + 32, SessionConfig(wire_dtype="float32"), TRANSPORT) as session:
            for position in range(steps + 20):
                begin = time.perf_counter()
                await session.forward(x, position)
                elapsed = time.perf_counter() - begin
                if position >= 20:
                    per_hop.append((elapsed - sum(session.compute_ms) / 1e3) / len(hops))
                    compute.append(sum(session.compute_ms) / 1e3 / len(hops))
    return per_hop, compute


async def _counters(http: aiohttp.ClientSession, url: str, peer_id: str) -> tuple[int, int]:
    async with http.get(f"{url}/info", ssl=TRANSPORT.pin(peer_id)) as response:
        info = await response.json()
    return info["steps"], info["batches"]


async def aggregate(url: str, peer_id: str, digest: str, layers: int, hidden: int, sessions: int, seconds: float) -> tuple[float, float]:
    """(tokens/s summed over `sessions` concurrent one-token loops through one node, mean batch size)."""
    hop = [RemoteHop(url, 0, layers, peer_id)]
    counts = [0] * sessions
    stop = asyncio.Event()

    async def one(index: int, session: RouteSession) -> None:
        x = torch.randn(1, hidden)
        position = 0
        while not stop.is_set():
            await session.forward(x, position)
            position = (position + 1) % 512  # rewinding to 0 overwrites the cache: allowed, and keeps it short
            counts[index] += 1

    async with TRANSPORT.client_session() as http:
        opened = [RouteSession(http, hop, digest, 513, SessionConfig(wire_dtype="float32"), TRANSPORT) for _ in range(sessions)]
        for session in opened:
            await session.__aenter__()
        try:
            tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(opened)]
            await asyncio.sleep(1.0)  # warm up: every loop running
            start_counts, begin = sum(counts), time.perf_counter()
            steps0, batches0 = await _counters(http, url, peer_id)
            await asyncio.sleep(seconds)
            steps1, batches1 = await _counters(http, url, peer_id)
            done, elapsed = sum(counts) - start_counts, time.perf_counter() - begin
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            for session in opened:
                await session.close()
    return done / elapsed, (steps1 - steps0) / max(1, batches1 - batches0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model); 'random' builds a random TinyLlama-shaped one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tls", action="store_true", help="nodes serve TLS pinned to their identities (default: plain http)")
    args = parser.parse_args()
    global TRANSPORT
    TRANSPORT = Transport(insecure_http=not args.tls)
    from swarm.model import DEFAULT_MODEL, open_checkpoint

    tmp = Path(tempfile.mkdtemp())
    model = args.model or DEFAULT_MODEL
    if model == "random":
        from tests.random_checkpoint import build

        print("building a random checkpoint ...", file=sys.stderr)
        build(tmp / "random")
        model = str(tmp / "random")
    with open_checkpoint(model) as ck:
        digest, layers, hidden = ck.fingerprint().digest, ck.config.num_layers, ck.config.hidden_size
    print("starting nodes ...", file=sys.stderr)
    common = ["--model", model, "--device", args.device]
    nodes = start_nodes([common + ["--blocks", "0:1"], common + ["--blocks", "1:2"], common + ["--blocks", f"0:{layers}", "--max-sessions", "64"]], tmp, tls=args.tls)
    try:
        bare = bare_echo(args.steps)
        base_median, base_p99 = _quantiles(await bare)
        emit("bare_websocket_round_trip_median", base_median * 1e3, "ms", {"steps": args.steps})
        for count in (1, 2):
            hops = [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes[:count]]  # each hop proves this peer id at open
            per_hop, compute = await overhead(hops, digest, args.steps, hidden)
            median, p99 = _quantiles(per_hop)
            params = {"hops": count, "steps": args.steps, "wire": "float32", "model": model, "device": args.device, "transport": TRANSPORT.scheme}
            emit("one_block_step_compute_median", statistics.median(compute) * 1e3, "ms", params, device=args.device)
            emit("hop_overhead_median", median * 1e3, "ms", params, device=args.device, human=f"{count}-hop route: overhead per hop median {median * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms (bare websocket round trip {base_median * 1e3:.3f} ms)")
            emit("hop_overhead_p99", p99 * 1e3, "ms", params)
            emit("hop_overhead_vs_bare_websocket", median / base_median, "ratio", params)
        single = None
        for sessions in (1, 8, 32):
            rate, batch = await aggregate(nodes[2].url, nodes[2].peer_id, digest, layers, hidden, sessions, args.seconds)
            single = single or rate
            emit("aggregate_tokens_per_s", rate, "tokens/s", {"sessions": sessions, "blocks": layers, "model": model, "device": args.device}, device=args.device, human=f"{sessions:2d} sessions: {rate:.1f} tokens/s aggregate ({rate / single:.2f}x one session), mean batch {batch:.1f}")
            emit("mean_batch_size", batch, "sessions", {"sessions": sessions})
            emit("aggregate_speedup_vs_one_session", rate / single, "ratio", {"sessions": sessions})
    finally:
        stop_nodes(nodes)


if __name__ == "__main__":
    asyncio.run(main())
