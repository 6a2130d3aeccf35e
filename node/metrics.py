"""A node's Prometheus metrics: `GET /metrics`, and the `--metrics-port` listener of a private node.

`NodeMetrics` belongs to the node's state and owns its own `CollectorRegistry` (never
prometheus-client's global one: two nodes in one process keep their counts apart).
Latencies are histograms observed where they happen: the batcher tells `NodeMetrics`
(a `node.steps.StepObserver`) of each step's queue wait and latency and of each
batch, a few microseconds per step. Everything else is a plain number the node keeps
anyway (sessions, KV bytes, the peer table, gossip rounds, accusations), read by a
collector at scrape time, so nothing on the hot path keeps a gauge in step.

Refusals are counted by wire code wherever a typed error leaves the node: HTTP answers
(`/forward`, `/peers`, `/accusations`, a late body, the membership check of a private
swarm) through the app's response hook, websocket error frames through `Channel`'s hook,
and connections refused at accept (`busy`) through the node's TCP limit.

A private swarm's membership check guards every route of the node's port, and a
Prometheus server cannot prove the key; `--metrics-port` opens a second, plain-HTTP
listener (loopback by default) that serves only `/metrics`, under the same per-source
connection limit and header timeout as the node's port.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node.accept import GuardedRunner
from swarm import wire
from swarm.errors import SwarmError
from swarm.exposition import METRICS_PATH, Exposition, metrics_handler

if TYPE_CHECKING:
    from node.state import NodeState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
_ERROR_BODY_LIMIT = 1 << 16  # our own error answers are far smaller; a bigger msgpack body is not one


def _known_codes() -> frozenset[str]:
    found, todo = set(), [SwarmError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(found)


class NodeMetrics:
    """What one node counts; `registry` is what `/metrics` renders."""

    def __init__(self, state: NodeState) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._queue = Histogram(
            "layerswarm_node_queue_seconds",
            "a step's wait from arrival until its first tokens compute",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._step = Histogram(
            "layerswarm_node_step_seconds",
            "a step's latency in this node, arrival to result (queue and compute)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._batch_size = Histogram(
            "layerswarm_node_batch_size",
            "steps (or chunks of long steps) in one batched forward",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._batch_seconds = Histogram(
            "layerswarm_node_batch_seconds", "compute time of one batched forward", buckets=_LATENCY_BUCKETS, registry=r
        )
        # Plain counts, rendered by the collector: a move replaces the backend, these live on.
        self.steps = 0
        self.tokens = 0
        self.forward_requests: collections.Counter[str] = collections.Counter()  # outcome -> count
        self.refusals: collections.Counter[str] = collections.Counter()  # wire code -> count
        self._codes = _known_codes()
        r.register(_StateCollector(state, self))
        self.exposition = Exposition(r, state.config.metrics_max_age_s)  # strangers scrape too: see swarm/exposition.py

    # --- node.steps.StepObserver: called by the batcher, on the event loop -----------

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def batch(self, sessions: int, tokens: int, seconds: float) -> None:
        self._batch_size.observe(sessions)
        self._batch_seconds.observe(seconds)
        self.tokens += tokens

    def step(self, seconds: float) -> None:
        self._step.observe(seconds)
        self.steps += 1

    # --- refusals and requests ----------------------------------------------------------

    def refused(self, code: str) -> None:
        """A typed error left the node. Codes are ours; anything else counts as "other" (bounded labels)."""
        self.refusals[code if code in self._codes else "other"] += 1

    def forward(self, ok: bool) -> None:
        self.forward_requests["ok" if ok else "refused"] += 1

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """The app's response hook: every error answer the node sends is a msgpack error frame."""
        if response.status < 400 or not isinstance(response, web.Response) or response.content_type != "application/msgpack":
            return
        body = response.body
        if not isinstance(body, (bytes, bytearray)) or len(body) > _ERROR_BODY_LIMIT:
            return
        try:
            message = wire.decode(body, _ERROR_BODY_LIMIT)
        except SwarmError:
            return
        if message["type"] == "error" and isinstance(message.get("code"), str):
            self.refused(message["code"])


