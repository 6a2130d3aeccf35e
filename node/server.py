"""A node's life: build the aiohttp app, serve until SIGTERM, then leave gracefully.

The pieces: node/state.py (what handlers share, `/info`), node/http.py (`/info`,
`/forward`), node/session_socket.py (the `/session` websocket), node/rebalance.py
(`--blocks auto` moves), swarm/discovery/gossip.py (`/peers`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import threading
from typing import Callable

import aiohttp
from aiohttp import web

from node.accept import GuardedRunner, body_in_time
from node.accusations import Relay, accusation_routes
from node.backend import Backend
from node.discovery import NodeDiscovery
from node.head_service import HeadService, LMHead
from node.http import error_response, get_info, post_forward
from node.metrics import metrics_routes, serve_metrics
from node.push import PushPool
from node.rebalance import drain_sessions, rebalance
from node.relaying import keep_reachable
from node.session_socket import close_session, reap_idle, session_socket
from node.state import STATE, NodeConfig, NodeState, Phase
from swarm.discovery.peers_http import peers_routes
from swarm.errors import ShuttingDown, SwarmError
from swarm.identity import Identity
from swarm.model import ModelFingerprint, Span
from swarm.peers import PeerTable
from swarm.protocol import Error

log = logging.getLogger(__name__)


def build_app(state: NodeState) -> web.Application:
    config = state.config
    limit = max(config.max_frame, config.discovery.gossip.max_frame)  # /peers checks its own, smaller limit
    own = ("/forward", "/accusations")  # these read their bodies themselves, after their cheap refusals
    middlewares = [*config.transport.server_middlewares(), body_in_time(config.body_timeout_s, limit, error_response, own=own)]
    app = web.Application(client_max_size=limit, middlewares=middlewares)
    app.on_response_prepare.extend(config.transport.response_hooks())
    app.on_response_prepare.append(state.metrics.on_response_prepare)  # counts every error answer by code
    app[STATE] = state
    app.add_routes([web.get("/info", get_info), web.post("/forward", post_forward), web.get("/session", session_socket)])
    app.add_routes(metrics_routes(state))
    app.add_routes(accusation_routes())
    app.add_routes(state.relay_host.routes())
    app.add_routes(state.reach.routes())
    app.add_routes(peers_routes(state.table, max_frame=state.config.discovery.gossip.max_frame, identity=state.identity))
    return app


async def shutdown(state: NodeState) -> None:
    """Leave discovery, refuse new sessions, ask owners to move theirs (serving them meanwhile), finish
    steps in flight, then close what is left with `shutting_down`."""
    state.phase = Phase.DRAINING
    if state.discovery is not None:
        await state.discovery.leave()  # first: clients stop routing here while sessions finish
    await drain_sessions(state)
    state.phase = Phase.CLOSING
    try:
        if state.backend is not None:
            await asyncio.wait_for(state.backend.drain(), state.config.shutdown_grace_s)
        if state.step_tasks:
            await asyncio.wait(list(state.step_tasks), timeout=state.config.shutdown_grace_s)
    except asyncio.TimeoutError:
        log.warning("steps still running after %.0f s; closing anyway", state.config.shutdown_grace_s)
    for session in state.sessions:
        close_session(state, session)
        await session.owner.send(Error.of(ShuttingDown("node is shutting down: move the session elsewhere"), session=session.id))
    for ws in list(state.sockets):  # a copy: handlers remove themselves as they end
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node shutting down")


async def serve(
    span: Span | None,
    fingerprint: ModelFingerprint | None,
    identity: Identity,
    config: NodeConfig,
    ready: Callable[[NodeState], None] | None = None,
    stop: asyncio.Event | None = None,
    executor: concurrent.futures.Executor | None = None,
    loader: Callable[[int, int], Span] | None = None,
    head: LMHead | None = None,
) -> None:
    """Run a node until `stop` is set (or SIGTERM/SIGINT, when this is the main thread), then shut
    down gracefully. `span` None: a bootstrap peer. `executor` runs the model (see node/compute.py).
    `head`: the LM head, for `--serve-head` (node/head_service.py)."""
    stop = stop or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        push = await stack.enter_async_context(PushPool(config.push, config.max_frame, config.transport))  # its own connector, not gossip's
        state = NodeState(config, identity, fingerprint, None, push, table=PeerTable(config.discovery.table))
        state.relay = await stack.enter_async_context(Relay(config.accusations, config.max_frame, config.transport))
        state.head = None if head is None else HeadService(head, executor)
        stack.push_async_callback(_close_backend, state)  # whichever is current at the end: a move replaces it
        if span is not None:
            state.backend = Backend(span, config.backend, executor, observer=state.metrics)
            await state.backend.__aenter__()
        backend = state.backend
        # keepalive_timeout is the header timeout too, and bounds a TLS handshake (node/accept.py says why)
        runner = GuardedRunner(
            build_app(state),
            state.tcp_limit,
            tls=config.transport.server_ssl(identity),
            handshake_timeout_s=config.header_timeout_s,
            router=state.relay_host if state.relay_host.enabled else None,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=config.header_timeout_s,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(_cancel_tasks, state)
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        state.port = port
        state.url = config.public_url or f"{config.transport.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if config.metrics_port is not None:
            state.metrics_url = await serve_metrics(state, stack)
        state.discovery = await stack.enter_async_context(
            NodeDiscovery(config.discovery, state.table, state.record, state.advert(port), transport=config.transport)
        )
        state.spawn(reap_idle(state), "reaper")
        state.spawn(keep_reachable(state, runner), "reachability")
        stack.push_async_callback(state.reach.close)
        failure: list[SwarmError] = []
        state.spawn(_watch_compute(state, stop, failure), "compute watch")
        if config.rebalance is not None and loader is not None and backend is not None:
            state.spawn(rebalance(state, config.rebalance, loader, executor), "rebalancer")
        if ready:
            ready(state)
        await stop.wait()
        log.info("shutting down")
        await shutdown(state)
    if failure:
        raise failure[0]


async def _watch_compute(state: NodeState, stop: asyncio.Event, failure: list[SwarmError]) -> None:
    """A node whose batcher died (node/backend.py) leaves the swarm: its steps would never be computed.

    Restarting the loop could spin on the same bug, so the node stops instead: gracefully (its
    sessions are told to move) and the process exits with the error."""
    while (backend := state.backend) is not None:
        await backend.stopped.wait()
        if backend.failure is not None:
            failure.append(backend.failure)
            stop.set()
            return
        if state.backend is backend:  # closed at shutdown, not replaced by a move
            return


async def _close_backend(state: NodeState) -> None:
    if state.backend is not None:
        await state.backend.__aexit__(None, None, None)


async def _cancel_tasks(state: NodeState) -> None:
    tasks = state.tasks | state.step_tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
