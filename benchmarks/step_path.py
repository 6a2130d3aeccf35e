"""CPU cost of the step path alone: two nodes and a client on one event loop, one process.

Across processes (hop_overhead.py) the figures of a 2-core box swing by 20% from run
to run, more than the protocol's own cost. Here the nodes (blocks [0, 1) and [1, 2)
of the default model, compute in a worker thread) and a client share one loop, so a
one-token 2-hop step measures frames, checks, batching and pushes with little noise.
`defence_cost.py` runs it in a tree before a change and in this one.

`--transport both` (the default where swarm/transport.py exists) measures a plain-http
pair and a TLS pair (certificates carrying the identity keys, every dial pinned) in
the same run, in alternating rounds, and reports the TLS cost per step.

Run: `python benchmarks/step_path.py [--steps 4000] [--transport both|http|tls]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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

try:
    from swarm.transport import Transport  # noqa: E402
except ImportError:  # trees before TLS: plain http only
    Transport = None

ROUNDS = 8  # with --transport both, the modes alternate this many times: drift hits both alike


async def _pair(spans, fingerprint, secure: bool, stack: contextlib.AsyncExitStack):
    """Two nodes ([0, 1) and [1, 2)) and an open 2-hop session through them; the session."""
    config, transport = NodeConfig(), None
    if Transport is not None:
        transport = Transport(insecure_http=not secure)
        config = dataclasses.replace(config, transport=transport)
    states, stops, servers = [], [], []
    for span in spans:
        ready, stop = asyncio.Event(), asyncio.Event()
        stops.append(stop)
        servers.append(asyncio.ensure_future(serve(span, fingerprint, Identity.generate(), config, ready=lambda s, r=ready: (states.append(s), r.set()), stop=stop)))
        await ready.wait()

    async def close() -> None:
        for stop in stops:
            stop.set()
        await asyncio.gather(*servers)

    stack.push_async_callback(close)
    hops = [RemoteHop(s.url, s.span.start, s.span.end, s.identity.peer_id) for s in states]
    http = await stack.enter_async_context(transport.client_session() if transport is not None else aiohttp.ClientSession())
    extra = {"transport": transport} if transport is not None else {}
    return await stack.enter_async_context(RouteSession(http, hops, fingerprint.digest, 4096, SessionConfig(wire_dtype="float32"), **extra))


async def _steps(session, x, count: int, offset: int) -> float:
    began = time.perf_counter()
    for step in range(count):
        await session.forward(x, (offset + step) % 4000)
    return time.perf_counter() - began


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--transport", choices=("both", "http", "tls"), default="both" if Transport is not None else "http", help="what the nodes speak (both: alternating rounds, same run)")
    args = parser.parse_args()
    with open_checkpoint(DEFAULT_MODEL) as checkpoint:
        fingerprint = checkpoint.fingerprint()
        spans = [load_span(checkpoint, 0, 1), load_span(checkpoint, 1, 2)]
    modes = {"both": ("http", "tls"), "http": ("http",), "tls": ("tls",)}[args.transport]
    x = torch.randn(1, spans[0].config.hidden_size)
    total = dict.fromkeys(modes, 0.0)
    async with contextlib.AsyncExitStack() as stack:
        sessions = {mode: await _pair(spans, fingerprint, mode == "tls", stack) for mode in modes}
        for session in sessions.values():
            await _steps(session, x, 100, 0)  # warm-up
        rounds = ROUNDS if len(modes) > 1 else 1
        for index in range(rounds):
            for mode, session in sessions.items():
                total[mode] += await _steps(session, x, args.steps // rounds, index * (args.steps // rounds))
    steps = rounds * (args.steps // rounds)
    per_step = {mode: total[mode] / steps for mode in modes}
    for mode in modes:
        name = "step_path_two_hops_ms" if mode == "http" else "step_path_two_hops_tls_ms"
        emit(name, per_step[mode] * 1e3, "ms", {"steps": steps, "hops": 2, "blocks_per_hop": 1, "transport": mode}, human=f"2-hop one-token step, one process, {mode}: {per_step[mode] * 1e3:.3f} ms")
    if len(modes) > 1:
        cost = per_step["tls"] / per_step["http"] - 1
        emit("step_path_tls_cost", 100 * cost, "%", {"steps": steps, "rounds": rounds}, human=f"TLS costs {100 * cost:+.1f}% per 2-hop step ({1e3 * (per_step['tls'] - per_step['http']) / 2:+.3f} ms per hop)")


if __name__ == "__main__":
    asyncio.run(main())
