"""Proof of address and key: a record counts only once its address answered with its key.

Anyone can sign a record with a fresh key and any address; such a record alone proves
nothing. So a node that hears of a new peer (or of a new address of a known one) holds
the record pending (`PeerTable`) and dials the record's first address once:
`GET /peers/proof?nonce=<64 hex>`, where the nonce is 32 fresh random bytes. The peer
there answers `{"type": "proof", "peer_id", "addresses", "signature"}`: its own record's
addresses and an Ed25519 signature, with its identity key, over

    PROOF_TAG + nonce + msgpack(addresses)

The dialler checks the signature against the pending record's key and that the address
it dialled is among the signed addresses (a relay that forwards the request to an honest
node gets that node's own addresses signed, not its own), then `settle`s the record.

- `proof_answer`: the answering side (mounted by `peers_routes`).
- `Prover`: the dialling side, a task the node owns: it proves each pending record as
  soon as it arrives, at most `concurrency` at once, each within `timeout_s`, only to
  addresses the node's `AddressPolicy` allows, never following redirects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import msgpack

from swarm import wire
from swarm.addresses import AddressPolicy, base_url, check_dialable
from swarm.errors import AddressRefused, BadRequest, IdentityMismatch, PeerUnavailable, SignatureInvalid, SwarmError
from swarm.identity import Identity, verify
from swarm.peers import PeerTable
from swarm.records import MAX_ADDRESSES, PeerRecord
from swarm.transport import PinMismatch, Transport

log = logging.getLogger(__name__)

PROOF_PATH = "/peers/proof"
PROOF_TAG = b"layerswarm/address-proof/v1\n"  # domain separation: a proof signs nothing a record could be
NONCE_BYTES = 32
MAX_PROOF_BYTES = 4096  # an answer is ~300 bytes; anything bigger is not a proof


@dataclass(frozen=True)
class ProofConfig:
    concurrency: int = 16  # proofs in flight at once
    timeout_s: float = 2.0  # one proof, connect to last byte

    def __post_init__(self) -> None:
        if not (self.concurrency >= 1 and self.timeout_s > 0):
            raise ValueError("proof concurrency must be at least 1 and its timeout positive")


def proof_payload(nonce: bytes, addresses: list[str] | tuple[str, ...]) -> bytes:
    return PROOF_TAG + nonce + msgpack.packb(list(addresses), use_bin_type=True)


def proof_answer(identity: Identity, own: PeerRecord, nonce_hex: str) -> dict[str, Any]:
    """The answer to a proof request for `nonce_hex`, signed by `identity`, naming `own`'s addresses."""
    nonce = parse_nonce(nonce_hex)
    signature = identity.sign(proof_payload(nonce, own.addresses))
    return {"type": "proof", "peer_id": identity.peer_id, "addresses": list(own.addresses), "signature": signature}


def parse_nonce(nonce_hex: object) -> bytes:
    if not isinstance(nonce_hex, str) or len(nonce_hex) != 2 * NONCE_BYTES:
        raise BadRequest(f"nonce must be {2 * NONCE_BYTES} hex digits")
    try:
        return bytes.fromhex(nonce_hex)
    except ValueError:
        raise BadRequest(f"nonce must be {2 * NONCE_BYTES} hex digits") from None


def check_proof(message: dict[str, Any], record: PeerRecord, address: str, nonce: bytes) -> None:
    """Raise unless `message` proves that `record`'s key answers at `address` for `nonce`."""
    if message.get("type") != "proof":
        raise BadRequest("expected a proof message")
    peer_id = wire.field(message, "peer_id", str)
    addresses = wire.field(message, "addresses", list)
    signature = wire.field(message, "signature", bytes)
    if peer_id != record.peer_id:
        raise SignatureInvalid("the peer at the address is another peer")
    if not 1 <= len(addresses) <= MAX_ADDRESSES or not all(isinstance(a, str) for a in addresses):
        raise BadRequest("proof addresses are not a short list of strings")
    if not verify(record.public_key, signature, proof_payload(nonce, addresses)):
        raise SignatureInvalid("the proof is not signed by the record's key")
    signed = set()
    for signed_address in addresses:
        try:
            signed.add(base_url(signed_address))
        except AddressRefused:
            continue
    if base_url(address) not in signed:
        raise SignatureInvalid("the peer does not claim the address it was reached at")


