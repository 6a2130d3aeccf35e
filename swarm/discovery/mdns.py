"""LAN discovery over mDNS / DNS-SD (python-zeroconf's asyncio API).

A node advertises the service `_layerswarm._tcp.local.` under its peer id. The TXT record
carries only hints (peer id, model short id, span, port, protocol version, scheme): none of
it is trusted. A browser resolves each service, fetches `GET /info` from the advertised
address (over TLS pinned to the advertised peer id, swarm/transport.py; plain http only
when the browser's transport allows it) and merges the signed `PeerRecord` found there
into its `PeerTable`, which verifies it.
The TXT peer id must equal the record's, so one host cannot make another's record ride
on its own service (its goodbye would then remove the other peer).

Why our own liveness sweep. zeroconf (checked on 0.154) raises every PTR TTL it receives
to at least 1125 s (`_DNS_PTR_MIN_TTL`, against query storms), and a browser reports
`Removed` only when the PTR leaves its cache: a node that crashes without a goodbye would
stay "present" for ~19 minutes whatever TTL it announced. So:
- the advertiser gives all its records a short TTL (`MdnsConfig.ttl_s`, 15 s by default,
  instead of zeroconf's 120 s host / 4500 s other) and re-broadcasts them every ttl/3,
  since zeroconf never re-announces on its own and a browser only re-queries PTRs;
- the browser, every `sweep_interval_s`, checks each service it knows: an SRV/TXT/A still
  live in its cache costs nothing; an expired one is asked for once on the network
  (`AsyncServiceInfo.async_request`, `probe_timeout_ms`); no answer means the node is gone
  and its peer leaves the table. A crashed node is gone from tables after at most its own
  ttl_s plus the browser's sweep_interval_s and probe_timeout_ms (`removal_bound_s`).
  A goodbye (`Removed`) removes it at once.
- The sweep also re-fetches `/info` when the table's copy of a record passed half its
  lifetime, so LAN peers stay fresh without gossip.

Loopback. Linux `lo` has no MULTICAST flag, yet zeroconf bound to `interfaces=["127.0.0.1"]`
sends and receives 224.0.0.251 between processes on the same host (verified on Linux 6.x,
no `ip link set lo multicast on` needed); `lo` must be up, which it is not in a fresh
network namespace.

Only mDNS-learned peers are removed on goodbye or expiry: anyone on the LAN can forge a
goodbye, and a peer known through gossip keeps its own signed expiry.

Private swarms (a transport with a swarm key, swarm/membership.py) advertise another service
type, `_layerswarm-p._tcp.local.`, which open nodes never browse, and say nothing of
themselves: the TXT holds only the peer id (the instance name, so a fetch can be pinned to
it), scheme, protocol version and `tag`, an HMAC under the swarm key of the peer id, scheme
and port: no model, no span, no record. A member's browser fetches `/info` (which proves the
key both ways) only from services whose tag holds, so outsiders are ignored, and outsiders
learn nothing they could join with: `/info` refuses them, and members of another swarm fail
the tag.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from zeroconf import InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm.errors import NotMember, SwarmError
from swarm.identity import is_peer_id
from swarm.peers import PeerTable, refusal_reason
from swarm.records import PROTOCOL_VERSION, PeerRecord
from swarm.swarm_key import SwarmKey
from swarm.transport import PinMismatch, Transport

log = logging.getLogger(__name__)

SERVICE_TYPE = "_layerswarm._tcp.local."
PRIVATE_SERVICE_TYPE = "_layerswarm-p._tcp.local."  # private swarms: open nodes never browse it
SOURCE = "mdns"  # the `source` given to PeerTable.merge
MAX_MODEL_ID_CHARS = 64  # the TXT model hint; a whole TXT record stays well under one packet
MAX_URL_TRIES = 3  # addresses tried per service: an advertiser cannot make us fetch many URLs
_ADVERT_TAG = b"layerswarm/mdns-advert/v1\n"  # domain separation from the key's other MACs
MAX_SERVICES = 1024  # services tracked at once: a noisy LAN cannot grow our state without bound


@dataclass(frozen=True)
class MdnsConfig:
    """How this node uses mDNS. Built once by the cli.

    `interfaces` is "all" (every IPv4 interface) or the IP addresses to bind, e.g.
    ["127.0.0.1"] or a namespace's address.
    """

    interfaces: Literal["all"] | Sequence[str] = "all"  # stored as a tuple
    ttl_s: int = 15  # TTL of our records; a crashed node leaves tables within ~ttl + sweep + probe
    browse: bool = True
    advertise: bool = True
    sweep_interval_s: float | None = None  # liveness sweep period; None: ttl_s / 3
    probe_timeout_ms: int = 1500  # how long a sweep waits for a node whose records expired
    resolve_timeout_ms: int = 3000  # resolving a newly seen service
    fetch_timeout_s: float = 3.0  # GET /info, whole request
    max_info_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        interfaces = self.interfaces
        if interfaces != "all":
            if isinstance(interfaces, str) or not isinstance(interfaces, Sequence) or not interfaces:
                raise ValueError('interfaces is "all" or a non-empty list of IP addresses')
            for address in interfaces:
                ipaddress.ip_address(address)  # ValueError names the bad address
            object.__setattr__(self, "interfaces", tuple(interfaces))
        if not 1 <= self.ttl_s <= 4500:
            raise ValueError("ttl_s is in [1, 4500] seconds")
        if self.sweep_interval_s is not None and self.sweep_interval_s <= 0:
            raise ValueError("sweep_interval_s is positive")
        if self.probe_timeout_ms <= 0 or self.resolve_timeout_ms <= 0 or self.fetch_timeout_s <= 0:
            raise ValueError("timeouts are positive")
        if self.max_info_bytes <= 0:
            raise ValueError("max_info_bytes is positive")

    @property
    def sweep_s(self) -> float:
        return self.sweep_interval_s if self.sweep_interval_s is not None else self.ttl_s / 3

    @property
    def removal_bound_s(self) -> float:
        """Longest time a crashed advertiser using this config stays in a browser's table
        (when the browser uses the same sweep and probe settings)."""
        return self.ttl_s + self.sweep_s + self.probe_timeout_ms / 1000


@dataclass(frozen=True)
class Advert:
    """What this node advertises: TXT hints and where `/info` is served."""

    peer_id: str
    port: int
    addresses: tuple[str, ...] = ()  # IPs for the A/AAAA records; empty: the bound interfaces
    model: str = ""  # model short id, a hint only
    span: tuple[int, int] | None = None
    protocol: int = PROTOCOL_VERSION
    scheme: str = "https"  # what the node serves: "https", or "http" with --insecure-http

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError("scheme is http or https")
        if not is_peer_id(self.peer_id):
            raise ValueError("peer_id is not a peer id")
        if not 1 <= self.port <= 0xFFFF:
            raise ValueError("port is not in [1, 65535]")
        object.__setattr__(self, "addresses", tuple(str(ipaddress.ip_address(a)) for a in self.addresses))
        if len(self.model) > MAX_MODEL_ID_CHARS or not (self.model.isascii() and self.model.isprintable()):
            raise ValueError(f"model is printable ASCII of at most {MAX_MODEL_ID_CHARS} characters")
        if self.span is not None and not 0 <= self.span[0] < self.span[1]:
            raise ValueError("span is a non-empty range [start, end)")

    def txt(self) -> dict[bytes, bytes]:
        span = b"" if self.span is None else f"{self.span[0]}:{self.span[1]}".encode()
        return {
            b"id": self.peer_id.encode(),
            b"model": self.model.encode(),
            b"span": span,
            b"port": str(self.port).encode(),
            b"v": str(self.protocol).encode(),
            b"s": self.scheme.encode(),
        }


@dataclass
class _Service:
    """What the browser knows of one advertised service."""

    peer_id: str  # from the instance name
    alive: bool = True  # false once its records expired and nobody answered a probe
    learned: bool = False  # mDNS merged (or fetched the very record the table holds): mDNS may remove it
    again: bool = False  # an event came while a task was working on it: look once more


class Mdns:
    """Advertise this node and/or browse the LAN, as an async context manager.

    `table` receives records found by browsing (needed when `config.browse`); `advert`
    is what to announce (needed when `config.advertise`). Services we could not use are
    counted by reason in `failures` (a record that does not even decode is counted there
    under the table's reason names); records that decode but fail verification are
    counted by the table in `PeerTable.refused`. `stats` counts what went right.
    """

    def __init__(
        self, config: MdnsConfig, *, table: PeerTable | None = None, advert: Advert | None = None, transport: Transport | None = None
    ) -> None:
        if config.browse and table is None:
            raise ValueError("browsing needs a peer table")
        if config.advertise and advert is None:
            raise ValueError("advertising needs an advert")
        self.config = config
        self.table = table
        self.transport = transport or Transport()
        self.membership = self.transport.membership  # private: another service type, and tags instead of hints
        self.service_type = PRIVATE_SERVICE_TYPE if self.membership is not None else SERVICE_TYPE
        self.failures: Counter[str] = Counter()  # reason -> count of services we could not use
        self.stats: Counter[str] = Counter()  # "merged", "probes" (sweeps that asked the network), "left"
        self._advert = advert
        self._info: AsyncServiceInfo | None = None
        self._services: dict[str, _Service] = {}  # instance name -> state
        self._busy: dict[str, asyncio.Task[None]] = {}  # service name -> the one task working on it
        self._loops: set[asyncio.Task[None]] = set()
        self._closing = False  # set on exit: no new tasks start
        self._stack = contextlib.AsyncExitStack()
        self._azc: AsyncZeroconf | None = None
        self._http: aiohttp.ClientSession | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Mdns:
        async with contextlib.AsyncExitStack() as stack:
            interfaces = InterfaceChoice.All if self.config.interfaces == "all" else list(self.config.interfaces)
            # Exits in reverse: loops and tasks stop, the browser stops, then goodbyes and sockets.
            self._azc = await stack.enter_async_context(AsyncZeroconf(interfaces=interfaces))
            if self.config.advertise:
                await self._register()
            if self.config.browse:
                self._http = await stack.enter_async_context(
                    self.transport.client_session(timeout=aiohttp.ClientTimeout(total=self.config.fetch_timeout_s))
                )
                await stack.enter_async_context(
                    AsyncServiceBrowser(self._azc.zeroconf, [self.service_type], handlers=[self._on_change])
                )
            stack.push_async_callback(self._stop_tasks)
            if self.config.browse:
                self._start_loop(self._sweep_loop())
            if self.config.advertise:
                self._start_loop(self._refresh_loop())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stack.aclose()  # AsyncZeroconf.async_close unregisters: goodbyes go out
        log.debug("mdns closed; failures %s", dict(self.failures))

    async def _stop_tasks(self) -> None:
        self._closing = True
        tasks = [*self._loops, *self._busy.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_loop(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._loops.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mdns task failed", exc_info=task.exception())

    # --- advertising ----------------------------------------------------------------

    def _service_info(self, advert: Advert) -> AsyncServiceInfo:
        addresses = list(advert.addresses) or self._bound_addresses()
        ttl = self.config.ttl_s
        return AsyncServiceInfo(
            self.service_type,
            f"{advert.peer_id}.{self.service_type}",
            port=advert.port,
            properties=self._txt(advert),
            server=f"{advert.peer_id}.local.",
            parsed_addresses=addresses,
            host_ttl=ttl,  # SRV, A, AAAA
            other_ttl=ttl,  # PTR, TXT (browsers raise a PTR's to 1125 s: see the module doc)
        )

    def _txt(self, advert: Advert) -> dict[bytes, bytes]:
        if self.membership is None:
            return advert.txt()
        tag = advert_tag(self.membership.key, advert.peer_id, advert.scheme, advert.port)
        return {b"id": advert.peer_id.encode(), b"v": str(advert.protocol).encode(), b"s": advert.scheme.encode(), b"tag": tag.encode()}

    def _bound_addresses(self) -> list[str]:
        if self.config.interfaces != "all":
            return list(self.config.interfaces)
        import ifaddr  # zeroconf's own dependency, which it asks users to call directly

        found = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)}
        usable = sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)
        return usable or ["127.0.0.1"]

    async def _register(self) -> None:
        assert self._azc is not None and self._advert is not None
        self._info = self._service_info(self._advert)
        # The awaited call probes for the name; the returned task sends the announcements.
        await (await self._azc.async_register_service(self._info))
        log.info("advertising %s on port %d (ttl %d s)", self._advert.peer_id, self._advert.port, self.config.ttl_s)

    @property
    def advertising(self) -> bool:
        """Whether our advert is registered (entered, with an advert)."""
        return self._azc is not None and self._info is not None

    async def update(self, advert: Advert) -> None:
        """Announce a changed advert (same peer id): browsers see new TXT and fetch /info again."""
        if self._azc is None or self._info is None or self._advert is None:
            raise RuntimeError("update() needs an entered, advertising Mdns")
        if advert.peer_id != self._advert.peer_id:
            raise ValueError("an advert keeps its peer id")
        self._advert = advert
        self._info = self._service_info(advert)
        await (await self._azc.async_update_service(self._info))

    async def _refresh_loop(self) -> None:
        """Re-broadcast our records every ttl/3: zeroconf never re-announces by itself, and
        browsers would otherwise let them expire and probe us every sweep."""
        assert self._azc is not None
        zc: Zeroconf = self._azc.zeroconf
        while True:
            await asyncio.sleep(self.config.ttl_s / 3)
            if self._info is not None:
                zc.async_send(zc.generate_service_broadcast(self._info, None))  # one packet, our TTLs

    # --- browsing -------------------------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """zeroconf's handler: runs in the loop, so it only records state and starts tasks."""
        if state_change is ServiceStateChange.Removed:  # a goodbye, or the PTR's (long) expiry
            service = self._services.pop(name, None)
            if service is not None:
                self._forget(service, "goodbye")
            return
        service = self._services.get(name)
        if service is None:
            peer_id = name[: -len(self.service_type) - 1] if name.endswith("." + self.service_type) else ""
            if not is_peer_id(peer_id):
                self._fail("bad_name", name)
                return
            if self._advert is not None and peer_id == self._advert.peer_id:
                return  # ourselves
            if len(self._services) >= MAX_SERVICES:
                self._fail("too_many_services", name)
                return
            service = self._services[name] = _Service(peer_id)
        service.alive = True
        self._spawn(name, self._learn(name))

    def _spawn(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` for service `name` unless a task already works on it (then it runs once more)."""
        if self._closing or name in self._busy:
            service = self._services.get(name)
            if service is not None and not self._closing:
                service.again = True
            coroutine.close()
            return
        task = asyncio.create_task(coroutine)
        self._busy[name] = task
        task.add_done_callback(lambda done: self._service_done(name, done))

    def _service_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._busy.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("mdns task for %s failed", name, exc_info=task.exception())
        service = self._services.get(name)
        if service is not None and service.again and not task.cancelled():
            service.again = False
            self._spawn(name, self._learn(name))

    def _forget(self, service: _Service, why: str) -> None:
        assert self.table is not None
        if service.learned and self.table.remove(service.peer_id):
            self.stats["left"] += 1
            log.info("peer %s left via mdns (%s)", service.peer_id, why)
        service.learned = False

    def _fail(self, reason: str, name: str, detail: object = "") -> None:
        self.failures[reason] += 1
        log.info("mdns: %s for %s %s", reason, name, detail)

    async def _learn(self, name: str) -> None:
        """Resolve `name`, fetch its /info and merge the signed record into the table."""
        assert self._azc is not None and self.table is not None
        service = self._services.get(name)
        if service is None:
            return
        info = AsyncServiceInfo(self.service_type, name)
        if not await info.async_request(self._azc.zeroconf, self.config.resolve_timeout_ms) or not info.port:
            self._fail("unresolved", name)
            return
        txt_id = info.properties.get(b"id")
        if txt_id != service.peer_id.encode():
            self._fail("bad_txt", name, "(TXT id is not the instance name)")
            return
        scheme = "https" if info.properties.get(b"s") == b"https" else "http"  # nodes before TLS sent no scheme
        if not self.transport.allows(f"{scheme}://"):
            self._fail("plain_http", name, "(a TLS browser never dials http)")
            return
        if self.membership is not None:
            tag = info.properties.get(b"tag") or b""
            if not hmac.compare_digest(tag, advert_tag(self.membership.key, service.peer_id, scheme, info.port).encode()):
                self._fail("not_member", name, "(its tag does not hold with our swarm key)")
                return
        record = None
        for url in _candidate_urls(info, scheme)[:MAX_URL_TRIES]:
            record = await self._fetch_record(url, name, service.peer_id)
            if record is not None:
                break
        if record is None:
            return
        if record.peer_id != service.peer_id:
            self._fail("id_mismatch", name, "(/info serves another peer's record)")
            return
        if self._services.get(name) is not service:  # removed while we fetched
            return
        now = time.time()
        # A table that requires proofs holds it pending until its address answers with its key;
        # the budget is the advertiser's address, as for records pushed by gossip.
        if self.table.merge(record, now, SOURCE, origin=f"mdns:{urlsplit(url).hostname}"):
            self.stats["merged"] += 1
            service.learned = True
        elif self.table.get(record.peer_id) == record:  # we or gossip had it already
            service.learned = True

    async def _fetch_record(self, base_url: str, name: str, peer_id: str) -> PeerRecord | None:
        """The record served at `base_url`/info, or None (counted) when anything is wrong. Over TLS
        the dial is pinned to `peer_id`, the advertised one: another key there is not fetched."""
        assert self._http is not None
        limit = self.config.max_info_bytes
        try:
            async with self._http.get(base_url + "/info", allow_redirects=False, ssl=self.transport.pin(peer_id)) as response:
                if response.status != 200:
                    self._fail("bad_info", name, f"(HTTP {response.status})")
                    return None
                if response.content_length is not None and response.content_length > limit:
                    self._fail("oversized_info", name)
                    return None
                body = bytearray()
                while chunk := await response.content.read(limit + 1 - len(body)):
                    body += chunk
                    if len(body) > limit:
                        self._fail("oversized_info", name)
                        return None
        except PinMismatch as error:
            self._fail("identity_mismatch", name, f"({error})")
            return None
        except NotMember as error:  # a private browser at a peer that did not prove the key, or the reverse
            self._fail("not_member", name, f"({error})")
            return None
        except SwarmError as error:  # busy at the door, before any proof
            self._fail("unreachable", name, f"({base_url}: {error.code})")
            return None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            self._fail("unreachable", name, f"({base_url}: {type(error).__name__})")
            return None
        try:
            info = json.loads(body)
        except ValueError as error:  # JSON and UTF-8 errors
            self._fail("bad_info", name, f"({type(error).__name__})")
            return None
        encoded = info.get("record") if isinstance(info, dict) else None
        if not isinstance(encoded, str):
            self._fail("bad_info", name, "(no record string)")
            return None
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            self._fail("bad_info", name, "(record is not base64)")
            return None
        try:
            return PeerRecord.from_bytes(data)
        except SwarmError as error:
            self._fail(refusal_reason(error), name, f"({error})")
            return None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_s)
            for name in list(self._services):
                if name not in self._busy:
                    self._spawn(name, self._check(name))

    async def _check(self, name: str) -> None:
        """One service's liveness: a live one is probed (cache first, then the network), a
        dead one is looked up in the cache only, where its next announcement would land."""
        assert self._azc is not None and self.table is not None
        service = self._services.get(name)
        if service is None:
            return
        info = AsyncServiceInfo(self.service_type, name)
        alive = info.load_from_cache(self._azc.zeroconf)
        if not alive and service.alive:
            self.stats["probes"] += 1
            alive = await info.async_request(self._azc.zeroconf, self.config.probe_timeout_ms)
        alive = alive and bool(info.port)
        if self._services.get(name) is not service:
            return
        if not alive:
            if service.alive:
                service.alive = False
                self._forget(service, "expired")
            return
        service.alive = True
        record = self.table.get(service.peer_id)
        now = time.time()
        if record is None or record.expires_at - now < (record.expires_at - record.issued_at) / 2:
            await self._learn(name)


def advert_tag(key: SwarmKey, peer_id: str, scheme: str, port: int) -> str:
    """What a private node's TXT carries instead of hints: only holders of `key` can make or check it."""
    return key.mac(_ADVERT_TAG, peer_id.encode(), scheme.encode(), str(port).encode())[:16].hex()


def _candidate_urls(info: AsyncServiceInfo, scheme: str = "http") -> list[str]:
    """Base URLs to try, best first: IPv4 before IPv6, loopback after others, link-local
    only when nothing else is offered (IPv6 link-local never: it needs a zone)."""
    addresses = [ipaddress.ip_address(a) for a in info.parsed_addresses()]
    usable = [a for a in addresses if not (a.version == 6 and a.is_link_local)]
    if any(not a.is_link_local for a in usable):
        usable = [a for a in usable if not a.is_link_local]
    usable.sort(key=lambda a: (a.version, a.is_loopback))
    return [f"{scheme}://{a}:{info.port}" if a.version == 4 else f"{scheme}://[{a}]:{info.port}" for a in usable]
