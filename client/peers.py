"""What a client knows of the swarm: records from bootstrap peers and, optionally, mDNS.

A client does not gossip; it asks its bootstrap peers for their tables (each
record verified) and, with mDNS, browses the LAN for a moment. The result is one
`PeerTable`, refreshed on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from swarm.discovery.mdns import Mdns, MdnsConfig
from swarm.discovery.peers_http import fetch_peers
from swarm.errors import AddressRefused, NoRoute, NotMember, PeerUnavailable
from swarm.peers import PeerTable, missing_ranges
from swarm.records import PeerRecord
from swarm.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryOptions:
    bootstrap: tuple[str, ...] = ()
    mdns: MdnsConfig | None = None
    mdns_wait_s: float = 3.0  # how long one mDNS browse listens
    timeout_s: float = 5.0


@dataclass
class SwarmView:
    """The client's table and how it was filled."""

    table: PeerTable = field(default_factory=PeerTable)
    unreachable: list[str] = field(default_factory=list)  # bootstrap URLs that did not answer


async def discover(http: aiohttp.ClientSession, options: DiscoveryOptions, view: SwarmView | None = None, transport: Transport | None = None) -> SwarmView:
    """Fill (or refresh) a view from every bootstrap peer and, if asked, an mDNS browse.

    Bootstrap URLs are dialled unpinned (their identity is not known yet): what they answer is
    signed records, each verified on its own; dials to the peers of those records are pinned."""
    view = view or SwarmView()
    if not options.bootstrap and options.mdns is None:
        raise NoRoute("no way to find peers: give a bootstrap URL or enable mDNS")
    transport = transport or Transport()
    for url in options.bootstrap:
        if not transport.allows(url):
            raise AddressRefused(f"bootstrap {url} is plain http: this client dials https only (--insecure-http, or insecure_http=True, allows it)")
    now = time.time()
    results = await asyncio.gather(*(fetch_peers(http, url, options.timeout_s) for url in options.bootstrap), return_exceptions=True)
    view.unreachable = []
    refused: list[NotMember] = []  # bootstrap peers of another swarm (private or open): a setup mistake
    for url, result in zip(options.bootstrap, results):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            if isinstance(result, NotMember):
                refused.append(result)
                log.info("bootstrap %s: %s", url, result)
            else:
                log.debug("bootstrap %s: %s", url, result)
            view.unreachable.append(url)
            continue
        for record in result:
            view.table.merge(record, now, source="bootstrap")
    if options.mdns is not None:
        async with Mdns(options.mdns, table=view.table, transport=transport):
            await asyncio.sleep(options.mdns_wait_s)  # browsing is listening: there is no event for "heard everyone"
    if options.bootstrap and len(view.unreachable) == len(options.bootstrap) and options.mdns is None:
        if refused:
            raise refused[0]  # say that it is the swarm key, not the network
        raise PeerUnavailable(f"no bootstrap peer answered: {', '.join(view.unreachable)}")
    view.table.expire(time.time())
    return view


def coverage_lines(table: PeerTable, now: float) -> list[str]:
    """One line per model: which blocks are served how many times, and which are missing."""
    lines = []
    models: dict[str, PeerRecord] = {}
    for record in table.records(now):
        if record.model_digest and record.span is not None:
            models.setdefault(record.model_digest, record)
    for digest, sample in sorted(models.items()):
        counts = table.coverage(digest, sample.num_layers, now)
        runs, start = [], 0
        for block in range(1, len(counts) + 1):
            if block == len(counts) or counts[block] != counts[start]:
                if counts[start]:
                    runs.append(f"{start}-{block - 1} x{counts[start]}")
                start = block
        missing = ", ".join(f"{a}-{b - 1}" for a, b in missing_ranges(counts)) or "none"
        name = f"{sample.model.get('architecture', '?')}-{sample.model.get('shape', '?')}-{digest[:12]}"
        lines.append(f"{name}: {sample.num_layers} blocks; served {', '.join(runs) or 'nowhere'}; missing {missing}")
    return lines