class _StateCollector(Collector):
    """The node's plain numbers, read at scrape time."""

    def __init__(self, state: NodeState, metrics: NodeMetrics) -> None:
        self.state = state
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state, metrics = self.state, self.metrics
        backend = state.backend
        blocks = f"{backend.span.start}:{backend.span.end}" if backend is not None else "none"
        info = GaugeMetricFamily(
            "layerswarm_node_info",
            "this node: peer id, model, blocks served and phase (always 1)",
            labels=("peer_id", "model", "blocks", "phase"),
        )
        info.add_metric((state.identity.peer_id, str(state.fingerprint or "none"), blocks, state.phase.value), 1)
        yield info
        yield CounterMetricFamily("layerswarm_node_steps", "steps computed (session steps and /forwards)", value=metrics.steps)
        yield CounterMetricFamily("layerswarm_node_tokens", "tokens run through this node's blocks", value=metrics.tokens)
        yield GaugeMetricFamily("layerswarm_node_sessions", "sessions open now", value=len(state.sessions))
        yield CounterMetricFamily("layerswarm_node_sessions_opened", "sessions opened since start", value=state.sessions_opened)
        forwards = CounterMetricFamily(
            "layerswarm_node_forward_requests", "POST /forward requests, by outcome (ok, refused)", labels=("outcome",)
        )
        for outcome in ("ok", "refused"):
            forwards.add_metric((outcome,), metrics.forward_requests[outcome])
        yield forwards
        refusals = collections.Counter(metrics.refusals)
        refusals["busy"] += state.tcp_limit.refused  # connections refused at accept never reach a handler
        family = CounterMetricFamily("layerswarm_node_refusals", "typed errors this node sent, by wire code", labels=("code",))
        for code, count in sorted(refusals.items()):
            family.add_metric((code,), count)
        yield family
        if backend is not None:
            yield GaugeMetricFamily(
                "layerswarm_node_kv_used_bytes", "KV cache bytes held by open sessions and forwards", value=backend.kv_used
            )
            yield GaugeMetricFamily(
                "layerswarm_node_kv_free_bytes", "KV cache bytes left in the budget (--kv-memory)", value=max(0, backend.kv_free)
            )
            yield GaugeMetricFamily(
                "layerswarm_node_forwards_running", "POST /forward computing or queued now", value=backend.forwards
            )
            yield GaugeMetricFamily(
                "layerswarm_node_throughput_blocks_per_second",
                "self-measured blocks/s for one-token steps",
                value=backend.throughput,
            )
            yield GaugeMetricFamily("layerswarm_node_load", "open sessions over --max-sessions", value=backend.load)
        table = state.table.stats()
        yield GaugeMetricFamily(
            "layerswarm_node_peers_known", "peers in this node's table (itself included)", value=table["peers"]
        )
        yield GaugeMetricFamily("layerswarm_node_peers_proven", "peers whose address proved their key", value=table["proven"])
        yield GaugeMetricFamily(
            "layerswarm_node_peers_pending", "records of new peers awaiting their proof", value=table["pending"]
        )
        records = CounterMetricFamily(
            "layerswarm_node_records_refused", "peer records the table refused, by reason", labels=("reason",)
        )
        for reason, count in sorted(table["refused"].items()):
            records.add_metric((reason,), count)
        yield records
        gossip = state.discovery.gossip if state.discovery is not None else None
        yield CounterMetricFamily("layerswarm_node_gossip_rounds", "gossip rounds finished", value=gossip.rounds if gossip else 0)
        yield CounterMetricFamily(
            "layerswarm_node_gossip_failures", "gossip exchanges that failed", value=gossip.failures if gossip else 0
        )
        accusations = CounterMetricFamily(
            "layerswarm_node_accusations", "accusations of wrong outputs judged here, by outcome", labels=("outcome",)
        )
        for outcome, count in sorted(state.court.counts.items()):
            accusations.add_metric((outcome,), count)
        yield accusations
        yield from _relay_metrics(state)


def _relay_metrics(state: NodeState) -> Iterator[Metric]:
    """Relaying for others (node/relay_host.py) and relays held (node/relay_link.py)."""
    host = state.relay_host
    yield GaugeMetricFamily("layerswarm_relay_attached_nodes", "nodes this relay relays for now", value=len(host.attached))
    yield GaugeMetricFamily("layerswarm_relay_connections", "spliced connections open now", value=host.stats.open)
    yield CounterMetricFamily("layerswarm_relay_spliced", "connections spliced since start", value=host.stats.spliced)
    yield CounterMetricFamily("layerswarm_relay_evicted", "spliced connections closed to make room for another source", value=host.stats.evicted)
    relayed = CounterMetricFamily("layerswarm_relay_bytes", "bytes relayed, by direction", labels=("direction",))
    relayed.add_metric(("to_nodes",), host.stats.bytes_to_nodes)
    relayed.add_metric(("from_nodes",), host.stats.bytes_from_nodes)
    yield relayed
    refused = CounterMetricFamily("layerswarm_relay_refused", "connections and attaches the relay refused, by reason", labels=("reason",))
    for reason, count in sorted(host.stats.refused.items()):
        refused.add_metric((reason,), count)
    yield refused
    held = 0 if state.relay_link is None else len(state.relay_link.attached)
    yield GaugeMetricFamily("layerswarm_relay_held", "relays this node is reached through (0: dialled directly)", value=held)


def metrics_routes(state: NodeState) -> list[web.RouteDef]:
    return [web.get(METRICS_PATH, metrics_handler(lambda request: state.metrics.exposition))]


async def serve_metrics(state: NodeState, stack: contextlib.AsyncExitStack) -> str:
    """The `--metrics-port` listener: plain HTTP, only `/metrics`, no membership check; its URL."""
    config = state.config
    app = web.Application(client_max_size=1024)  # it takes no bodies
    app.add_routes(metrics_routes(state))
    runner = GuardedRunner(
        app,
        state.tcp_limit,
        handshake_timeout_s=config.header_timeout_s,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=config.header_timeout_s,
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, config.metrics_host, config.metrics_port)
    await site.start()
    host, port = runner.addresses[0][:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
