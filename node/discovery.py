"""How a node is found: gossip with bootstrap peers (always) and mDNS on the LAN (opt-in).

One async context manager, so the server starts and stops discovery as a unit;
`leave()` is the first step of a graceful shutdown: the mDNS goodbye and a signed
`leaving` record go out before the node stops serving, so clients stop routing
to it while its sessions still finish.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from swarm.discovery.gossip import Gossip, GossipConfig
from swarm.discovery.mdns import Advert, Mdns, MdnsConfig
from swarm.peers import PeerRecord, PeerTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryConfig:
    gossip: GossipConfig = field(default_factory=GossipConfig)
    mdns: MdnsConfig | None = None  # None: no mDNS


class NodeDiscovery:
    def __init__(
        self,
        config: DiscoveryConfig,
        table: PeerTable,
        record: Callable[[bool], PeerRecord],  # record(leaving) -> this node's freshly signed record
        advert: Advert,
        http: aiohttp.ClientSession,
    ) -> None:
        self.config = config
        self.table = table
        self._record = record
        self._advert = advert
        self._http = http
        self._stack = contextlib.AsyncExitStack()
        self.gossip: Gossip | None = None
        self.mdns: Mdns | None = None

    async def __aenter__(self) -> NodeDiscovery:
        self.table.merge(self._record(False), time.time(), source="self")
        self.gossip = await self._stack.enter_async_context(
            Gossip(self.config.gossip, self.table, lambda: self._record(False), self._http, farewell=lambda: self._record(True))
        )
        if self.config.mdns is not None:
            self.mdns = await self._stack.enter_async_context(Mdns(self.config.mdns, table=self.table, advert=self._advert))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    async def leave(self) -> None:
        """Say goodbye everywhere now (idempotent); `__aexit__` then has nothing left to say."""
        await self._stack.aclose()

