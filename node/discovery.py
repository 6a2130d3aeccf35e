"""How a node is found: gossip with bootstrap peers (always) and mDNS on the LAN (opt-in).

One async context manager, so the server starts and stops discovery as a unit;
`leave()` is the first step of a graceful shutdown: the mDNS goodbye and a signed
`leaving` record go out before the node stops serving, so clients stop routing
to it while its sessions still finish.

Discovery dials only what the node chooses: its own HTTP session (a connector with its
own limits, apart from the pushes of sessions), bootstrap URLs, and peers whose records
were proven (swarm/discovery/proof.py) at addresses the node's `AddressPolicy` allows.
Records learned by gossip and by mDNS go through the same proof.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from swarm.addresses import AddressPolicy
from swarm.discovery.gossip import Gossip, GossipConfig
from swarm.discovery.mdns import Advert, Mdns, MdnsConfig
from swarm.discovery.proof import Prover
from swarm.peers import PeerTable, TableConfig
from swarm.records import PeerRecord
from swarm.transport import Transport

log = logging.getLogger(__name__)

_CONNECTIONS = 64  # discovery's own outbound connections, all hosts together
_CONNECTIONS_PER_HOST = 4  # one peer cannot hold more of them


@dataclass(frozen=True)
class DiscoveryConfig:
    gossip: GossipConfig = field(default_factory=GossipConfig)
    mdns: MdnsConfig | None = None  # None: no mDNS
    table: TableConfig = field(default_factory=lambda: TableConfig(require_proof=True))  # the node's PeerTable

    def limits(self) -> dict[str, Any]:
        """Every discovery limit, for /info."""
        gossip = {**self.gossip.limits(), "connections": _CONNECTIONS, "connections_per_host": _CONNECTIONS_PER_HOST}
        return {"table": self.table.limits(), "gossip": gossip}


class NodeDiscovery:
    """Gossip, the prover of new records and (optionally) mDNS of one node.

    `table` should be built with `config.table`. `http`, when given, is used for gossip and
    proofs (tests); by default discovery opens its own session with bounded connections.
    """

    def __init__(
        self,
        config: DiscoveryConfig,
        table: PeerTable,
        record: Callable[[bool], PeerRecord],  # record(leaving) -> this node's freshly signed record
        advert: Advert,
        http: aiohttp.ClientSession | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.transport = transport or Transport()
        self.table = table
        self._record = record
        self._advert = advert
        self._http = http
        self._stack = contextlib.AsyncExitStack()
        self.policy: AddressPolicy | None = None
        self.gossip: Gossip | None = None
        self.prover: Prover | None = None
        self.mdns: Mdns | None = None

    async def __aenter__(self) -> NodeDiscovery:
        own = self._record(False)
        self.policy = AddressPolicy.for_node(own.addresses[0], self.config.gossip.bootstrap, plain_http=self.transport.insecure_http)
        log.info("address policy: %s node", self.policy.reach.value)
        try:
            http = self._http
            if http is None:
                http = await self._stack.enter_async_context(
                    self.transport.client_session(limit=_CONNECTIONS, limit_per_host=_CONNECTIONS_PER_HOST)
                )
            self.table.merge(own, time.time(), source="self")
            if self.table.config.require_proof:
                self.prover = await self._stack.enter_async_context(
                    Prover(self.table, http, self.config.gossip.proof, self.policy, transport=self.transport)
                )
            self.gossip = await self._stack.enter_async_context(
                Gossip(
                    self.config.gossip, self.table, lambda: self._record(False), http, farewell=lambda: self._record(True), transport=self.transport
                )
            )
            if self.config.mdns is not None:
                self.mdns = await self._stack.enter_async_context(Mdns(self.config.mdns, table=self.table, advert=self._advert, transport=self.transport))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    async def leave(self) -> None:
        """Say goodbye everywhere now (idempotent); `__aexit__` then has nothing left to say."""
        await self._stack.aclose()

    async def moved(self, advert: Advert) -> None:
        """The node serves other blocks now: re-announce its mDNS advert (gossip re-signs its record by itself)."""
        self._advert = advert
        if self.mdns is not None and self.mdns.advertising:
            await self.mdns.update(advert)

    def limits(self) -> dict[str, Any]:
        """Discovery's limits and address policy, for /info."""
        policy = None if self.policy is None else self.policy.describe()
        return {**self.config.limits(), "address_policy": policy}
