"""What a relay costs: decode tokens/s through relayed nodes against direct ones, same run.

One loopback swarm of real node processes on TLS (the default): a bootstrap peer, one relay
peer (`--no-model`), and the same two-node split [0,15) [15,30) three times:
- direct: the nodes' own URLs;
- relayed: `--relay-always --relay <relay>`: their records name only the relay, so every
  connection to them, the client's and the one from A to B, is spliced through it, with TLS
  end to end pinned to the node;
- forwarded: their `--public-url`s are ports of one `benchmarks/forwarder.py` process, the
  cheapest extra network path there is (threads in `os.splice`, no Python on the bytes): the
  same path shape as relayed, one more process to cross each way, without the relay.
Every node runs `--threads 1`.

One client (the Python API, greedy, speculation off) decodes `--new-tokens` tokens through
each pair in turn for `--rounds` rounds (the order rotates every round, so drift in the
machine's speed hits all alike), each route pinned by planning with the other pairs excluded.
All pairs must give the same tokens, and each relayed round must splice at least the bytes of
its activations through the relay.

Figures (JSON lines on stdout, one human line on stderr): the median decode tokens/s of each
pair, and ms added per hop = (ms/token of the pair - ms/token direct) / 2, since both hops
cross the relay or forwarder (client -> A and A -> B; the client -> A connection also carries
B's output back to the client), medians of the per-round differences. The issue's aim: a
relayed hop adds at most 0.3 ms over direct on loopback, besides its extra network path:
`relay_hop_overhead_vs_forwarder_ms` (relayed against forwarded) is that figure; the
forwarded pair's own overhead is the extra path's. CPU per token of the relay and of the
forwarder (rounds through them, less direct rounds) are each one's own cost, blurred less
than wall time by the other processes (the kernel counts CPU in 10 ms ticks: use --rounds 9
or more).

Run: `python benchmarks/relay.py [--rounds 5] [--new-tokens 64]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit  # noqa: E402
from client.sampling import SamplingParams  # noqa: E402
from client.swarm import ClientConfig, SwarmModel  # noqa: E402
from swarm.errors import SwarmError  # noqa: E402
from swarm.model import DEFAULT_MODEL  # noqa: E402
from swarm.routing import Route  # noqa: E402
from tests.nodes import NodeProcess, free_port, refresh, reserve_url, start_nodes, stop_nodes  # noqa: E402

SPANS = ("0:15", "15:30")
HOPS = len(SPANS)
PROMPT = "Write a long story about a dragon who learns to cook."


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def info(url: str) -> dict:
    """A peer's /info (TLS, unverified: only counters are read from it, never trusted)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(f"{url}/info", timeout=10, context=context) as response:
        return json.load(response)


def cpu_s(process: psutil.Process) -> float:
    """The CPU seconds a process has used (user and system): a relay's own cost, which the other
    processes sharing this machine's cores do not blur as they blur wall time."""
    times = process.cpu_times()
    return times.user + times.system


