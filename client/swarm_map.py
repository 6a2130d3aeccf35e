"""The swarm map the web page draws: one JSON-able snapshot of a model's swarm. Pure.

From the model's size and name, the peers' signed records, what the watch saw of
each peer (client/watch.py) and the generations this server runs now
(client/live.py), it says:
- `nodes`: each peer serving the model, with its span, whether it answers now
  ("up", "down", "leaving", "unknown": not probed yet), its round trip, what it
  claims (load, sessions, throughput) and what this server measured of it
  (blocks/s of real steps, client/measure.py), and how many live sessions here
  route through it;
- `coverage`: per block, how many *live* ("up") nodes serve it. A record stays
  in the bootstrap's table until it expires, so counting records would hide a
  dead node's blocks; `holes` are the uncovered ranges [start, end);
- `sessions`: each running generation and its route, hop by hop.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from client.live import Generation
from client.watch import PeerHealth
from swarm.peers import missing_ranges
from swarm.records import PeerRecord

SHORT_ID = 8  # characters of a peer id shown


def snapshot(
    num_layers: int,
    model: str,
    records: Iterable[PeerRecord],
    health: Mapping[str, PeerHealth],
    generations: Sequence[Generation],
    measured_per_block_s: Mapping[str, float] | None = None,
    *,
    now: float,
    monotonic_now: float,
) -> dict[str, Any]:
    """The map. `measured_per_block_s`: this server's measured seconds per block, by peer id;
    `now` is unix time (the watch's clock), `monotonic_now` the generations' clock."""
    measured = measured_per_block_s or {}
    occupancy = Counter(hop.peer_id for g in generations for hop in g.route)
    nodes = [
        _node(r, health.get(r.peer_id, PeerHealth()), measured.get(r.peer_id), occupancy[r.peer_id], now)
        for r in sorted(records, key=lambda r: (r.span or (0, 0), r.peer_id))
        if r.span is not None and r.num_layers == num_layers
    ]
    counts = coverage(num_layers, [(n["span"][0], n["span"][1]) for n in nodes if n["state"] == "up"])
    return {
        "model": model,
        "num_layers": num_layers,
        "nodes": nodes,
        "coverage": counts,
        "covered": sum(1 for c in counts if c),
        "holes": [list(h) for h in missing_ranges(counts)],
        "sessions": [_session(g, monotonic_now) for g in generations],
    }


def coverage(num_layers: int, spans: Iterable[tuple[int, int]]) -> list[int]:
    """How many of `spans` serve each block (spans clipped to the model)."""
    counts = [0] * num_layers
    for start, end in spans:
        for block in range(max(0, start), min(num_layers, end)):
            counts[block] += 1
    return counts


def _node(record: PeerRecord, health: PeerHealth, per_block_s: float | None, sessions_here: int, now: float) -> dict[str, Any]:
    report = health.report
    return {
        "peer_id": record.peer_id,
        "short": record.peer_id[:SHORT_ID],
        "url": record.addresses[0] if record.addresses else "",
        "span": list(record.span),
        "state": health.state,
        "for_s": _round(max(0.0, now - health.since)) if health.since else None,
        "reason": health.reason,
        "rtt_ms": _round(health.rtt_s * 1e3) if health.rtt_s is not None else None,
        "load": _round(report.load if report.load is not None else record.load),
        "sessions": report.sessions,
        "max_sessions": report.max_sessions,
        "claimed_blocks_per_s": _round(report.throughput if report.throughput is not None else record.throughput),
        "measured_blocks_per_s": _round(1.0 / per_block_s) if per_block_s and math.isfinite(per_block_s) and per_block_s > 0 else None,
        "live_sessions": sessions_here,
    }


def _session(generation: Generation, monotonic_now: float) -> dict[str, Any]:
    return {
        "id": generation.id,
        "kind": generation.kind,
        "tokens": generation.new_tokens,
        "age_s": _round(max(0.0, monotonic_now - generation.started)),
        "hops": [{"peer_id": h.peer_id, "short": h.peer_id[:SHORT_ID], "start": h.start, "end": h.end} for h in generation.route],
    }


def _round(value: float) -> float:
    return round(value, 3) if math.isfinite(value) else 0.0


def steady(snap: Mapping[str, Any]) -> dict[str, Any]:
    """`snap` without what changes every probe (round trips, ages): a feed resends only when this differs."""
    return {
        **snap,
        "nodes": [{k: v for k, v in n.items() if k not in ("rtt_ms", "for_s")} for n in snap["nodes"]],
        "sessions": [{k: v for k, v in s.items() if k != "age_s"} for s in snap["sessions"]],
    }
