"""A stranger without the swarm key hammering a private node, run inside its own namespace (a test helper).

    membership_attacker.py URL CONNECTIONS

Prints `ready` once its workers run and keeps attacking until a line arrives on stdin
(tests/netns.py `beside_attacker`). Each of CONNECTIONS workers holds its own connection and loops over:
GET /info, POST /peers (a record frame's worth of bytes), a websocket to /session and a
request with a forged proof. Prints one JSON line at the end:
{"status": {"401": n, "503": m, ...}, "errors": k}: HTTP statuses seen, and exchanges that
ended without one (a connection refused at the door and closed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections import Counter

import aiohttp


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _worker(url: str, stop: asyncio.Event, status: Counter, errors: list[int]) -> None:
    forged = {"Swarm-Nonce": _b64(os.urandom(16)), "Swarm-Proof": f"{_b64(os.urandom(40))}.{_b64(os.urandom(32))}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        while not stop.is_set():
            for method, path, body, headers in (
                ("GET", "/info", None, None),
                ("POST", "/peers", os.urandom(2048), {"Content-Type": "application/msgpack"}),
                ("WS", "/session", None, None),
                ("GET", "/peers", None, forged),
            ):
                try:
                    if method == "WS":
                        try:
                            ws = await http.ws_connect(url + path, timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
                        except aiohttp.WSServerHandshakeError as refused:
                            status[str(refused.status)] += 1
                        else:
                            status["101"] += 1
                            await ws.close()
                        continue
                    async with http.request(method, url + path, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
                        await response.read()
                        status[str(response.status)] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    errors[0] += 1
                    await asyncio.sleep(0.01)  # refused at the door: the next try opens a new connection


async def main(url: str, connections: int) -> None:
    status: Counter = Counter()
    errors = [0]
    stop = asyncio.Event()
    workers = asyncio.gather(*(_worker(url, stop, status, errors) for _ in range(connections)))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the test says when its client is done
    stop.set()
    await workers
    print(json.dumps({"status": dict(status), "errors": errors[0]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