def start_forwarder(pairs: list[tuple[int, int]]) -> subprocess.Popen:
    """benchmarks/forwarder.py forwarding each (listen, target) loopback port pair, once it listens."""
    argv = [sys.executable, "-m", "benchmarks.forwarder", *(f"{listen}:{target}" for listen, target in pairs)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the forwarder did not start")
    return proc


def relayed_bytes(relay: NodeProcess) -> int:
    host = info(relay.url)["relay"]["host"]
    return host["bytes_to_nodes"] + host["bytes_from_nodes"]


async def until(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


async def pinned_routes(client: SwarmModel, pairs: dict[str, list[NodeProcess]], wanted: dict[str, list[str]], timeout: float = 120.0) -> dict[str, Route]:
    """The route over each pair (the others excluded), once the client's view holds every pair
    at the URLs `wanted` (the relayed pair's records name its own URLs until it has attached
    to the relay and re-announced)."""
    ids = {arm: [n.peer_id for n in pair] for arm, pair in pairs.items()}
    others = {arm: frozenset(p for other, peers in ids.items() if other != arm for p in peers) for arm in ids}
    deadline = time.monotonic() + timeout
    while True:
        try:
            await refresh(client)
            routes = {arm: client.plan(exclude=others[arm]) for arm in ids}
            urls = {arm: [h.url for h in client.plan_hops(others[arm], 0, client.num_layers)] for arm in ids}
            if all(list(routes[arm].peers) == ids[arm] for arm in routes) and urls == wanted:
                return routes
        except SwarmError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the client never planned both pairs")
        await asyncio.sleep(0.5)


async def generate(
    client: SwarmModel, route: Route, ids: list[int], params: SamplingParams
) -> tuple[list[int], float, list[str]]:
    """One greedy generation along `route`: (token ids, decode tokens/s, the hops it ended on)."""
    stats, hops = None, []
    async for _, stats, hops in client.stream_result(ids, params, route, verify=False):
        pass
    return list(stats.token_ids), stats.decode_tokens_per_s, hops


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Starts 8 node processes (the default model loaded in 6) and a forwarder. Progress goes to stderr, one JSON object per result to stdout.",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed generations per pair, alternating direct and relayed (default 5)"
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per generation (default 64)")
    parser.add_argument(
        "--wire-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32", "float16"),
        help="activations on the wire (default bfloat16)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    b_port, b_url = reserve_url(tls=True)
    r_port, r_url = reserve_url(tls=True)
    gossip = ["--gossip-period", "2"]  # fast enough to meet at start, seldom enough to stay out of the timing
    relaying = ["--relay-always", "--relay", r_url]
    forwarded_ports = [(free_port(), free_port()) for _ in SPANS]  # (the forwarder's, the node's)
    forwarded_urls = [f"https://127.0.0.1:{listen}" for listen, _ in forwarded_ports]
    specs = [
        ["--no-model", *b_port, *gossip],
        ["--no-model", *r_port, "--bootstrap", b_url, *gossip],
        *(["--blocks", span, "--bootstrap", b_url, *gossip] for span in SPANS),
        *(["--blocks", span, "--bootstrap", b_url, *gossip, *relaying] for span in SPANS),
        *(
            ["--blocks", span, "--bootstrap", b_url, *gossip, "--port", str(port), "--public-url", url]
            for span, (_, port), url in zip(SPANS, forwarded_ports, forwarded_urls)
        ),
    ]
    forwarder = start_forwarder(forwarded_ports)
    say("starting 8 nodes (TLS, --threads 1) ...")
    try:
        nodes = start_nodes(specs, tmp, tls=True)  # every node gets --threads 1 there
    except BaseException:
        forwarder.kill()
        raise
    _, relay, *pair_nodes = nodes
    arms = ("direct", "relayed", "forwarded")
    pairs = {arm: pair_nodes[i * HOPS : (i + 1) * HOPS] for i, arm in enumerate(arms)}
    processes = {"relay": psutil.Process(relay.proc.pid), "forwarder": psutil.Process(forwarder.pid)}
    try:
        await until(lambda: info(relay.url)["relay"]["host"]["attached"] == HOPS, "the relayed pair attached to the relay")
        client = SwarmModel(DEFAULT_MODEL, bootstrap=[b_url], config=ClientConfig(wire_dtype=args.wire_dtype))
        wanted = {"direct": [n.url for n in pairs["direct"]], "relayed": [relay.url] * HOPS, "forwarded": forwarded_urls}
        routes = await pinned_routes(client, pairs, wanted)
        for arm, route in routes.items():
            say(f"{arm}: {route}")
        ids = client.head.encode_prompt(PROMPT, chat=True)
        params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False, speculate=False)
        expected = {arm: [n.peer_id[:8] for n in pair] for arm, pair in pairs.items()}
        # what a relayed generation's decode must at least splice: one hidden state a token into A and into B
        # (gossip with the relayed nodes also crosses the relay, in every round: hence a floor, not a difference)
        floor = args.new_tokens * client.head.config.hidden_size * {"float32": 4}.get(args.wire_dtype, 2) * HOPS
        tokens: dict[str, list[int]] = {}
        rates: dict[str, list[float]] = {arm: [] for arm in arms}
        # each round's CPU ms per token generated of the relay's and the forwarder's processes
        cpu: dict[str, dict[str, list[float]]] = {name: {arm: [] for arm in arms} for name in processes}
        for arm in arms:  # warm up: connections, the nodes' first steps, the allocator
            tokens[arm], _, _ = await generate(client, routes[arm], ids, params)
        if any(tokens[arm] != tokens["direct"] for arm in arms):
            raise AssertionError(f"the pairs disagree: {tokens}")
        for round_ in range(args.rounds):
            for arm in arms[round_ % 3 :] + arms[: round_ % 3]:
                before, cpu_before = relayed_bytes(relay), {name: cpu_s(p) for name, p in processes.items()}
                out, rate, hops = await generate(client, routes[arm], ids, params)
                moved = relayed_bytes(relay) - before
                for name, process in processes.items():
                    cpu[name][arm].append((cpu_s(process) - cpu_before[name]) * 1e3 / len(out))
                if [h.split("[")[0] for h in hops] != expected[arm]:  # a failover would have re-planned
                    raise AssertionError(f"{arm} round left its pinned pair: {hops}")
                if out != tokens[arm]:
                    raise AssertionError(f"{arm} round {round_} gave other tokens than its warm-up")
                if arm == "relayed" and moved < floor:
                    raise AssertionError(
                        f"a relayed round moved {moved} bytes through the relay, under the {floor} its activations take"
                    )
                rates[arm].append(rate)
                say(
                    f"round {round_} {arm}: {rate:.1f} tok/s ({moved} bytes through the relay; CPU a token:"
                    f" relay {cpu['relay'][arm][-1]:.2f} ms, forwarder {cpu['forwarder'][arm][-1]:.2f} ms)"
                )
    finally:
        stop_nodes(nodes)
        forwarder.kill()
    p = {
        "spans": ",".join(SPANS),
        "hops": HOPS,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "wire": args.wire_dtype,
        "transport": "https",
        "threads": 1,
    }
    median = {arm: statistics.median(rates[arm]) for arm in arms}
    for arm in arms:
        emit(
            "relay_decode_tokens_per_s",
            median[arm],
            "tokens/s",
            {**p, "arm": arm},
            human=f"{arm}: median {median[arm]:.1f} tok/s of {', '.join(f'{r:.1f}' for r in rates[arm])}",
        )

    def added_ms(arm: str, base: str) -> float:
        """ms per hop that `arm` adds over `base`, the median of per-round differences."""
        return statistics.median((1 / a - 1 / b) * 1e3 / HOPS for a, b in zip(rates[arm], rates[base]))

    def own_cpu_ms(name: str, arm: str) -> float:
        """CPU ms per token per hop that `name`'s process spends on `arm`'s rounds, less on direct ones."""
        return (statistics.median(cpu[name][arm]) - statistics.median(cpu[name]["direct"])) / HOPS

    emit("relay_decode_vs_direct", median["relayed"] / median["direct"], "ratio", p)
    emit("relay_hop_overhead_ms", added_ms("relayed", "direct"), "ms", p, human=f"relayed hop vs direct: {added_ms('relayed', 'direct'):+.3f} ms")
    emit("forwarder_hop_overhead_ms", added_ms("forwarded", "direct"), "ms", p, human=f"forwarded hop vs direct (the extra network path): {added_ms('forwarded', 'direct'):+.3f} ms")
    emit("relay_cpu_ms_per_hop_token", own_cpu_ms("relay", "relayed"), "ms", p, human=f"relay CPU {own_cpu_ms('relay', 'relayed'):.3f} ms a hop a token; forwarder {own_cpu_ms('forwarder', 'forwarded'):.3f}")
    emit("forwarder_cpu_ms_per_hop_token", own_cpu_ms("forwarder", "forwarded"), "ms", p)
    emit(
        "relay_hop_overhead_vs_forwarder_ms", added_ms("relayed", "forwarded"), "ms", p,
        human=f"relayed {median['relayed']:.1f}, forwarded {median['forwarded']:.1f}, direct {median['direct']:.1f} tok/s: the relay adds {added_ms('relayed', 'forwarded'):+.3f} ms a hop over the extra network path (aim <= 0.3)",
    )  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
