"""The cost of record admission (issue 11): what a Sybil flood costs a node, and how long an
honest newcomer waits to be admitted.

A real bootstrap node (`swarm-node --no-model`) runs on 127.0.0.1. This process plays the
attacker and the newcomer, from other loopback addresses (127.0.0.2, 127.0.0.3, ...: on
Linux all of 127/8 is loopback), so the node sees them as different sources.

- cpu per 1000 records: the node process's CPU seconds (user + system, from /proc via
  psutil) while it takes frames of records from fresh keys, per 1000 records, for records
  validly self-signed whose address does not answer and for forged ones (bad signature);
  each from one source (the per-source budget refuses most before their signature is
  checked) and from 50 sources (most are checked, and the proven-or-failed pipeline runs).
  The node's idle CPU over the same time is subtracted.
- newcomer admission: seconds from the newcomer's first POST /peers until the node lists
  it in GET /peers (it was dialled and proved its key), median of `--trials`, with no
  flood and during a flood from another source.

Usage: python benchmarks/record_admission.py [--records 3000] [--trials 5]
stdout: one JSON object per result; stderr: one human line per result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from swarm import wire  # noqa: E402
from swarm.discovery.peers_http import fetch_peers, peers_routes  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.peers import PeerTable
from swarm.records import PeerRecord  # noqa: E402
from tests.nodes import start_nodes, stop_nodes  # noqa: E402

FRAME_RECORDS = 3000  # about 1 MB, the largest frame a node takes


def bogus(count: int, forged: bool) -> list[dict]:
    now = time.time()
    records = []
    for _ in range(count):
        record = PeerRecord.create(Identity.generate(), addresses=("http://127.0.0.1:9",), now=now, ttl=60.0)
        if forged:
            record = replace(record, signature=bytes([record.signature[0] ^ 1]) + record.signature[1:])
        records.append(record.to_wire())
    return records


def frames(records: list[dict], per_frame: int) -> list[bytes]:
    return [wire.encode({"type": "peers", "records": records[i : i + per_frame]}) for i in range(0, len(records), per_frame)]


def session(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True))


async def post_all(url: str, bodies: list[bytes], sources: list[str]) -> None:
    for index, body in enumerate(bodies):
        async with session(sources[index % len(sources)]) as http, http.post(f"{url}/peers", data=body) as response:
            await response.read()
            assert response.status == 200, response.status


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def cpu_per_1000(node, records: int, forged: bool, sources: int) -> float:
    process = psutil.Process(node.proc.pid)
    bodies = frames(bogus(records, forged), max(1, min(FRAME_RECORDS, records // sources)))
    names = [f"127.0.{10 + i // 200}.{1 + i % 200}" for i in range(sources)]
    idle_began, idle_cpu = time.monotonic(), cpu(process)
    await asyncio.sleep(1.0)
    idle_rate = (cpu(process) - idle_cpu) / (time.monotonic() - idle_began)
    began, used = time.monotonic(), cpu(process)
    await post_all(node.url, bodies, names)
    await asyncio.sleep(2.5)  # proofs of the records let in: a refused dial each, within the proof timeout
    spent = cpu(process) - used - idle_rate * (time.monotonic() - began)
    return spent / records * 1000


async def newcomer_admission(node, trials: int, flood: bool) -> list[float]:
    times = []
    flooding = None
    if flood:
        waves = [frames(bogus(FRAME_RECORDS, False), FRAME_RECORDS) for _ in range(2)]

        async def flood_forever() -> None:
            while True:
                for wave in waves:
                    await post_all(node.url, wave, ["127.0.0.2"])

        flooding = asyncio.create_task(flood_forever())
        await asyncio.sleep(0.5)
    try:
        async with contextlib.AsyncExitStack() as stack, session("127.0.0.3") as http:
            for _ in range(trials):
                identity, table = Identity.generate(), PeerTable()
                runner = web.AppRunner(web.Application(), access_log=None)
                runner.app.add_routes(peers_routes(table, identity=identity))
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                await web.TCPSite(runner, "127.0.0.3", 0).start()
                url = f"http://127.0.0.3:{runner.addresses[0][1]}"
                own = PeerRecord.create(identity, addresses=(url,), now=time.time(), ttl=60.0)
                table.merge(own, time.time(), source="self")
                began = time.monotonic()
                async with http.post(f"{node.url}/peers", data=wire.encode({"type": "peers", "records": [own.to_wire()]})) as response:
                    await response.read()
                while identity.peer_id not in {r.peer_id for r in await fetch_peers(http, node.url, 10.0)}:
                    await asyncio.sleep(0.01)  # another process's table: polled
                times.append(time.monotonic() - began)
    finally:
        if flooding is not None:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
    return times


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (node,) = start_nodes([["--no-model", "--gossip-period", "5"]], Path(tmp))
        try:
            for forged in (False, True):
                for sources in (1, 50):
                    value = await cpu_per_1000(node, args.records, forged, sources)
                    kind = "forged" if forged else "self-signed"
                    params = {"records": args.records, "kind": kind, "sources": sources}
                    emit("record_admission_cpu", value, "cpu_s_per_1000_records", params, human=f"{kind} records from {sources} sources: {value:.3f} CPU s per 1000")
            for flood in (False, True):
                times = await newcomer_admission(node, args.trials, flood)
                value = statistics.median(times)
                emit("newcomer_admission", value, "s", {"trials": args.trials, "flood": flood}, human=f"newcomer admitted in {value * 1e3:.1f} ms (median, flood={flood})")
        finally:
            stop_nodes([node])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000, help="bogus records per CPU figure (default 3000)")
    parser.add_argument("--trials", type=int, default=5, help="newcomers admitted per admission figure (default 5)")
    asyncio.run(main(parser.parse_args()))
