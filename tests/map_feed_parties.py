"""Parties of tests/test_page_feed.py, each run inside its own network namespace.

    python -m tests.map_feed_parties flood URL N   # opens N map streams at once, prints `ready`, holds
                                                   # them until a line on stdin, then prints what it saw
    python -m tests.map_feed_parties legit URL     # one stream: its status and first map event

Each prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp


async def first_map(response: aiohttp.ClientResponse) -> dict:
    """The first `map` event of a stream, parsed."""
    buffer = b""
    while b"\n\n" not in buffer:
        chunk = await response.content.readany()
        if not chunk:
            raise ConnectionError("stream ended before a map event")
        buffer += chunk
    event = buffer.split(b"\n\n", 1)[0].decode()
    assert event.startswith("event: map\n"), event
    return json.loads(event.split("data: ", 1)[1])


async def open_stream(http: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    response = await http.get(f"{url}/swarm/events", timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    if response.status != 200:
        body = await response.json()
        response.release()
        return response.status, body["error"]["code"]
    return 200, (response, await asyncio.wait_for(first_map(response), 10))


async def flood(url: str, count: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(open_stream(http, url) for _ in range(count)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        admitted = [r for s, r in results if s == 200]
        for response, _ in admitted:
            response.close()
        refused = [[s, r] for s, r in results if s != 200]
        print(json.dumps({"admitted": len(admitted), "refused": refused}), flush=True)


async def legit(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        status, result = await open_stream(http, url)
        if status != 200:
            print(json.dumps({"status": status, "code": result}), flush=True)
            return
        response, snap = result
        response.close()
        print(json.dumps({"status": status, "num_layers": snap["num_layers"], "model": snap["model"]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "flood":
        asyncio.run(flood(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(legit(sys.argv[2]))
