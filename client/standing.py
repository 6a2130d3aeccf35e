"""Each peer's standing for `swarm peers`: proven, pinned, private, accused, convicted.

What a listing alone says is thin: a record in a bootstrap peer's `/peers` is
one that peer proved (pending records are never listed). So `swarm peers` also
asks for itself:
- each peer's `/info`, dialled as the client would route to it (TLS pinned to
  its peer id): `pinned` says whether the peer at the record's address holds
  the record's key (`identity_mismatch` when someone else answered there), and
  `/info` says whether it is in a private swarm;
- every bootstrap peer's `GET /accusations`: charges it heard, and whom it
  convicted (a convicted peer is dropped from its table and barred).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from swarm.addresses import base_url
from swarm.errors import AddressRefused, IdentityMismatch, SwarmError
from swarm.records import PeerRecord
from swarm.transport import PinMismatch, Transport

DIALS_AT_ONCE = 16


@dataclass
class Standing:
    """One peer as this client sees it."""

    pinned: str = "-"  # "yes" (TLS, the record's key answered), "http" (plain, nothing pinned), "identity_mismatch", "unreachable"
    private: bool | None = None  # from its /info; None when it was not reached
    accusations: int = 0  # charges against it heard by the bootstrap peers asked
    convicted_by: list[str] = field(default_factory=list)  # bootstrap URLs that convicted it

    def to_json(self) -> dict[str, Any]:
        return {"pinned": self.pinned, "private": self.private, "accusations": self.accusations, "convicted_by": self.convicted_by}


async def standing(
    http: aiohttp.ClientSession, transport: Transport, records: list[PeerRecord], bootstrap: tuple[str, ...], timeout: float
) -> tuple[dict[str, Standing], dict[str, list[str]]]:
    """Standing of every peer of `records`, by peer id, and every peer the bootstrap peers convicted
    (listed or not: a convicted peer leaves their tables) with who convicted it. Dials concurrently."""
    result = {r.peer_id: Standing() for r in records}
    convicted: dict[str, list[str]] = {}
    gate = asyncio.Semaphore(DIALS_AT_ONCE)

    async def dial(record: PeerRecord) -> None:
        async with gate:
            mine = result[record.peer_id]
            mine.pinned, mine.private = await _dial(http, transport, record, timeout)

    async def charges(url: str) -> None:
        try:
            async with http.get(f"{url}/accusations", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                known = await response.json() if response.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, SwarmError):
            return  # an older or unreachable bootstrap peer: its charges are simply unknown
        for case in known.get("accusations", []):
            if isinstance(case, dict) and case.get("accused") in result:
                result[case["accused"]].accusations += 1
        for accused in known.get("convicted_peers", {}):
            convicted.setdefault(str(accused), []).append(url)
            if accused in result:
                result[accused].convicted_by.append(url)

    await asyncio.gather(*(dial(r) for r in records), *(charges(url) for url in bootstrap))
    return result, convicted


async def _dial(http: aiohttp.ClientSession, transport: Transport, record: PeerRecord, timeout: float) -> tuple[str, bool | None]:
    try:
        url = base_url(record.addresses[0])
    except (AddressRefused, IndexError):
        return "unreachable", None
    if not transport.allows(url):
        return "not dialled (http)", None
    try:
        async with http.get(f"{url}/info", ssl=transport.pin(record.peer_id), timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            info = await response.json() if response.status == 200 else {}
    except PinMismatch:
        return IdentityMismatch.code, None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, SwarmError):
        return "unreachable", None
    pinned = "yes" if url.startswith("https://") else "http"
    return pinned, bool(info.get("private")) if isinstance(info, dict) else None
