"""Soak: 8 clients generating while a node is killed and restarted, 6 times, at most every 20 s.

The swarm and the load are `tests/soak.py` (five nodes, every block served at
least twice). Reports requests done, requests failed (the aim is none),
failovers by kind (splice: only the dead hop's blocks moved; reroute: a whole
new route), how long it ran, and each node's resident memory since its start and per half of its
life (growth in the second half near zero means it levels off).

Run: `python benchmarks/soak.py [--kills 6] [--clients 8] [--kill-every 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit  # noqa: E402
from tests.soak import SPANS, soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="kill-and-restart rounds (default 6)")
    parser.add_argument("--clients", type=int, default=8, help="clients generating in a loop (default 8)")
    parser.add_argument("--kill-every", type=float, default=20.0, metavar="SECONDS", help="least time between kills (default 20)")
    parser.add_argument("--settle", type=int, default=None, help="requests completed after each restart before the next kill (default: --clients)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="give up after this long (default 900)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per request (default 16)")
    args = parser.parse_args()
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    report = asyncio.run(
        soak(Path(tempfile.mkdtemp()), args.kills, args.clients, args.new_tokens, kill_every=args.kill_every, settle=args.settle, max_seconds=args.max_seconds, say=say)
    )
    p = {"kills": args.kills, "clients": args.clients, "kill_every_s": args.kill_every, "nodes": len(SPANS)}
    emit("soak_seconds", report.seconds, "s", p, human=f"ran {report.seconds:.0f} s{' (timed out)' if report.timed_out else ''}")
    failovers = sum(report.failovers.values())
    emit("soak_requests_done", report.done, "requests", p)
    emit("soak_requests_failed", len(report.failed), "requests", p, human=f"{report.done} requests, {len(report.failed)} failed, {report.kills} kills")
    emit("soak_failovers", failovers, "failovers", p, human=f"{failovers} failovers: {dict(report.failovers)}")
    emit("soak_failovers_spliced", report.failovers["splice"], "failovers", p)
    if report.latencies:
        emit("soak_request_latency_median", statistics.median(report.latencies), "s", p)
    emit(
        "soak_node_rss_growth_max",
        max(report.growth.values(), default=0) / 2**20,
        "MiB",
        p,
        human=f"resident memory growth of each node since its (re)start: {', '.join(f'{v / 2**20:+.0f} MiB' for v in report.growth.values())}",
    )
    if report.halves:
        emit(
            "soak_node_rss_growth_second_half_max",
            max(second for _, second in report.halves) / 2**20,
            "MiB",
            p,
            human="resident memory per node process, first half / second half of its life: "
            + ", ".join(f"{a / 2**20:+.0f}/{b / 2**20:+.0f} MiB" for a, b in report.halves),
        )
    for reason in report.failed[:5]:
        say(f"failed: {reason}")


if __name__ == "__main__":
    main()
