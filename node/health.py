"""`python -m node.health [URL]`: exit 0 when URL answers 200, 1 otherwise: a container's healthcheck.

The images (docker/) run it as their HEALTHCHECK against the node's own `/info`. A node serves
TLS with a self-signed certificate that carries its identity key (swarm/transport.py), so the
probe dials through the same `Transport` as every party: encrypted, unpinned (it dials its own
container), and, with `--swarm-key`, proving a private swarm's key, without which a private
node answers every route, `/info` included, with 401. `swarm serve` is probed the same way
(plain http, `--api-key-file` for its /v1 routes). A one-line reason goes to stderr, which
`docker inspect` shows; nothing else is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

from swarm.errors import SwarmError

DEFAULT_URL = "https://127.0.0.1:7000/info"  # the port the images' default command listens on


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node.health", description="Exit 0 when URL answers 200 (a container's healthcheck), else 1 with the reason on stderr."
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"what to GET (default {DEFAULT_URL}: a node's /info)")
    parser.add_argument("--swarm-key", type=Path, default=None, metavar="FILE", help="prove this private swarm's key, as the node's peers do (a private node refuses /info without it)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE", help="send `Authorization: Bearer` with the key in FILE (`swarm serve --api-key-file`)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="the whole request (default 5)")
    return parser


async def probe(url: str, swarm_key: Path | None, api_key_file: Path | None, timeout_s: float) -> int:
    """The status `url` answers with, through the party's own transport."""
    from swarm.membership import Membership
    from swarm.swarm_key import SwarmKey
    from swarm.transport import Transport

    membership = Membership(SwarmKey.load(swarm_key)) if swarm_key is not None else None
    transport = Transport(insecure_http=url.lower().startswith("http://"), membership=membership)
    headers = {"Authorization": f"Bearer {api_key_file.read_text().strip()}"} if api_key_file is not None else {}
    async with (
        transport.client_session(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
        http.get(url, headers=headers, allow_redirects=False) as response,
    ):
        await response.read()
        return response.status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = asyncio.run(probe(args.url, args.swarm_key, args.api_key_file, args.timeout))
    except (SwarmError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
        print(f"unhealthy: {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {args.url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
