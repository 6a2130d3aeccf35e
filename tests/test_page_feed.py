"""The map's live feed (`GET /swarm/events`, client/page.py) and its bounds, without node processes:
the server's bootstrap answers nobody, so its map is empty, which is all these tests need.

- a stream starts with a map event at once, and `GET /swarm/map` serves the same snapshot;
- a stranger in its own network namespace opening more streams than its per-source limit gets
  429 `busy` for the rest at once, while a client on another host still gets its stream; when the
  stranger's streams close, their slots are free again;
- a server shutting down ends its open streams at once (it does not wait out its shutdown timeout).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp

from client.page import FeedConfig
from client.serve import ServeConfig, run_server
from tests.netns import Lines, beside_attacker
from tests.nodes import swarm_client

NOBODY = "http://127.0.0.1:9"  # a bootstrap that never answers: an empty swarm


async def read_event(response: aiohttp.ClientResponse) -> tuple[str, dict]:
    buffer = b""
    while b"\n\n" not in buffer:
        chunk = await asyncio.wait_for(response.content.readany(), 10)
        assert chunk, "the stream ended"
        buffer += chunk
    head, _, data = buffer.split(b"\n\n", 1)[0].decode().partition("\ndata: ")
    return head.removeprefix("event: "), json.loads(data)


async def test_a_stream_starts_with_the_map_and_shutdown_ends_it_at_once() -> None:
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    server = asyncio.create_task(run_server(swarm_client(NOBODY), ServeConfig(port=0, watch_period_s=0.2), ready.set_result, stop))
    url = await asyncio.wait_for(ready, 60)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/swarm/map") as response:
            snap = await response.json()
        assert snap["num_layers"] == 30 and snap["nodes"] == [] and snap["holes"] == [[0, 30]] and snap["api_key_required"] is False
        async with http.get(f"{url}/") as response:
            assert response.status == 200 and "swarm map" in await response.text()
        async with http.get(f"{url}/static/app.js") as response:
            assert response.status == 200 and "readEvents" in await response.text()
        async with http.get(f"{url}/swarm/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            name, first = await read_event(response)
            assert name == "map" and first["holes"] == [[0, 30]]
            while first["watch"]["rounds"] < 1:  # the watch ran a round (its bootstrap failed: said, not fatal)
                name, first = await read_event(response)
            assert first["watch"]["bootstrap_ok"] is False
            began = time.monotonic()
            stop.set()
            await asyncio.wait_for(server, 30)
            assert time.monotonic() - began < 10  # not the 60 s of aiohttp's shutdown timeout


def test_a_stream_flood_from_one_source_is_busy_and_another_client_still_gets_the_map(lan_factory) -> None:
    lan = lan_factory(3)
    home, stranger, user = lan.hosts
    limit = FeedConfig().max_streams_per_source
    argv = [sys.executable, "-m", "client.cli", "serve", "--host", home.address, "--port", "8000", "--no-api-key", "--bootstrap", NOBODY, "--insecure-http"]
    server = lan.run_in(home, argv, stderr=subprocess.STDOUT)
    line = Lines(server.stdout).expect(lambda line: line.startswith("ready url="), 120)
    url = line.split()[1].removeprefix("url=")

    def legit() -> dict:
        client = lan.run_in(user, [sys.executable, "-m", "tests.map_feed_parties", "legit", url], stderr=subprocess.STDOUT)
        answer = Lines(client.stdout).expect(lambda line: line.startswith("{"), 60)
        assert client.wait(30) == 0
        return json.loads(answer)

    flood = [sys.executable, "-m", "tests.map_feed_parties", "flood", url, str(2 * limit)]
    seen_by_user, seen_by_stranger = beside_attacker(lan, stranger, flood, legit)
    assert seen_by_stranger == {"admitted": limit, "refused": [[429, "busy"]] * limit}
    assert seen_by_user["status"] == 200 and seen_by_user["num_layers"] == 30

    # the stranger's streams closed with it: its slots are free again
    again = [sys.executable, "-m", "tests.map_feed_parties", "flood", url, str(limit)]
    _, seen_again = beside_attacker(lan, stranger, again, lambda: None)
    assert seen_again == {"admitted": limit, "refused": []}
