"""`POST /accusations` and `GET /accusations`, and passing a conviction on to proven peers.

The body of a POST is an `Accusation.to_wire()` map (msgpack), optionally with
`verdicts`: [[public key, signature], ...] of nodes that re-ran it and found the
accused guilty (swarm/accusation.py `Verdict`). Before the body is read, the
sender's source is charged (node/court.py `Court.admit`: a typed `busy` beyond
its budget); then the whole message is checked (`Accusation.from_wire` with this
model's hidden size, this node's model, both signatures, every verdict) before
anything is judged. The answer is the case as this node now sees it.

A node that convicts posts the accusation, with every verdict it holds (its own
among them when it re-ran the evidence), to each proven peer in its table, once
per accusation: holders re-check it themselves, and the others count verdicts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import torch
from aiohttp import web

from node.accept import read_body
from node.court import AccusationConfig, Case
from node.http import error_response
from node.limits import source_key
from node.state import STATE, NodeState
from swarm import wire
from swarm.accusation import MAX_EVIDENCE_TOKENS, Accusation
from swarm.addresses import base_url
from swarm.errors import AddressRefused, BadSpan, FrameTooLarge, ModelMismatch, SwarmError
from swarm.precision import DEFAULT_PRECISION
from swarm.transport import Transport

log = logging.getLogger(__name__)

MAX_FORWARDS_AT_ONCE = 8  # concurrent posts when passing a conviction on


async def post_accusation(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    try:
        if request.content_length is None or request.content_length > config.max_frame:
            raise FrameTooLarge(f"body must have a Content-Length of at most {config.max_frame} bytes")
        court = state.court
        court.admit(source_key(request.remote), time.time())  # Busy, before the body is read
        court.enter()
        try:
            return await _judge(state, request)
        finally:
            court.leave()
    except SwarmError as exc:
        return error_response(exc)


async def _judge(state: NodeState, request: web.Request) -> web.Response:
    config, court = state.config, state.court
    span = state.backend.span if state.backend is not None else None
    limit = config.max_frame if span is None else min(config.max_frame, evidence_bytes(span.config.hidden_size))
    message = wire.decode(await read_body(request, config.body_timeout_s, limit), limit)
    raw_verdicts = message.pop("verdicts", None)
    accusation = Accusation.from_wire(message, hidden_size=None if span is None else span.config.hidden_size)
    holds = False
    if span is not None:  # a bootstrap peer holds no model: it goes by the verdicts of holders of the accusation's
        if accusation.model != state.fingerprint.digest:
            raise ModelMismatch(f"this node serves model {state.fingerprint} (digest {state.fingerprint.digest}), not {accusation.model}")
        if accusation.blocks[1] > span.config.num_layers:
            raise BadSpan(f"blocks {list(accusation.blocks)} are past the model's {span.config.num_layers}")
        holds = span.start <= accusation.blocks[0] and accusation.blocks[1] <= span.end
    # What this node computes with: the accused's declared precision against it sets the tolerance (node/court.py).
    precision = DEFAULT_PRECISION if span is None else span.precision
    case, forward = await court.hear(accusation, raw_verdicts, time.time(), _rerun(state) if holds else None, precision)
    if forward and state.relay is not None:
        state.relay.forward(state, accusation, case)
    return web.Response(body=wire.encode({"type": "judgement", **case.to_json()}), content_type="application/msgpack")


def evidence_bytes(hidden_size: int) -> int:
    """The largest accusation body worth reading: the most evidence (inputs and outputs in float32) and room to spare."""
    return 2 * MAX_EVIDENCE_TOKENS * hidden_size * 4 + 2**20


def _rerun(state: NodeState):
    async def rerun(blocks: tuple[int, int], inputs: torch.Tensor) -> torch.Tensor:
        # The backend's stateless forward: a scratch cache, on the compute thread, counted like a /forward.
        return await state.backend.forward(blocks, inputs)

    return rerun


async def get_accusations(request: web.Request) -> web.Response:
    """What this node knows: every charge it remembers, newest first, and its counts."""
    court = request.app[STATE].court
    cases = [case.to_json() for case in reversed(court.cases.values())]
    return web.json_response({"accusations": cases, "convicted_peers": court.convicted.items(time.time()), **court.stats()})


def accusation_routes() -> list[web.RouteDef]:
    return [web.post("/accusations", post_accusation), web.get("/accusations", get_accusations)]


class Relay:
    """Passes convictions on to proven peers. An async context manager (it owns its HTTP session)."""

    def __init__(self, config: AccusationConfig, max_frame: int, transport: Transport) -> None:
        self.config = config
        self.max_frame = max_frame
        self.transport = transport
        self.http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.sent = 0

    async def __aenter__(self) -> Relay:
        timeout = aiohttp.ClientTimeout(total=self.config.forward_timeout_s)
        self.http = self.transport.client_session(limit=MAX_FORWARDS_AT_ONCE, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
            self.http = None

    def forward(self, state: NodeState, accusation: Accusation, case: Case) -> None:
        """Post `accusation` with `case`'s verdicts to every proven peer but the accused (in the background)."""
        now = time.time()
        me = state.identity.peer_id
        targets = []
        for record in state.table.records(now):
            if record.peer_id in (me, case.accused) or state.table.standing(record.peer_id) is None:
                continue
            try:
                url = base_url(record.addresses[0])
            except AddressRefused:
                continue
            if self.transport.allows(url):
                targets.append((url, record.peer_id))
        if not targets:
            return
        body = wire.encode({**accusation.to_wire(), "verdicts": [v.to_wire() for v in case.verdict_list()]})
        task = asyncio.create_task(self._post_all(targets, body, case.accused), name=f"accusation {case.accused[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_all(self, targets: list[tuple[str, str]], body: bytes, accused: str) -> None:
        assert self.http is not None, "Relay used outside `async with`"
        answers = await asyncio.gather(*(self._post(url, peer_id, body) for url, peer_id in targets))
        log.info("passed the conviction of %s on to %d peers: %s", accused, len(targets), answers)

    async def _post(self, url: str, peer_id: str, body: bytes) -> Any:
        headers = {"Content-Type": "application/msgpack"}
        try:  # pinned: a conviction goes to the peer of the record, no one answering in its place
            async with self.http.post(f"{url}/accusations", data=body, headers=headers, ssl=self.transport.pin(peer_id)) as response:
                message = wire.decode(await response.read(), self.max_frame)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, SwarmError) as exc:
            return type(exc).__name__
        self.sent += 1
        return message.get("status") or message.get("code")
