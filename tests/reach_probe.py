"""A stranger asking a node for dial-backs, run inside its own namespace.

Usage: python -m tests.reach_probe CHECKER_URL LISTEN_HOST PORT COUNT
Listens on LISTEN_HOST:PORT (plain TCP, counting who connects), asks the checker COUNT
times in a row to dial it back (`POST /reach`, a random peer id), and prints one JSON
line: the HTTP statuses, the `observed` addresses answered, and the dial-backs that came.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp

from swarm import wire
from swarm.identity import Identity


async def main(url: str, host: str, port: int, count: int) -> None:
    arrived: list[str] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(accepted, host, port)
    statuses, observed = [], []
    async with aiohttp.ClientSession() as http:
        for _ in range(count):
            body = wire.encode({"type": "reach", "peer_id": Identity.generate().peer_id, "port": port, "nonce": os.urandom(16)})
            async with http.post(f"{url}/reach", data=body, ssl=False) as response:
                statuses.append(response.status)
                if response.status == 200:
                    observed.append(wire.decode(await response.read())["observed"])
    server.close()
    print(json.dumps({"statuses": statuses, "observed": observed, "dialled_back_from": arrived}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
