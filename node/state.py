"""What a node's handlers share: its configuration, its phase, its sessions and peers, and `/info`."""

from __future__ import annotations

import asyncio
import base64
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable

from aiohttp import web

from node.backend import Backend
from node.channel import Channel
from node.court import AccusationConfig, Court
from node.discovery import DiscoveryConfig, NodeDiscovery
from node.limits import SourceLimit
from node.metrics import NodeMetrics
from node.push import PushConfig, PushPool
from node.reachability import Reachability
from node.relay_config import RelayConfig
from node.relay_host import RelayHost
from node.relay_link import RelayLink
from node.sessions import Sessions
from node.steps import BackendConfig
from swarm import wire
from swarm.discovery.mdns import Advert
from swarm.errors import BadSpan
from swarm.identity import Identity
from swarm.model import ModelFingerprint, Span
from swarm.peers import PeerTable
from swarm.precision import model_entry
from swarm.records import PeerRecord
from swarm.transport import Transport

if TYPE_CHECKING:
    from node.accusations import Relay
    from node.head_service import HeadService


@dataclass(frozen=True)
class RebalanceConfig:
    """`--blocks auto`: move to where the swarm is weakest, at most every `dwell_s`; with `resize`
    (no `--num-blocks`), also grow or shrink to the share of blocks this node's speed earns."""

    period_s: float = 30.0  # how often coverage is checked
    dwell_s: float = 120.0  # no move sooner than this after starting or the last move
    margin: float = 0.2  # a move must raise the bottleneck by more than this (relative); a resize must be this far off the share
    resize: bool = False  # size the span by speed (node/balance.py speed_share), not a fixed --num-blocks
    max_blocks: int | None = None  # with resize: the most blocks that fit in memory (None: the whole model)


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None  # what peers dial; default https://host:port (http:// with transport.insecure_http)
    extra_urls: tuple[str, ...] = ()  # more addresses of this node, after public_url (--public-url given twice)
    relay: RelayConfig = field(default_factory=RelayConfig)  # using relays, offering relaying (node/relay_config.py)
    transport: Transport = field(default_factory=Transport)  # TLS pinned to identities, or plain http by choice
    max_frame: int = wire.DEFAULT_MAX_FRAME
    session_timeout_s: float = 300.0  # an idle session's cache is freed after this
    drain_timeout_s: float = 10.0  # SIGTERM: how long sessions are still served while their clients move them
    shutdown_grace_s: float = 30.0  # how long SIGTERM then waits for steps in flight
    # --- per-source limits (node/limits.py; a source: an IPv4 address or an IPv6 /64; 0: no limit) ---
    max_tcp_per_source: int = 64  # open TCP connections; beyond: a raw 503 `busy` at accept (node/accept.py)
    max_sockets_per_source: int = 64  # open /session websockets; beyond: `busy`, then close 1013
    max_sessions_per_source: int = 32  # open sessions; beyond: `busy`
    max_forwards_per_source: int = 2  # concurrent POST /forward
    # --- timeouts against slow or idle strangers ---
    # a connection's request headers must be complete within this; also the idle-connection timeout,
    # so longer than aiohttp clients' 15 s keep-alive: our own peers close idle connections first
    header_timeout_s: float = 20.0
    body_timeout_s: float = 30.0  # a request's body must be read within this
    socket_idle_timeout_s: float = 120.0  # a /session websocket that owns no session and sends nothing this long is closed
    unstepped_session_grace_s: float = 30.0  # a session never stepped is freed this long after its open
    push: PushConfig = field(default_factory=PushConfig)  # outbound connections to next hops
    backend: BackendConfig = field(default_factory=BackendConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    rebalance: RebalanceConfig | None = None  # None: the span given at start is kept
    accusations: AccusationConfig = field(default_factory=AccusationConfig)  # verified outputs (node/court.py)
    # --- Prometheus (node/metrics.py): /metrics on the node's port, and optionally a listener of its own ---
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # a plain-HTTP listener serving only /metrics (0: any free port; None: none)
    metrics_max_age_s: float = 1.0  # a rendering of /metrics is reused this long (swarm/exposition.py says why)


class Phase(enum.Enum):
    """Where a node is in its life. Only ever moves forward, except MOVING -> SERVING."""

    SERVING = "serving"
    MOVING = "moving"  # between spans: sessions are moved off, new ones refused as busy
    DRAINING = "draining"  # SIGTERM: new sessions and forwards refused, open sessions still step
    CLOSING = "closing"  # past the drain: steps from clients refused too, steps in flight finish

    @property
    def leaving(self) -> bool:
        return self in (Phase.DRAINING, Phase.CLOSING)


@dataclass
class NodeState:
    """Everything the handlers share; built once by `serve`, owned by the app."""

    config: NodeConfig
    identity: Identity
    fingerprint: ModelFingerprint | None  # None with the backend: a bootstrap peer that holds no blocks
    backend: Backend | None
    push: PushPool
    url: str = ""
    port: int = 0  # the port listened on (what mDNS advertises)
    table: PeerTable = field(default_factory=PeerTable)
    discovery: NodeDiscovery | None = None
    sessions: Sessions = field(default_factory=Sessions)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    channels: set[Channel] = field(default_factory=set)  # inbound /session connections (idle ones are closed)
    tasks: set[asyncio.Task] = field(default_factory=set)  # service tasks (reaper, discovery)
    step_tasks: set[asyncio.Task] = field(default_factory=set)  # steps computing or being delivered
    phase: Phase = Phase.SERVING
    moves: int = 0
    sessions_opened: int = 0  # since start: lets an operator (and the failover test) see re-opens
    forward_sources: SourceLimit = field(init=False)  # POST /forward in progress per source
    started: float = field(default_factory=time.time)
    socket_limit: SourceLimit = field(init=False)  # open /session websockets per source
    session_limit: SourceLimit = field(init=False)  # open sessions per source
    court: Court = field(init=False)  # accusations heard, convictions (node/court.py)
    relay: Relay | None = None  # passes convictions on (node/accusations.py); set by `serve`
    tcp_limit: SourceLimit = field(init=False)  # open TCP connections per source, on every listener (node/accept.py)
    metrics: NodeMetrics = field(init=False)  # what /metrics renders (node/metrics.py)
    metrics_url: str | None = None  # the --metrics-port listener, once it listens
    head: HeadService | None = None  # --serve-head: the LM head, applied for sessions that ask (node/head_service.py)
    relay_host: RelayHost = field(init=False)  # relaying for nodes that cannot be dialled (node/relay_host.py)
    relay_link: RelayLink | None = None  # the relays this node is reached through, once it holds them (node/relaying.py)
    reachable: bool | None = None  # what the dial-back check found (node/reachability.py); None: not known
    reach: Reachability = field(init=False)

    def __post_init__(self) -> None:
        self.court = Court(self.config.accusations, self.identity, self.table)
        self.tcp_limit = SourceLimit(self.config.max_tcp_per_source, "connections")
        self.socket_limit = SourceLimit(self.config.max_sockets_per_source, "connections")
        self.session_limit = SourceLimit(self.config.max_sessions_per_source, "sessions")
        self.forward_sources = SourceLimit(self.config.max_forwards_per_source, "forwards")
        self.metrics = NodeMetrics(self)
        self.relay_host = RelayHost(self.config.relay, self.identity.peer_id, self.config.header_timeout_s)
        self.relay_host.enabled &= not self.config.transport.insecure_http  # the relay reads TLS server names
        self.reach = Reachability(self.config.transport)

    def addresses(self) -> tuple[str, ...]:
        """Where peers dial this node: its relays while it holds any, else its own URLs."""
        relayed = self.relay_link.addresses if self.relay_link is not None else ()
        return relayed or (self.url, *self.config.extra_urls)

    @property
    def span(self) -> Span:
        """The blocks served; `BadSpan` on a bootstrap peer, which serves none."""
        if self.backend is None:
            raise BadSpan("this node serves no blocks (it is a bootstrap peer)")
        return self.backend.span

    def spawn(self, coro: Awaitable[Any], name: str, step: bool = False) -> None:
        owner = self.step_tasks if step else self.tasks
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        owner.add(task)
        task.add_done_callback(owner.discard)

    def record(self, leaving: bool = False) -> PeerRecord:
        """This node's signed record, fresh; `leaving` makes the tombstone a graceful exit publishes."""
        backend, ttl = self.backend, self.config.discovery.gossip.record_ttl_s
        addresses = self.addresses()
        relayed = self.relay_link is not None and addresses == self.relay_link.addresses
        offers = self.relay_host.enabled and self.reachable is not False and not relayed
        common = dict(addresses=addresses, now=time.time(), ttl=ttl, leaving=leaving, relayed=relayed, offers_relay=offers)
        if backend is None:
            return PeerRecord.create(self.identity, **common)
        span = backend.span
        return PeerRecord.create(
            self.identity,
            **common,
            model=model_entry(self.fingerprint.to_dict(), span.precision),  # what it computes with: clients may require full precision
            num_layers=span.config.num_layers,
            span=(span.start, span.end),
            throughput=backend.throughput,
            load=min(1.0, backend.load),
            free_kv_bytes=max(0, backend.kv_free),
            serves_head=self.head is not None and span.end == span.config.num_layers,
        )

    def advert(self, port: int) -> Advert:
        backend = self.backend
        span = (backend.span.start, backend.span.end) if backend else None
        return Advert(self.identity.peer_id, port, model=str(self.fingerprint or ""), span=span, scheme=self.config.transport.scheme)

    def limits(self) -> dict[str, Any]:
        """Every limit a stranger meets here, for `/info` (0: no limit)."""
        c = self.config
        limits: dict[str, Any] = {
            "max_frame": c.max_frame,
            "max_tcp_per_source": c.max_tcp_per_source,
            "max_sockets_per_source": c.max_sockets_per_source,
            "max_sessions_per_source": c.max_sessions_per_source,
            "max_forwards_per_source": c.max_forwards_per_source,
            "header_timeout_s": c.header_timeout_s,
            "body_timeout_s": c.body_timeout_s,
            "socket_idle_timeout_s": c.socket_idle_timeout_s,
            "unstepped_session_grace_s": c.unstepped_session_grace_s,
            "session_timeout_s": c.session_timeout_s,
            "push_connect_timeout_s": c.push.connect_timeout_s,
            "push_limit_per_host": c.push.limit_per_host,
            "push_max_channels": c.push.max_channels,
            "push_idle_s": c.push.idle_s,
            "accusation_burst": c.accusations.source_burst,
            "accusation_interval_s": c.accusations.source_interval_s,
            "max_rechecks": c.accusations.max_rechecks,
        }
        if self.backend is not None:
            b = self.backend
            limits |= {
                "max_sessions": b.config.max_sessions,
                "max_length": b.max_length,
                "kv_memory_bytes": b.config.kv_memory_bytes,
                "max_forwards": b.config.max_forwards,
                "max_forward_tokens": b.max_forward_tokens,
                "max_batch_tokens": b.config.max_batch_tokens,
                "prefill_chunk_tokens": b.config.prefill_chunk_tokens,
                "prefill_share": b.config.prefill_share,
            }
        return limits

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key_bytes.hex(),
            "url": self.url,
            "protocol": wire.PROTOCOL_VERSION,
            "private": self.config.transport.membership is not None,  # only members of a private swarm see this
            "peers": len(self.table),
            "phase": self.phase.value,
            "shutting_down": self.phase.leaving,
            "moving": self.phase is Phase.MOVING,
            "moves": self.moves,
            "uptime_s": time.time() - self.started,
            "record": base64.b64encode(self.record().to_bytes()).decode(),
            "limits": self.limits(),
            "discovery": None if self.discovery is None else {**self.discovery.limits(), "peer_table": self.table.stats()},
            "accusations": self.court.stats(),
            "relay": {
                **self.config.relay.limits(),
                "reachable": self.reachable,
                "host": self.relay_host.info(),
                "link": None if self.relay_link is None else self.relay_link.info(),
                "reach": {**self.reach.config.limits(), "checks": self.reach.checks, "refused": self.reach.refused},
            },
            "model": None,
            "span": None,
        }
        backend = self.backend
        if backend is None:
            return info
        span = backend.span
        return {
            **info,
            "model": self.fingerprint.to_dict(),
            "model_id": str(self.fingerprint),
            "num_layers": span.config.num_layers,
            "hidden_size": span.config.hidden_size,
            "span": [span.start, span.end],
            "dtype": str(span.dtype).removeprefix("torch."),
            "precision": span.precision,  # what its record declares (swarm/precision.py): int8 under --quant int8
            "quant": span.quant or "none",
            "weight_bytes": span.weight_bytes,  # really held: int8 values and scales under --quant int8
            "device": str(span.device),
            "throughput": backend.throughput,
            "load": backend.load,
            "sessions": backend.sessions,
            "sessions_opened": self.sessions_opened,
            "max_sessions": backend.config.max_sessions,
            "max_length": backend.max_length,
            "kv_free_bytes": backend.kv_free,
            "kv_total_bytes": backend.config.kv_memory_bytes,
            "steps": backend.steps_done,
            "batches": backend.batches_done,
            "forwards": backend.forwards,
            "serves_head": self.head is not None and span.end == span.config.num_layers,
            "head_steps": 0 if self.head is None else self.head.served,
            "head_batches": 0 if self.head is None else self.head.batches,
        }


STATE = web.AppKey("state", NodeState)