class Prover:
    """Proves the pending records of `table` as they arrive; an async context manager.

    Installs itself as the table's `on_pending` and, with a `policy`, as its `dialable`
    filter. `http` belongs to the caller. `stats` counts outcomes ("proven", and each
    failure by its wire code).
    """

    def __init__(
        self,
        table: PeerTable,
        http: aiohttp.ClientSession,
        config: ProofConfig | None = None,
        policy: AddressPolicy | None = None,
        clock: Callable[[], float] = time.time,
        *,
        transport: Transport | None = None,
    ) -> None:
        self.transport = transport or Transport()  # the dial is pinned to the record's own peer id
        self.table = table
        self.config = config or ProofConfig()
        self.policy = policy
        self._http = http
        self._clock = clock
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._in_flight: set[tuple[str, str]] = set()  # (peer id, address)
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.stats: Counter[str] = Counter()
        self._settled = asyncio.Condition()

    async def __aenter__(self) -> Prover:
        self.table.on_pending = self._wake.set
        if self.policy is not None:
            self.table.dialable = self.policy.allows
        self._task = asyncio.create_task(self._run(), name="prover")
        self._task.add_done_callback(_log_crash)
        self._wake.set()  # records may have arrived before we started
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.table.on_pending = None
        tasks = [task for task in (self._task, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_settled(self, count: int) -> None:
        """Wait until `count` proofs in all have finished (for tests and tools)."""
        async with self._settled:
            await self._settled.wait_for(lambda: sum(self.stats.values()) >= count)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for record in self.table.pending():
                key = (record.peer_id, record.addresses[0])
                if key in self._in_flight:
                    continue
                await self._slots.acquire()
                self._in_flight.add(key)
                task = asyncio.create_task(self._prove(record), name=f"proof {record.peer_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _prove(self, record: PeerRecord) -> None:
        address = record.addresses[0]
        try:
            try:
                await self.prove(record)
            except SwarmError as error:
                self.stats[error.code] += 1
                log.debug("proof of %s at %s failed: %s: %s", record.peer_id, address, error.code, error)
                self.table.settle(record.peer_id, address, False, self._clock())
            else:
                self.stats["proven"] += 1
                self.table.settle(record.peer_id, address, True, self._clock())
        finally:
            self._in_flight.discard((record.peer_id, address))
            self._slots.release()
            async with self._settled:
                self._settled.notify_all()
            self._wake.set()  # a newer pending record may have waited for this one

    async def prove(self, record: PeerRecord) -> None:
        """Dial `record`'s first address once; raise a typed error unless the peer there proves the record's key."""
        address = record.addresses[0]
        url = check_dialable(address, self.policy) if self.policy is not None else base_url(address)
        nonce = os.urandom(NONCE_BYTES)
        try:
            async with self._http.get(
                f"{url}{PROOF_PATH}",
                params={"nonce": nonce.hex()},
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                ssl=self.transport.pin(record.peer_id),  # over TLS the handshake itself proves the key
            ) as response:
                if response.status != 200:
                    raise PeerUnavailable(f"the address answered HTTP {response.status}, not a proof")
                if response.content_length is not None and response.content_length > MAX_PROOF_BYTES:
                    raise BadRequest("the proof answer is too large")
                body = await response.content.read(MAX_PROOF_BYTES + 1)
        except PinMismatch:
            raise IdentityMismatch("another identity answered at the address") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            raise PeerUnavailable("the address did not answer a proof request") from None
        if len(body) > MAX_PROOF_BYTES:
            raise BadRequest("the proof answer is too large")
        check_proof(wire.decode(body, MAX_PROOF_BYTES), record, url, nonce)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("prover stopped: new peers will stay pending", exc_info=task.exception())
