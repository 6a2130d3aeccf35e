"""What Prometheus metrics cost a node: per step on the batcher's path, and per scrape of `/metrics`.

The step path's end-to-end figure is `step_path.py` run in a tree before the metrics and in
this one, alternating (README, Measured); here are the parts, in one process, without noise
from hops: the observer calls the batcher makes per one-token step in a batch of one
(queue wait, batch, step), a fresh rendering of a busy node's `/metrics` against `/info`,
and a cached one (`--metrics-max-age`).

Run: `python benchmarks/metrics_cost.py [--repeat 20000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from benchmarks.common import emit  # noqa: E402
from node.state import NodeConfig, NodeState  # noqa: E402
from swarm.identity import Identity  # noqa: E402


def per_call_us(fn, repeat: int) -> float:
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - began) / repeat * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    state = NodeState(NodeConfig(), Identity.generate(), None, None, push=None, url="http://127.0.0.1:7000")
    metrics = state.metrics
    for index in range(10_000):  # a node that has served: every bucket and code has samples
        metrics.queued(0.0005 * (index % 9))
        metrics.batch(1 + index % 16, 1 + index % 16, 0.009)
        metrics.step(0.01 * (1 + index % 5))
    for code in ("busy", "bad_request", "not_member", "session_not_found"):
        metrics.refused(code)

    def one_step() -> None:
        metrics.queued(0.0004)
        metrics.batch(1, 1, 0.009)
        metrics.step(0.0095)

    step_us = per_call_us(one_step, args.repeat)
    emit(
        "metrics_per_step_us",
        step_us,
        "us",
        {"repeat": args.repeat},
        human=f"observer calls per one-token step: {step_us:.2f} us",
    )
    renders = max(200, args.repeat // 50)
    fresh = metrics.exposition
    fresh.max_age_s = 0.0
    render_us = per_call_us(fresh.render, renders)
    info_us = per_call_us(lambda: json.dumps(state.info()), renders)
    fresh.max_age_s = 1.0
    cached_us = per_call_us(fresh.render, args.repeat)
    params = {"repeat": renders, "bytes": len(fresh.render()[0])}
    emit(
        "metrics_render_us",
        render_us,
        "us",
        params,
        human=f"/metrics rendered afresh: {render_us:.0f} us ({params['bytes']} bytes)",
    )
    emit("metrics_info_us", info_us, "us", params, human=f"/info for comparison: {info_us:.0f} us")
    emit(
        "metrics_cached_us",
        cached_us,
        "us",
        {"repeat": args.repeat},
        human=f"/metrics reused (--metrics-max-age): {cached_us:.1f} us",
    )


if __name__ == "__main__":
    asyncio.run(main())
