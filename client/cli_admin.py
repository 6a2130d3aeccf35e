"""`swarm peers` and `swarm keygen`: the commands that look after a swarm rather than generate."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from client.cli_args import discovery_options, transport_of


def cmd_peers(args: argparse.Namespace) -> int:
    import time

    from client.peers import coverage_lines, discover
    from client.standing import Standing, standing

    async def run():
        transport = transport_of(args)
        options = discovery_options(args)
        async with transport.client_session() as http:
            view = await discover(http, options, transport=transport)
            records = view.table.records(time.time())
            found, convicted = await standing(http, transport, records, options.bootstrap, args.timeout) if args.standing else ({}, {})
            return view, records, found, convicted

    view, records, found, convicted = asyncio.run(run())
    now = time.time()
    private = args.swarm_key is not None
    if args.json:
        print(json.dumps({
            "peers": [
                {
                    "peer_id": r.peer_id,
                    "addresses": list(r.addresses),
                    "model": dict(r.model) if r.model else None,
                    "precision": r.precision if r.model else None,  # what it computes with (swarm/precision.py)
                    "num_layers": r.num_layers,
                    "span": list(r.span) if r.span else None,
                    "throughput": r.throughput,
                    "load": r.load,
                    "age_s": round(now - r.issued_at, 2),
                    "proven": True,  # listed: the bootstrap peer proved its address (pending records are never listed)
                    **(found[r.peer_id].to_json() if r.peer_id in found else {}),
                }
                for r in records
            ],
            "private_swarm": private,
            "convicted": convicted,
            "coverage": coverage_lines(view.table, now),
            "unreachable": view.unreachable,
        }))
        return 0
    print(f"{'peer':14} {'address':24} {'model':14} {'span':>8} {'precision':9} {'blocks/s':>9} {'load':>5} {'age':>6}  {'pinned':8} {'private':7} standing")
    for r in records:
        span = f"{r.span[0]}:{r.span[1]}" if r.span else "-"
        model = (r.model_digest or "-")[:12]
        precision = r.precision if r.model else "-"
        mine = found.get(r.peer_id, Standing())
        shown = "-" if mine.private is None else ("yes" if mine.private else "no")
        judged = f"convicted by {len(mine.convicted_by)}" if mine.convicted_by else (f"{mine.accusations} accusations" if mine.accusations else "clean")
        print(
            f"{r.peer_id[:12]:14} {r.addresses[0][:24]:24} {model:14} {span:>8} {precision:9} {r.throughput:9.1f} {r.load:5.2f} {now - r.issued_at:5.0f}s"
            f"  {mine.pinned[:8]:8} {shown:7} {judged if args.standing else '-'}"
        )
    for accused, by in sorted(convicted.items()):
        print(f"convicted of wrong outputs, out of the tables: {accused} (by {', '.join(by)})")
    print(f"every peer listed is proven (its address answered a fresh nonce with its key); this is {'a private' if private else 'the open'} swarm")
    for line in coverage_lines(view.table, now):
        print(line)
    for url in view.unreachable:
        print(f"unreachable bootstrap peer: {url}", file=sys.stderr)
    return 0



def cmd_keygen(args: argparse.Namespace) -> int:
    """A new swarm key on stdout; redirected to a file, the file is made private (0600) first."""
    import os
    import stat

    from swarm.swarm_key import SwarmKey

    key = SwarmKey.generate()
    descriptor = sys.stdout.fileno()
    if stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.fchmod(descriptor, 0o600)  # before a byte of the key is in it
    sys.stdout.write(key.to_text())
    sys.stdout.flush()
    print(f"swarm key {key.fingerprint}: give it to every node and client of the swarm with --swarm-key FILE", file=sys.stderr)
    return 0
