"""What proving a swarm key costs (swarm/membership.py), against the open swarm, same run.

On loopback plain http, one small app like a node's (the membership check first):
- `membership_request_us`: a request on a kept-alive connection, the peer's challenge
  cached (the steady state of gossip and of repeated requests to one peer);
- `membership_first_contact_us`: a new session each time: connect, ask a challenge (one
  more round trip, private only), request;
- `membership_check_us`: the node's check and answer alone (pure: two HMACs, a challenge).

    python -m benchmarks.membership_cost [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
from aiohttp import web

from benchmarks.common import emit
from swarm.membership import (
    Membership,
    client_proof,
    format_proof,
    open_client_middleware,
    open_server_middleware,
    server_answer,
)
from swarm.swarm_key import SwarmKey


async def _hello(request: web.Request) -> web.Response:
    return web.Response(body=b"hello")


async def _serve(membership: Membership | None) -> tuple[web.AppRunner, str]:
    app = web.Application()
    if membership is not None:
        membership.install(app)
    else:
        app.middlewares.append(open_server_middleware)
    app.router.add_get("/hello", _hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _session(membership: Membership | None) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(middlewares=(membership.client_middleware if membership else open_client_middleware,))


async def _timed(url: str, membership: Membership | None, requests: int, fresh: bool) -> float:
    """Seconds per request: all on one session, or each on a fresh one (`fresh`)."""
    async with _session(membership) as warm:
        async with warm.get(url + "/hello") as response:  # connection and challenge in place
            await response.read()
        began = time.perf_counter()
        for _ in range(requests):
            if fresh:
                async with _session(Membership(membership.key) if membership else None) as http, http.get(url + "/hello") as response:
                    await response.read()
            else:
                async with warm.get(url + "/hello") as response:
                    await response.read()
        return (time.perf_counter() - began) / requests


async def run(requests: int) -> None:
    key = SwarmKey.generate()
    node = Membership(key)
    for name, membership in (("open", None), ("private", Membership(key))):
        runner, url = await _serve(node if membership else None)
        try:
            for fresh, metric, count in ((False, "membership_request_us", requests), (True, "membership_first_contact_us", requests // 10)):
                seconds = await _timed(url, membership, count, fresh)
                emit(metric, seconds * 1e6, "us", {"swarm": name, "requests": count, "transport": "http loopback"})
        finally:
            await runner.cleanup()

    # the node's own work per request, without the network
    checks = 20_000
    began = time.perf_counter()
    for _ in range(checks):
        challenge, nonce = node.challenges.issue(time.time()), os.urandom(16)
        node.admit("GET", "/hello", nonce, format_proof(challenge, client_proof(key, challenge, nonce, "GET", "/hello")))
        server_answer(key, nonce, "GET", "/hello", 200, node.challenges.issue(time.time()))
    emit("membership_check_us", (time.perf_counter() - began) / checks * 1e6, "us", {"checks": checks, "includes": "client proof too"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement (default 2000; first contacts: a tenth)")
    asyncio.run(run(parser.parse_args().requests))


if __name__ == "__main__":
    main()
