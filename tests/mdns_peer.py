"""A tiny mDNS peer for the namespace tests, run as its own process inside a namespace.

    mdns_peer.py serve  ADDRESS TTL_S            serve /info with a signed record and advertise it
    mdns_peer.py browse ADDRESS SWEEP_S PROBE_MS print peers entering and leaving the table

stdout is JSON lines: {"event": "ready", "peer_id": ...} once up, then (browse)
{"event": "added"|"removed", "peer_id": ..., "t": unix seconds}. SIGTERM exits cleanly
(an advertiser says goodbye). Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import sys
import time

from aiohttp import web

from swarm.discovery.mdns import Advert, Mdns, MdnsConfig
from swarm.identity import Identity
from swarm.peers import PeerTable
from swarm.records import PeerRecord
from swarm.transport import Transport

RECORD_TTL_S = 120.0
POLL_S = 0.05  # how often the browser compares its table


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def serve(address: str, ttl_s: int, stop: asyncio.Event) -> None:
    identity = Identity.generate()
    body: dict[str, str] = {}  # filled once the port is known

    async def info(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, 0).start()
        port = runner.addresses[0][1]
        record = PeerRecord.create(identity, addresses=[f"http://{address}:{port}"], now=time.time(), ttl=RECORD_TTL_S)
        body.update(peer_id=identity.peer_id, record=base64.b64encode(record.to_bytes()).decode())
        config = MdnsConfig(interfaces=[address], browse=False, ttl_s=ttl_s)
        async with Mdns(config, advert=Advert(identity.peer_id, port, model="test", scheme="http")):
            say("ready", peer_id=identity.peer_id, port=port)
            await stop.wait()
    finally:
        await runner.cleanup()


async def browse(address: str, sweep_s: float, probe_ms: int, stop: asyncio.Event) -> None:
    table = PeerTable()
    config = MdnsConfig(interfaces=[address], advertise=False, sweep_interval_s=sweep_s, probe_timeout_ms=probe_ms)
    async with Mdns(config, table=table, transport=Transport(insecure_http=True)):
        say("ready")
        known: set[str] = set()
        while not stop.is_set():
            now = {record.peer_id for record in table.records(time.time())}
            for peer_id in sorted(now - known):
                say("added", peer_id=peer_id, t=time.time())
            for peer_id in sorted(known - now):
                say("removed", peer_id=peer_id, t=time.time())
            known = now
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass


async def main(argv: list[str]) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if argv[0] == "serve":
        await serve(argv[1], int(argv[2]), stop)
    else:
        await browse(argv[1], float(argv[2]), int(argv[3]), stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1:]))
