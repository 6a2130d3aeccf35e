"""When a node uses relays: the driver `keep_reachable`, run once per node (node/server.py).

- `--relay off`: never.
- A node whose own URL is loopback (a laptop or test swarm) is dialable by everyone who can
  reach it at all: no check, no relay (unless `--relay-always`).
- Otherwise the node asks a bootstrap peer, then proven peers, to dial it back
  (node/reachability.py). Only if that finds it undialable (or with `--relay-always`) does it
  hold relays (node/relay_link.py), and then it stops offering relaying itself.

Candidates: the operator's `--relay URL`s in the operator's order (their peer ids read from
their `/info`, unpinned: the operator chose them; every later dial is pinned), or in auto mode
proven peers of the node's table whose records offer relaying, at addresses its policy dials:
the 8 longest proven, nearest (measured round trip) first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from node.relay_config import RelayTarget
from node.relay_link import RelayLink
from swarm.addresses import Reach, base_url, reach_of
from swarm.errors import AddressRefused, SwarmError
from swarm.transport import Transport, round_trip

if TYPE_CHECKING:
    from node.accept import GuardedRunner
    from node.state import NodeState

log = logging.getLogger(__name__)

CHECK_ATTEMPTS = 5  # rounds of asking, while nobody answers (the bootstrap peer may start after us)
CHECK_RETRY_S = 2.0
PROBED = 8  # auto mode: candidates whose round trip is measured before choosing


async def keep_reachable(state: NodeState, runner: GuardedRunner) -> None:
    config = state.config.relay
    if config.mode == "off":
        return
    if not config.always:
        if reach_of(state.url) is Reach.LOOPBACK:
            state.reachable = True
            return
        state.reachable = await _ask(state)
        log.info("dial-back check: %s", {True: "dialable", False: "not dialable", None: "nobody answered"}[state.reachable])
        if state.reachable is not False:
            return
    state.relay_host.enabled = False  # a node that cannot be dialled relays for nobody
    state.relay_link = RelayLink(config, state.identity, state.config.transport, runner.reverse, on_change=lambda: _announce(state))
    await state.relay_link.run(lambda: relay_candidates(state))


async def _ask(state: NodeState) -> bool | None:
    port = urlsplit(state.url).port or 0
    async with state.config.transport.client_session(limit=4) as http:
        for _ in range(CHECK_ATTEMPTS):
            answer = await state.reach.check(http, _checkers(state), port, state.identity.peer_id)
            if answer is not None:
                return answer
            await asyncio.sleep(CHECK_RETRY_S)
    return None


def _checkers(state: NodeState) -> list[tuple[str, str | None]]:
    """Bootstrap peers first (unpinned: the operator chose them), then proven peers that are not relayed."""
    own = state.identity.peer_id
    found: list[tuple[str, str | None]] = [(base_url(url), None) for url in state.config.discovery.gossip.bootstrap]
    for record in state.table.records(time.time()):
        if record.peer_id != own and not record.relayed and state.discovery is not None and state.discovery.policy.allows(record.addresses[0]):
            found.append((base_url(record.addresses[0]), record.peer_id))
    return found[:6]


def _announce(state: NodeState) -> None:
    """The node's addresses changed (a relay came or went): peers must hear it now, not next round."""
    if state.discovery is not None and state.discovery.gossip is not None:
        state.discovery.gossip.kick()


async def relay_candidates(state: NodeState) -> list[RelayTarget]:
    config = state.config.relay
    if config.mode == "urls":
        return [t for t in await asyncio.gather(*(_operator_relay(state, url) for url in config.urls)) if t is not None]
    own = state.identity.peer_id
    policy = state.discovery.policy if state.discovery is not None else None
    records = [
        r
        for r in state.table.records(time.time())
        if r.offers_relay and not r.relayed and r.peer_id != own and (policy is None or policy.allows(r.addresses[0]))
    ]
    records.sort(key=lambda r: state.table.standing(r.peer_id) or float("inf"))  # longest proven first
    return await nearest_first(state.config.transport, [RelayTarget(r.peer_id, base_url(r.addresses[0])) for r in records])


async def nearest_first(transport: Transport, targets: list[RelayTarget], probed: int = PROBED) -> list[RelayTarget]:
    """The first `probed` targets by measured round trip (`round_trip`: pinned, the faster of two),
    those that did not answer left out; then the rest in their order. Every connection to the
    node crosses its relay twice (dialler -> relay -> node), so a near relay is worth the probe."""
    head, rest = targets[:probed], targets[probed:]
    async with transport.client_session(limit=len(head) + 1) as http:
        rtts = await asyncio.gather(*(_round_trip(http, target, transport) for target in head))
    answered = sorted((rtt, index) for index, rtt in enumerate(rtts) if rtt is not None)
    log.debug("relay candidates' round trips: %s", {head[i].peer_id[:8]: round(rtt * 1e3, 2) for rtt, i in answered})
    return [head[index] for _, index in answered] + rest


async def _round_trip(http: aiohttp.ClientSession, target: RelayTarget, transport: Transport) -> float | None:
    try:
        return await round_trip(http, target.url, target.peer_id, transport)
    except SwarmError:  # refused by policy or a private swarm's check: not a relay for us
        return None


async def _operator_relay(state: NodeState, url: str) -> RelayTarget | None:
    """The relay at an operator-given URL: its peer id, from its own /info."""
    try:
        canonical = base_url(url)
        async with state.config.transport.client_session(limit=1) as http:
            async with http.get(f"{canonical}/info", ssl=False, timeout=aiohttp.ClientTimeout(total=5.0)) as response:
                info = await response.json()
        peer_id = info.get("peer_id") if isinstance(info, dict) else None
        return RelayTarget(peer_id, canonical) if isinstance(peer_id, str) else None
    except (AddressRefused, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        log.info("relay %s did not answer: %s", url, type(exc).__name__)
        return None
