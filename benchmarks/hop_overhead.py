"""Per-hop overhead of a one-token step, and aggregate throughput of concurrent sessions.

Overhead: one-token steps through real `swarm-node` processes on loopback; the
client's round-trip time minus the model time each hop reports is what the
protocol costs (frames, websocket, event loop, the hop to the compute thread).
A bare aiohttp websocket echo of the same frame, in the same run, is the floor.

Throughput: N sessions stepping one token at a time, concurrently, through one
node holding the whole model; continuous batching should make 8 sessions much
faster in aggregate than one. The nodes are sized for the largest session count
(`--max-sessions`, `--max-length` and `--kv-memory` from the checkpoint's KV bytes
per token, and the per-source session limit, since every session comes from
this one client), so 32 sessions fit on any model instead of meeting `busy`.

`--tls` runs the nodes on TLS (certificates carrying their identity keys, every dial
pinned) instead of plain http; the bare websocket floor stays plain.

Run: `python benchmarks/hop_overhead.py [--steps 400] [--seconds 6] [--tls]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

SESSION_COUNTS = (1, 8, 32)
AGGREGATE_LENGTH = 513  # positions of an aggregate session: its loop rewinds to 0 after 512
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

    # The exit stack owns every session from the moment it opens: one refused open (or any
    # error later) still closes those opened before it.
    async with TRANSPORT.client_session() as http, contextlib.AsyncExitStack() as opened:
        sessions_ = [
            await opened.enter_async_context(RouteSession(http, hop, digest, AGGREGATE_LENGTH, SessionConfig(wire_dtype="float32"), TRANSPORT))
            for _ in range(sessions)
        ]
        tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(sessions_)]
        try:
            await asyncio.sleep(1.0)  # warm up: every loop running
            start_counts, begin = sum(counts), time.perf_counter()
            steps0, batches0 = await _counters(http, url, peer_id)
            await asyncio.sleep(seconds)
            steps1, batches1 = await _counters(http, url, peer_id)
            done, elapsed = sum(counts) - start_counts, time.perf_counter() - begin
        finally:
            stop.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failed is not None:
        raise failed
    return done / elapsed, (steps1 - steps0) / max(1, batches1 - batches0)


def node_sizing(config, layers: int, device: str, steps: int) -> list[str]:
    """Flags that let every node hold the largest session count at once, whatever the model.

    The KV budget is what `SESSION_COUNTS[-1]` sessions of the longest length this run
    opens take in the node's dtype (bf16 on cuda, float32 on cpu: the node's default),
    with a quarter more for the overhead sessions and the ones still closing."""
    import math

    from swarm.model import KVCache

    sessions = SESSION_COUNTS[-1] + 8
    length = max(AGGREGATE_LENGTH, steps + 32)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kv = math.ceil(1.25 * sessions * KVCache.nbytes_for(config, layers, length, dtype))
    return ["--max-sessions", str(sessions), "--max-sessions-per-source", str(sessions), "--max-length", str(length), "--kv-memory", str(kv)]


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
        digest, layers, hidden, config = ck.fingerprint().digest, ck.config.num_layers, ck.config.hidden_size, ck.config
    print("starting nodes ...", file=sys.stderr)
    common = ["--model", model, "--device", args.device, *node_sizing(config, layers, args.device, args.steps)]
    nodes = start_nodes([common + ["--blocks", "0:1"], common + ["--blocks", "1:2"], common + ["--blocks", f"0:{layers}"]], tmp, tls=args.tls)
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
        for sessions in SESSION_COUNTS:
            rate, batch = await aggregate(nodes[2].url, nodes[2].peer_id, digest, layers, hidden, sessions, args.seconds)
            single = single or rate
            emit("aggregate_tokens_per_s", rate, "tokens/s", {"sessions": sessions, "blocks": layers, "model": model, "device": args.device}, device=args.device, human=f"{sessions:2d} sessions: {rate:.1f} tokens/s aggregate ({rate / single:.2f}x one session), mean batch {batch:.1f}")
            emit("mean_batch_size", batch, "sessions", {"sessions": sessions})
            emit("aggregate_speedup_vs_one_session", rate / single, "ratio", {"sessions": sessions})
    finally:
        stop_nodes(nodes)


if __name__ == "__main__":
    asyncio.run(main())
