"""`--blocks auto` on a running node: every period, move to a better span if the swarm calls for it,
or (sized by speed: no `--num-blocks`) to a span of another size when its share is badly off.

The decisions are pure (node/balance.py); this module only carries them out: drain
the sessions here (as on SIGTERM), load the new blocks, swap the backend.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from node.backend import Backend
from node.balance import block_throughput, peer_speeds, should_move, should_resize, speed_share
from node.session_socket import close_session
from node.state import NodeState, Phase, RebalanceConfig
from swarm.errors import ShuttingDown
from swarm.protocol import Draining, Error

log = logging.getLogger(__name__)


async def rebalance(state: NodeState, config: RebalanceConfig, loader, executor) -> None:
    """Every period (after the dwell), move to a better span (or resize) if the swarm's coverage calls for it."""
    last_move = time.monotonic()
    while True:
        await asyncio.sleep(config.period_s * random.uniform(0.8, 1.2))  # jitter: nodes do not all move at once
        if state.phase is not Phase.SERVING or time.monotonic() - last_move < config.dwell_s:
            continue
        target = decide(state, config)
        if target is None:
            continue
        span = state.span
        log.info("moving from blocks [%d, %d) to [%d, %d)", span.start, span.end, *target)
        await move(state, target, loader, executor)
        last_move = time.monotonic()


def decide(state: NodeState, config: RebalanceConfig) -> tuple[int, int] | None:
    """The span to serve instead of the current one, or None: a resize first (when sized by speed), else a move.

    The swarm is read without this node's own record (it may still name the span
    before the last move) and this node is added on the span it serves now."""
    span, me, own = state.span, state.identity.peer_id, state.backend.throughput
    layers, digest, current = span.config.num_layers, state.fingerprint.digest, (span.start, span.end)
    records = state.table.records(time.time())
    without = block_throughput(records, digest, layers, skip=me)
    if config.resize:
        count = min(config.max_blocks or layers, speed_share(own, peer_speeds(records, digest, layers, skip=me), layers))
        target = should_resize(without, current, own, count, margin=config.margin)
        if target is not None:
            log.info("resizing to %d blocks: the share of %.1f blocks/s beside the swarm's peers", count, own)
            return target
    totals = list(without)
    for block in range(*current):
        totals[block] += own
    return should_move(totals, current, own, margin=config.margin)


async def move(state: NodeState, target: tuple[int, int], loader, executor) -> None:
    """Serve `target` instead: sessions here are told to move (served until they have, as on
    SIGTERM; any left are closed with `shutting_down`), then the new blocks load."""
    state.phase = Phase.MOVING
    try:
        await drain_sessions(state)
        for session in state.sessions:
            close_session(state, session)
            await session.owner.send(Error.of(ShuttingDown("node is moving to other blocks: move the session elsewhere"), session=session.id))
        old = state.backend
        await old.drain()
        span = await asyncio.get_running_loop().run_in_executor(executor, loader, *target)  # on the compute thread
        new = Backend(span, state.config.backend, executor, observer=state.metrics)
        await new.__aenter__()
        state.backend = new
        await old.__aexit__(None, None, None)  # its weights go with it
        state.moves += 1
        if state.discovery is not None:
            await state.discovery.moved(state.advert(state.port))  # mDNS TXT names the new span
    finally:
        if state.phase is Phase.MOVING:  # not if SIGTERM arrived meanwhile
            state.phase = Phase.SERVING


async def drain_sessions(state: NodeState) -> None:
    """Tell every session's owner to move it, and wait (up to `drain_timeout_s`) until all have.

    The node serves them all the while, so a client splices the session onto
    another peer between two steps and no step fails (on SIGTERM and before a move)."""
    if not len(state.sessions):
        return
    for session in state.sessions:
        await session.owner.send(Draining(session.id))
    log.info("draining: waiting up to %.0f s for %d sessions to move elsewhere", state.config.drain_timeout_s, len(state.sessions))
    try:
        await asyncio.wait_for(state.sessions.emptied.wait(), state.config.drain_timeout_s)
    except asyncio.TimeoutError:
        log.info("draining: %d sessions did not move; closing them", len(state.sessions))
