"""Processes for the Sybil-flood test (tests/test_attack_discovery.py), each run inside a namespace.

    trap HOST PORT                 listen on HOST:PORT: print "listening URL", then "hit METHOD PATH"
                                   per request; proof requests get an answer without the record's key
    flood COUNT ADDRESSES TARGET.. POST COUNT records from fresh keys to each TARGET, addresses cycling
                                   through the comma-separated ADDRESSES; print one JSON line of statuses
    listed TIMEOUT IDS URL..       wait until every URL's GET /peers lists exactly the comma-separated IDS;
                                   print the seconds it took (exit 1 with the tables on timeout)
    generate BOOTSTRAP TOKENS      greedy generation through the swarm; print the token ids as JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import warnings

import aiohttp
from aiohttp import web

from swarm import wire
from swarm.discovery.peers_http import fetch_peers
from swarm.identity import Identity
from swarm.records import PeerRecord

PROMPT = "Write a short poem about the sea."
MAX_FRAME = 1 << 20


async def trap(host: str, port: int) -> None:
    async def any_request(request: web.Request) -> web.Response:
        print(f"hit {request.method} {request.path}", flush=True)
        if request.path == "/peers/proof":  # answers, but not with the key of the record that named it
            stranger = Identity.generate()
            body = {"type": "proof", "peer_id": stranger.peer_id, "addresses": [], "signature": bytes(64)}
            return web.Response(body=wire.encode(body), content_type="application/msgpack")
        return web.Response(text="admin: ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"listening http://{host}:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def bogus_records(count: int, addresses: list[str]) -> list[dict]:
    now = time.time()
    return [PeerRecord.create(Identity.generate(), addresses=(addresses[i % len(addresses)],), now=now, ttl=60.0).to_wire() for i in range(count)]


async def flood(count: int, addresses: list[str], targets: list[str]) -> None:
    statuses = {}
    async with aiohttp.ClientSession() as http:
        for target in targets:
            records = bogus_records(count, addresses)
            frames, frame = [], []
            for record in records:  # frames of at most MAX_FRAME bytes, as a node accepts
                frame.append(record)
                if len(wire.encode({"type": "peers", "records": frame})) > MAX_FRAME - 4096:
                    frames.append(frame[:-1])
                    frame = [record]
            frames.append(frame)
            for chunk in frames:
                async with http.post(f"{target}/peers", data=wire.encode({"type": "peers", "records": chunk})) as response:
                    statuses.setdefault(target, []).append(response.status)
                    await response.read()
    print(json.dumps(statuses), flush=True)


async def listed(timeout: float, ids: set[str], urls: list[str]) -> int:
    began = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while True:
            tables = {}
            for url in urls:
                try:
                    tables[url] = {record.peer_id for record in await fetch_peers(http, url, 5.0)}
                except Exception as error:  # noqa: BLE001 - a node still starting: keep polling
                    tables[url] = {type(error).__name__}
            if all(table == ids for table in tables.values()):
                print(f"{time.monotonic() - began:.2f}", flush=True)
                return 0
            if time.monotonic() - began > timeout:
                print(json.dumps({url: sorted(table) for url, table in tables.items()}), flush=True)
                return 1
            await asyncio.sleep(0.1)  # other processes' tables: nothing to await across processes


async def generate(bootstrap: str, tokens: int) -> None:
    from client.sampling import SamplingParams
    from client.swarm import ClientConfig, SwarmModel
    from swarm.model import DEFAULT_MODEL
    from tests.nodes import refresh

    model = SwarmModel(DEFAULT_MODEL, insecure_http=True, bootstrap=[bootstrap], config=ClientConfig(wire_dtype="float32"))
    await refresh(model)
    stats = None
    params = SamplingParams(max_new_tokens=tokens, stop_at_eos=False)
    async for _, stats, _ in model.stream_result(model.head.encode_prompt(PROMPT, chat=True), params, None):
        pass
    print(json.dumps({"tokens": stats.token_ids}), flush=True)


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    command, args = argv[0], argv[1:]
    if command == "trap":
        asyncio.run(trap(args[0], int(args[1])))
    elif command == "flood":
        asyncio.run(flood(int(args[0]), args[1].split(","), args[2:]))
    elif command == "listed":
        return asyncio.run(listed(float(args[0]), set(args[1].split(",")), args[2:]))
    elif command == "generate":
        asyncio.run(generate(args[0], int(args[1])))
    else:
        raise SystemExit(f"unknown command {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
