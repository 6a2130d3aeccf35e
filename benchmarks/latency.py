"""Decoding over a WAN: 3 hops each behind a delay relay, against the physical floor, and on loopback.

A swarm of the default model ([0,10) [10,20) [20,30) and a bootstrap peer) runs on this
machine, every node behind its own `DelayRelay` (tests/delay_relay.py), its `--public-url` the
relay's, so the client's connections and the pushes between hops all cross relays. Each
generation runs with the relays at `--delay-ms` each way ("wan") or at 0 ("loopback": the
relays then only copy bytes, about 0.01 ms a round trip), alternating, so the machine's drift
hits both alike and both run on the same processes. `--separate-loopback` takes the loopback
figures from a second swarm with no relay at all instead.

Per swarm, greedy, fixed prompts, median of `--trials`:
- plain push decoding (`speculate=False`) of a free chat prompt, against the floor per
  token: (hops + 1) one-way delays + the compute of one token, measured in the same run as
  the loopback plain time per token (model, client and loopback hops: all a token costs
  besides the wire);
- speculation (prompt lookup) on a grounded task (repeat a given passage: drafts hit),
  against plain decoding of the same prompt;
- speculation on the free chat prompt, against plain;
- the push path alone: bare one-token steps through the hops (no client model), against
  (hops + 1) delays + the model time the hops report for the same steps.
Speculation needs `SamplingParams.speculate` (client/generate.py); without it only the
plain figures run.

The machine's noise moves the figures much on a small shared box (compute per token there is
tens of ms, as much as the wire); `--device cuda` puts the nodes on the GPU (all three on one).

Run: `python benchmarks/latency.py [--delay-ms 10] [--new-tokens 64] [--trials 3] [--device cuda]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit
from client.generate import GenerationStats
from client.sampling import SamplingParams
from client.session import RemoteHop, RouteSession, SessionConfig
from tests.nodes import start_swarm, stop_nodes, swarm_client, until_routed

SPANS = ["0:10", "10:20", "20:30"]
CHAT = "Write a long story about a dragon who learns to cook."
PASSAGE = (
    "The river rose for three days after the storm. On the fourth morning the ferryman untied his boat, "
    "loaded it with bread, lamp oil and a crate of letters, and crossed to the village on the far bank, "
    "where nobody had seen a stranger since the bridge fell. The children ran down to the water to meet him, "
    "and the baker's daughter read the letters aloud in the square until the sun went down."
)
GROUNDED = f"Repeat the following passage exactly, word for word, and nothing else.\n\n{PASSAGE}"


def can_speculate() -> bool:
    return "speculate" in {f.name for f in dataclasses.fields(SamplingParams)}


async def decode(client, ids: list[int], new_tokens: int, speculate: bool | None) -> GenerationStats:
    """One greedy generation, unchecked (verification runs after the stream, outside decode time)."""
    sampling = {"max_new_tokens": new_tokens}
    if speculate is not None:
        sampling["speculate"] = speculate
    stats = GenerationStats()
    async for _, stats, _ in client.stream_result(ids, SamplingParams(**sampling), verify=False):
        pass
    return stats


async def hop_steps(client, nodes, relays, delays: tuple[float, ...], steps: int) -> dict[float, list[tuple[float, float]]]:
    """One-token steps of a random hidden state straight through the 3 hops (no head, no client
    model), alternating the relays' delay every few steps: per delay, (wall s, the hops' reported
    model s) of each step."""
    hops = [RemoteHop(n.url, *n.blocks, n.peer_id) for n in nodes]
    x = torch.randn(1, client.head.config.hidden_size)
    out: dict[float, list[tuple[float, float]]] = {d: [] for d in delays}
    transport = client.config.transport
    config = SessionConfig(wire_dtype="float32")
    async with transport.client_session() as http, RouteSession(http, hops, client.fingerprint.digest, steps * len(delays) + 16, config, transport) as session:
        position = 0
        for _ in range(4):  # warm up
            await session.forward(x, position)
            position += 1
        for block in range(0, steps, 5):
            for delay in delays:
                relays.set_delay(delay)
                for i in range(min(5, steps - block)):
                    began = time.perf_counter()
                    await session.forward(x, position)
                    wall = time.perf_counter() - began
                    await session.settle(5.0)  # every hop's ack in: its compute_ms is this step's
                    position += 1
                    if i:  # the first step after a switch may meet bytes still held at the old delay
                        out[delay].append((wall, sum(session.compute_ms) / 1e3))
    return out


def tokens_per_s(runs: list[GenerationStats]) -> float:
    return statistics.median(s.decode_tokens_per_s for s in runs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay of each relay (default 10: an RTT of 20 ms per hop)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per generation (the grounded passage ends sooner, at eos)")
    parser.add_argument("--trials", type=int, default=3, help="generations per figure; the median counts")
    parser.add_argument("--steps", type=int, default=60, help="bare one-token steps through the hops per delay (default 60)")
    parser.add_argument(
        "--separate-loopback",
        action="store_true",
        help="loopback figures from a second swarm with no relays at all (default: the same swarm, its relays at 0 ms)",
    )
    parser.add_argument("--device", default="cpu", help="the nodes' device: cpu, cuda or cuda:N (default cpu; the client's head stays on the CPU)")
    args = parser.parse_args()
    delay = args.delay_ms / 1e3
    speculation = can_speculate()
    if not speculation:
        print("SamplingParams has no `speculate` field (speculative decoding not on this branch): plain decoding only", file=sys.stderr)
    # (mode name, prompt, speculate): None leaves SamplingParams' default, which is plain without speculation
    modes = [("plain_chat", CHAT, False if speculation else None), ("plain_grounded", GROUNDED, False if speculation else None)]
    if speculation:
        modes += [("speculate_chat", CHAT, True), ("speculate_grounded", GROUNDED, True)]

    tmp = Path(tempfile.mkdtemp(prefix="latency-"))
    extra = ["--device", args.device]
    started = []
    try:
        print(f"starting 3 nodes behind relays ({args.delay_ms:g} ms each way; 0 for loopback) ...", file=sys.stderr)
        boot, nodes = start_swarm(tmp / "wan", SPANS, extra=extra, relayed=True)
        started += [boot, *nodes]
        relays = nodes[0].relays
        wan = swarm_client(boot.url)
        # (name, client, the relays' delay while it runs): loopback is the same swarm, its relays at 0 ms
        settings = [("loopback", wan, 0.0), ("wan", wan, delay)]
        if args.separate_loopback:
            print("starting 3 more nodes on plain loopback ...", file=sys.stderr)
            loop_boot, loop_nodes = start_swarm(tmp / "loopback", SPANS, extra=extra)
            started += [loop_boot, *loop_nodes]
            settings[0] = ("loopback", swarm_client(loop_boot.url), delay)
        for client in {id(c): c for _, c, _ in settings}.values():
            await until_routed(client)
        ids = {prompt: wan.head.encode_prompt(prompt, chat=True) for prompt in (CHAT, GROUNDED)}
        runs: dict[tuple[str, str], list[GenerationStats]] = {(name, m): [] for name, _, _ in settings for m, _, _ in modes}
        for _, client, wait in settings:  # warm up: sessions, connections, the nodes' first steps
            relays.set_delay(wait)
            await decode(client, ids[CHAT], 8, modes[0][2])
        for trial in range(args.trials):
            for mode, prompt, speculate in modes:
                for name, client, wait in settings:  # alternate, so drift in the machine's speed hits both alike
                    relays.set_delay(wait)
                    runs[name, mode].append(await decode(client, ids[prompt], args.new_tokens, speculate))
            print(f"trial {trial + 1}/{args.trials} done", file=sys.stderr)
        steps = await hop_steps(wan, nodes, relays, (0.0, delay), args.steps)
    finally:
        stop_nodes(started)
    report(runs, modes, args, delay)
    report_steps(steps, args, delay)


def report(runs: dict[tuple[str, str], list[GenerationStats]], modes: list, args, delay: float) -> None:
    hops = len(SPANS)
    base = {"hops": hops, "trials": args.trials, "new_tokens": args.new_tokens, "wire": "float32", "greedy": True, "device": args.device}
    base["loopback"] = "another swarm, no relays" if args.separate_loopback else "the same swarm, relays at 0 ms"
    say = functools.partial(emit, device=args.device)
    compute = 1.0 / tokens_per_s(runs["loopback", "plain_chat"])  # s per token with no wire delay
    floor = (hops + 1) * delay + compute
    for swarm, delay_ms in (("loopback", 0.0), ("wan", args.delay_ms)):
        p = {**base, "swarm": swarm, "delay_ms_each_way": delay_ms}
        plain = {m: tokens_per_s(runs[swarm, m]) for m in ("plain_chat", "plain_grounded")}
        for mode, _, _ in modes:
            stats = runs[swarm, mode]
            tps = tokens_per_s(stats)
            extra = {"tokens": statistics.median(s.new_tokens for s in stats)}
            if hasattr(stats[0], "round_trips"):
                extra.update(
                    round_trips=statistics.median(s.round_trips for s in stats),
                    drafted=statistics.median(s.drafted for s in stats),
                    accepted=statistics.median(s.accepted for s in stats),
                )
            say(f"latency_{mode}_tokens_per_s", tps, "tokens/s", {**p, **extra}, human=f"{swarm} {mode}: {tps:.1f} tok/s {extra}")
            if mode.startswith("speculate"):
                against = plain["plain_" + mode.split("_", 1)[1]]
                say(f"latency_{mode}_vs_plain", tps / against, "ratio", p, human=f"{swarm} {mode}: {tps / against:.2f}x plain ({against:.1f} tok/s)")
        if swarm == "wan":
            per_token = 1.0 / plain["plain_chat"]
            say("latency_floor_per_token", floor * 1e3, "ms", {**p, "compute_ms": compute * 1e3, "compute": "loopback plain ms/token, same run"})
            added = per_token - compute
            say("latency_wire_added_per_token", added * 1e3, "ms", p, human=f"wan plain: the relays added {added * 1e3:.1f} ms a token (told {(hops + 1) * args.delay_ms:g} ms)")
            say(
                "latency_plain_vs_floor",
                per_token / floor,
                "ratio",
                p,
                human=f"wan plain: {per_token * 1e3:.1f} ms/token against a floor of {floor * 1e3:.1f} ms "
                f"({hops + 1} x {args.delay_ms:g} ms + {compute * 1e3:.1f} ms compute) = {per_token / floor:.3f}x",
            )


def report_steps(steps: dict[float, list[tuple[float, float]]], args, delay: float) -> None:
    """The push path alone: a bare one-token step against (hops + 1) delays + the hops' own model time."""
    hops = len(SPANS)
    p = {"hops": hops, "steps": args.steps, "wire": "float32", "device": args.device, "delay_ms_each_way": args.delay_ms}
    say = functools.partial(emit, device=args.device)
    overhead = statistics.median(wall - model for wall, model in steps[0.0])
    say("latency_step_overhead_loopback", overhead * 1e3, "ms", {**p, "delay_ms_each_way": 0.0}, human=f"loopback step: {overhead * 1e3:.2f} ms beyond the hops' model time ({hops} hops)")
    ratio = statistics.median(wall / ((hops + 1) * delay + model) for wall, model in steps[delay])
    wall = statistics.median(w for w, _ in steps[delay])
    model = statistics.median(m for _, m in steps[delay])
    say(
        "latency_step_vs_floor",
        ratio,
        "ratio",
        {**p, "wall_ms": wall * 1e3, "model_ms": model * 1e3},
        human=f"wan step: {wall * 1e3:.1f} ms against {hops + 1} x {args.delay_ms:g} ms + {model * 1e3:.1f} ms of the hops' model time = {ratio:.3f}x the floor",
    )


if __name__ == "__main__":
    asyncio.run(main())
