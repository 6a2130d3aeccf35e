"""Load on `swarm serve`: concurrent streaming chat clients against a real 3-node swarm.

A bootstrap peer and three `swarm-node` processes (blocks split in three, each
span `--replicas` times) run on loopback; `swarm serve` runs beside them as its
own process. Clients speak the OpenAI API as any client would: `POST
/v1/chat/completions` with `stream: true` and `stream_options.include_usage`,
reading the server-sent events until `[DONE]`. Each client sends one request
after another, each with its own prompt, until the phase's time is up.

Two phases in the same run, same swarm, same server: one client, then
`--clients` clients (default 16). For each: requests/s, tokens/s, p50/p99 time
to first token (request sent to first content) and inter-token latency (gaps
between content events), failed requests, and the mean batch size each node
saw (its `/info` steps over batches across the phase), which says whether
concurrent sessions meeting on a node really are computed together. Last, the
aggregate tokens/s of the many against the one.

`--target swarm` runs the same clients in this process straight on `SwarmModel`
(no HTTP server): against the `serve` figures it says what the server costs.

Run: `python benchmarks/api_load.py [--seconds 60] [--clients 16] [--max-tokens 32]
[--replicas 1] [--target serve|swarm]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit
from tests.nodes import start_swarm, stop_nodes

TOPICS = ["rivers", "bread", "the moon", "chess", "bees", "trains", "glass", "volcanoes", "paper", "owls", "salt", "clocks", "maps", "snow", "bridges", "tea"]


@dataclass
class Outcome:
    """One request: when its tokens came, or why it failed."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0  # completion tokens (usage when the server sends it, else content events)
    error: str = ""


def prompt(client: int, request: int) -> list[dict[str, str]]:
    topic = TOPICS[(client * 7 + request) % len(TOPICS)]
    return [{"role": "user", "content": f"Write a few sentences about {topic}. ({client}.{request})"}]


