"""What a route session does with the frames its hops send: each is parsed whole, believed
only from the hop it concerns (`opened`/`retargeted` from the hop asked, an `ack` from a hop of
the step's chain, a `result` from that chain's last hop), and resolves or fails what awaits it.

`SessionInbox` is the reading half of `RouteSession` (client/session.py), which owns the
state it reads and writes: `hops`, `config`, `max_length`, `_pending`, `_unacked`,
`_settled`, `_asking`, `tape`, `head_tape` and `_fail_all`."""

from __future__ import annotations

import asyncio

import aiohttp
import torch

from client.hop_state import HopState, at_hop, fail_future, resolve_future
from client.remote_head import Candidates
from swarm import wire
from swarm.errors import BadRequest, PeerUnavailable, SwarmError, error_from_code
from swarm.head_protocol import HeadResult, parse_session
from swarm.protocol import Ack, Draining, Error, Limits, Message, Opened, Result, Retargeted


class SessionInbox:
    """Reads each hop's connection and dispatches what it sends (mixed into `RouteSession`)."""

    async def _read(self, state: HopState) -> None:
        assert state.ws is not None
        limits = Limits(max_tokens=self.max_length)
        try:
            async for msg in state.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    self._dispatch(state, parse_session(wire.decode(msg.data, self.config.max_frame), limits))
                except SwarmError as exc:  # a node that breaks the protocol: transient, so failover routes around it
                    if not state.retired:
                        self._fail_all(at_hop(PeerUnavailable(f"{state.hop} sent a malformed message: {exc}"), state.hop))
        finally:
            if not state.retired and (state.ws.close_code is not None or state.ws.closed):
                self._fail_all(at_hop(PeerUnavailable(f"{state.hop} closed the connection"), state.hop))

    def _dispatch(self, state: HopState, message: Message) -> None:
        if state.retired:
            return
        if isinstance(message, (Opened, Retargeted)):
            # only the reply we asked this hop for, about its own session
            if state.expect is type(message) and message.session == state.session_id:
                resolve_future(state.reply, message)
        elif isinstance(message, Draining):
            if message.session == state.session_id:
                state.draining = True
        elif isinstance(message, Ack):
            if message.session == state.session_id:
                self._on_ack(state, message)
        elif isinstance(message, Result):
            pending = self._pending.get(message.step)
            if message.session != state.session_id or pending is None or state is not pending.chain[-1]:
                return  # only the last hop of the chain a step runs through answers it (while it is awaited)
            if bool(state.head) != isinstance(message, HeadResult):
                raise BadRequest("a last hop answered with the head's candidates when not asked, or without them when asked")
            if message.hidden.shape[0] != pending.rows:
                raise BadRequest(f"a last hop answered {message.hidden.shape[0]} rows for a step of {pending.rows}")
            answer = Candidates.of(message, self.config.vocab_size) if isinstance(message, HeadResult) else message.hidden
            state.acked = max(state.acked, message.step)
            state.compute_ms = message.compute_ms
            state.seal = message.seal
            self._tapped(state, message.step, message.hidden, message.dtype, message.seal)
            if isinstance(answer, Candidates) and self.head_tape is not None:
                self.head_tape.add(state.hop, message.hidden, answer)
            resolve_future(pending.done, answer)
        elif isinstance(message, Error):
            if message.session is not None and message.session != state.session_id:
                return  # about a session that is not this hop's: not ours to believe
            error = error_from_code(message.code, f"{state.hop}: {message.message}")
            # the hop to route around: the reporter, or the next hop it could not push to
            known = [*self.hops, *self._asking, *(s for p in self._pending.values() for s in p.chain)]
            blamed = next((h.hop for h in known if message.hop is not None and h.hop.peer_id == message.hop), state.hop)
            at_hop(error, blamed)
            if state.reply is not None and not state.reply.done():
                fail_future(state.reply, error)
            elif message.step is not None:
                # A step's error fails that step. One no longer awaited is about a step failover
                # already replaced (a hop before the failed one finishing it late): nothing to do.
                pending = self._pending.get(message.step)
                fail_future(pending.done if pending is not None and state in pending.chain else None, error)
            else:
                self._fail_all(error)

    def _on_ack(self, state: HopState, ack: Ack) -> None:
        """An ack of a hop of the step's chain: still awaited (it times the step), or trailing its result."""
        sent = self._unacked.get(ack.step)
        if sent is None or state not in sent[0]:
            return  # not a hop this step runs through, or one that acked it already
        pending = self._pending.get(ack.step)
        if pending is not None:
            state.acked = max(state.acked, ack.step)
            state.compute_ms = ack.compute_ms
        state.seal = ack.seal
        if ack.hidden is not None and ack.dtype is not None:
            self._tapped(state, ack.step, ack.hidden, ack.dtype, ack.seal)
        waiting = sent[1]
        waiting.discard(state)
        if not waiting:
            del self._unacked[ack.step]
            if not self._unacked:
                self._settled.set()

    def _tapped(self, state: HopState, step: int, hidden: torch.Tensor, dtype: str, seal: bytes) -> None:
        if self.tape is not None:
            index = next((i for i, h in enumerate(self.hops) if h is state), None)
            if index is not None:
                self.tape.tapped(index, step, hidden, dtype, seal)

    async def settle(self, timeout: float) -> bool:
        """Wait (at most `timeout`) for the acks still owed for steps already answered; whether all came.
        Acks of steps that failed never come: this is for a session whose every step succeeded."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