async def stream_api(http: aiohttp.ClientSession, url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> Outcome:
    """One streaming chat completion, read event by event as the OpenAI SSE framing has it."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    outcome = Outcome(time.perf_counter())
    try:
        async with http.post(f"{url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                outcome.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return outcome
            done = False
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.error = f"error event: {event['error']}"
                    return outcome
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    outcome.token_times.append(time.perf_counter())
                if event.get("usage"):
                    outcome.tokens = event["usage"]["completion_tokens"]
            if not done:
                outcome.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.tokens = outcome.tokens or len(outcome.token_times)
    return outcome


async def stream_direct(model, messages: list[dict[str, str]], max_tokens: int) -> Outcome:
    """The same request straight on `SwarmModel` in this process (`--target swarm`)."""
    from client.sampling import SamplingParams
    from swarm.errors import SwarmError

    outcome = Outcome(time.perf_counter())
    try:
        stats = None
        async for piece, stats, _ in model.stream_result(model.head.encode_chat(messages), SamplingParams(max_new_tokens=max_tokens), verify=False):
            if piece:
                outcome.token_times.append(time.perf_counter())
        outcome.tokens = stats.new_tokens if stats else 0
    except SwarmError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


async def phase(request, clients: int, seconds: float) -> tuple[list[Outcome], float]:
    """`clients` loops of back-to-back requests for `seconds` (requests under way then finish)."""
    outcomes: list[Outcome] = []
    began = time.perf_counter()
    deadline = began + seconds

    async def client(index: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            outcomes.append(await request(prompt(index, n)))
            n += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes, time.perf_counter() - began


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def node_counters(http: aiohttp.ClientSession, nodes) -> dict[str, tuple[int, int]]:
    """Each node's (steps, batches) so far, from its /info."""
    out = {}
    for node in nodes:
        async with http.get(f"{node.url}/info") as response:
            info = await response.json()
        out[node.peer_id] = (info["steps"], info["batches"])
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each process has used so far: what a token costs where, whatever else the machine runs."""
    out = {}
    for name, pid in pids.items():
        times = psutil.Process(pid).cpu_times()
        out[name] = times.user + times.system
    return out


def report(name: str, outcomes: list[Outcome], elapsed: float, clients: int, batches: dict[str, float], cpu: dict[str, float], params: dict) -> float:
    ok = [o for o in outcomes if not o.error]
    failed = len(outcomes) - len(ok)
    tokens = sum(o.tokens for o in ok)
    ttft = [o.token_times[0] - o.sent for o in ok if o.token_times]
    itl = [b - a for o in ok for a, b in itertools.pairwise(o.token_times)]
    p = {**params, "clients": clients, "seconds": round(elapsed, 1)}
    rate = tokens / elapsed
    emit("api_requests_per_s", len(ok) / elapsed, "requests/s", p)
    emit("api_tokens_per_s", rate, "tokens/s", p)
    emit("api_ttft_p50", quantile(ttft, 0.5) * 1e3, "ms", p)
    emit("api_ttft_p99", quantile(ttft, 0.99) * 1e3, "ms", p)
    emit("api_inter_token_p50", quantile(itl, 0.5) * 1e3, "ms", p)
    emit("api_inter_token_p99", quantile(itl, 0.99) * 1e3, "ms", p)
    emit("api_failed_requests", failed, "requests", p)
    for peer, mean in batches.items():
        emit("node_mean_batch_size", mean, "sessions", {**p, "peer": peer[:8]})
    for process, seconds in cpu.items():
        emit("cpu_ms_per_token", seconds / max(1, tokens) * 1e3, "ms", {**p, "process": process})
    print(
        f"{name}: {clients:2d} clients, {len(ok)} requests in {elapsed:.1f} s: {len(ok) / elapsed:.2f} req/s, {rate:.1f} tokens/s, "
        f"TTFT p50 {quantile(ttft, 0.5) * 1e3:.0f} / p99 {quantile(ttft, 0.99) * 1e3:.0f} ms, "
        f"inter-token p50 {quantile(itl, 0.5) * 1e3:.0f} / p99 {quantile(itl, 0.99) * 1e3:.0f} ms, failed {failed}, "
        f"mean batch per node {', '.join(f'{b:.1f}' for b in batches.values())}; "
        f"CPU ms per token: {', '.join(f'{k} {v / max(1, tokens) * 1e3:.0f}' for k, v in cpu.items())} (machine load {os.getloadavg()[0]:.1f})",
        file=sys.stderr,
    )
    for o in outcomes:
        if o.error:
            print(f"  failed: {o.error}", file=sys.stderr)
    return rate


async def start_server(model: str, bootstrap: str, clients: int, log: Path, extra: list[str], timeout: float = 300.0) -> tuple[subprocess.Popen, str, str]:
    """`swarm serve` as its own process on a free loopback port; returns it, its URL and the model id it serves."""
    argv = [sys.executable, "-m", "client.cli", "serve", model, "--bootstrap", bootstrap, "--insecure-http", "--port", "0", "--max-concurrent", str(max(64, clients)), *extra]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)  # a file: its request log never fills a pipe
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = next((line for line in log.read_text().splitlines() if line.startswith("ready url=")), None)
        if ready is not None:
            url = ready.split()[1].removeprefix("url=")
            async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/models") as response:
                return proc, url, (await response.json())["data"][0]["id"]
        if proc.poll() is not None:
            raise RuntimeError(f"swarm serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        await asyncio.sleep(0.2)  # another process's output: polled
    proc.kill()
    raise TimeoutError(f"swarm serve was not ready in {timeout} s:\n{log.read_text()[-2000:]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase, in seconds (default 60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the loaded phase (default 16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    parser.add_argument("--replicas", type=int, default=1, help="nodes per third of the model's blocks (default 1: three nodes)")
    parser.add_argument("--target", choices=("serve", "swarm"), default="serve", help="through `swarm serve` (default) or straight on SwarmModel in this process")
    parser.add_argument("--model", default=None, help="alias, .gguf file or HF directory (default: the default model)")
    parser.add_argument("--threads", type=int, default=None, help="--threads N for every node and the server (default: torch's choice)")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    from swarm.model import DEFAULT_MODEL, open_checkpoint

    model = args.model or DEFAULT_MODEL
    with open_checkpoint(model) as ck:
        layers = ck.config.num_layers
    cuts = [0, layers // 3, 2 * layers // 3, layers]
    spans = [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])] * args.replicas
    tmp = Path(tempfile.mkdtemp())
    print(f"starting a bootstrap peer and {len(spans)} nodes ({', '.join(spans)}) ...", file=sys.stderr)
    bootstrap, nodes = start_swarm(tmp, spans, extra=threads)
    server = None
    params = {"target": args.target, "max_tokens": args.max_tokens, "nodes": len(spans), "replicas": args.replicas, "model": model, "cpus": os.cpu_count(), "threads": args.threads}
    try:
        if args.target == "serve":
            server, url, model_id = await start_server(model, bootstrap.url, args.clients, tmp / "serve.log", threads)
            print(f"swarm serve at {url}, its log at {tmp / 'serve.log'}", file=sys.stderr)
            http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0))

            async def request(messages):
                return await stream_api(http, url, model_id, messages, args.max_tokens)

        else:
            from tests.nodes import swarm_client

            http = aiohttp.ClientSession()
            swarm = swarm_client(bootstrap.url)

            async def request(messages):
                return await stream_direct(swarm, messages, args.max_tokens)

        async with http:
            await request(prompt(99, 0))  # warm up: the first request reads the swarm and measures round trips
            rates = {}
            pids = {"client" if server is None else "server": os.getpid() if server is None else server.pid}
            pids.update({f"node{n.blocks[0]}-{n.blocks[1]}.{i}": n.proc.pid for i, n in enumerate(nodes)})
            for clients in (1, args.clients):
                before, cpu_before = await node_counters(http, nodes), cpu_seconds(pids)
                outcomes, elapsed = await phase(request, clients, args.seconds)
                after, cpu_after = await node_counters(http, nodes), cpu_seconds(pids)
                batches = {p: (after[p][0] - before[p][0]) / max(1, after[p][1] - before[p][1]) for p in after}
                cpu = {k: cpu_after[k] - cpu_before[k] for k in pids}
                rates[clients] = report(args.target, outcomes, elapsed, clients, batches, cpu, params)
        ratio = rates[args.clients] / rates[1] if rates[1] else float("nan")
        emit(
            "api_aggregate_vs_one_client",
            ratio,
            "ratio",
            {**params, "clients": args.clients},
            human=f"{args.clients} clients: {rates[args.clients]:.1f} tokens/s aggregate, {ratio:.2f}x one client's {rates[1]:.1f} tokens/s",
        )
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        stop_nodes([bootstrap, *nodes])


if __name__ == "__main__":
    asyncio.run(main())
