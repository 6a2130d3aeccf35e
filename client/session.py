"""An inference session across a route of nodes.

The client opens a session on every hop, each told to push its output to the
next hop's session; a step goes to the first hop and the result comes back from
the last. Every hop acknowledges each step to the client, so the client sees at
once which hop failed. Everything opened is closed on exit, also on errors and
cancellation.

Every hop proves who it is: `open` carries a fresh nonce, and the hop's `opened`
must be signed over it by the key whose hash is the peer id the route was
planned with (`RemoteHop.peer_id`), else the hop is refused with `HopNotProven`
naming it (failover routes around it). Each hop also gets a secret push token
at open, which only the hop before it learns (in `next`). The client believes
a `result` only from the last hop of the chain it sent the step to, an `ack`
only from a hop of that chain (with that hop's session id), and `opened` /
`retargeted` only from the hop it asked.

Every session is tapped (`Open.tap`): each hop's `ack` carries the output it
pushed on and every `ack`/`result` a seal over the hop's transcript
(swarm/seal.py). The latest seal of each hop is kept; the tapped tensors are
dropped at once unless the generation is being checked, in which case `tape`
(client/verify.py) keeps what checking its chosen hop needs. An `ack` is taken
after its step is answered too (a hop sends it after pushing on, so it can
trail the last hop's `result`), and `settle` waits for the trailing ones.

`replace` swaps one failed hop for a new sub-route over the same blocks while
every other hop keeps its session and KV cache: the prefix is run statelessly
(POST /forward) through the hops before the gap to get the gap's inputs, the new
hops prefill from them, then the hop before the gap is retargeted to push into
the new sub-route and the new sub-route's last hop to push to the hop after it.

The hops' types and error marking are in client/hop_state.py and the handling of what hops
send in client/session_inbox.py; their public names are importable from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aiohttp
import torch

from client.hop_state import (  # some only re-exported: callers import the session's types from here
    HopState,
    Pending,
    RemoteHop,
    SessionConfig,
    at_hop,
    check_contiguous,
    fail_future,
    hop_of,
    identity_mismatch,
    next_hop_address,
    usable_record,
)
from client.remote_head import Candidates, HeadTape, head_request
from client.session_inbox import SessionInbox
from client.verify import Tape
from swarm import wire
from swarm.errors import BadRequest, HopNotProven, PeerUnavailable, SwarmError, error_from_code
from swarm.identity import peer_id_from_public_key, verify
from swarm.protocol import Close, Message, Open, Opened, Retarget, Retargeted, Step, opened_payload
from swarm.transport import PinMismatch, Transport

log = logging.getLogger(__name__)


class RouteSession(SessionInbox):
    """`async with RouteSession(http, hops, model_digest, max_length) as s: hidden = await s.forward(x, 0)`."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        hops: Sequence[RemoteHop],
        model: str,
        max_length: int,
        config: SessionConfig | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not hops:
            raise BadRequest("a route needs at least one hop")
        check_contiguous(hops, "route")
        self.http = http
        self.transport = transport or Transport()  # every hop's connection is pinned to its peer id
        self.model = model
        self.max_length = max_length
        self.config = config or SessionConfig()
        self.hops = [HopState(h, record=h.record) for h in hops]
        self._step = 0
        self._pending: dict[int, Pending] = {}
        self._unacked: dict[int, tuple[tuple[HopState, ...], set[HopState]]] = {}  # step -> (its chain, hops yet to ack)
        self._settled = asyncio.Event()  # set while no ack is outstanding
        self._settled.set()
        self.tape: Tape | None = None  # set for a checked generation: what checking one hop needs
        self.head_tape: HeadTape | None = None  # ... and a sample of the steps a last hop applied the head for
        self._asking: set[HopState] = set()  # hops we await a reply from (`opened`, `retargeted`)
        self._retiring: list[asyncio.Future] = []  # replaced hops, closing in the background
        self.broken: SwarmError | None = None  # set once a hop fails the whole session

    @property
    def route(self) -> list[RemoteHop]:
        return [h.hop for h in self.hops]

    def take_draining(self) -> list[RemoteHop]:
        """Hops whose node said it is shutting down since the last call: they still serve, but
        each should be `replace`d before its node goes."""
        draining = [h for h in self.hops if h.draining]
        for state in draining:
            state.draining = False
        return [h.hop for h in draining]

    @property
    def compute_ms(self) -> list[float]:
        """Each hop's model time for the last step it acknowledged."""
        return [h.compute_ms for h in self.hops]

    async def __aenter__(self) -> RouteSession:
        try:
            await asyncio.wait_for(self._open_all(), self.config.open_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _open_all(self) -> None:
        await self._connect(self.hops)
        await self._open(self.hops, None)

    async def _connect(self, states: Sequence[HopState]) -> None:
        for state in states:
            try:
                state.ws = await self.http.ws_connect(
                    f"{state.hop.url.rstrip('/')}/session",
                    max_msg_size=self.config.max_frame,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.config.close_timeout_s),
                    ssl=self.transport.pin(state.hop.peer_id),
                )
            except PinMismatch as exc:
                raise at_hop(identity_mismatch(state.hop, exc), state.hop) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise at_hop(PeerUnavailable(f"cannot reach {state.hop} at {state.hop.url}: {exc}"), state.hop) from None
            if state.ws.closed or state.ws.close_code is not None:
                raise at_hop(PeerUnavailable(f"{state.hop} closed the connection at once"), state.hop)
            state.reader = asyncio.create_task(self._read(state), name=f"session-reader {state.hop}")

    async def _open(self, states: Sequence[HopState], after: HopState | None) -> None:
        """Open `states` (a chain) from the last backwards, so every push target exists before it is used."""
        for index in reversed(range(len(states))):
            state = states[index]
            target = states[index + 1] if index + 1 < len(states) else after
            blocks = (state.hop.start, state.hop.end)
            c = self.config
            state.head = head_request(c.remote_head, c.head_candidates, c.vocab_size, state.hop, state.record, target is None)
            message = Open(state.session_id, blocks, self.max_length, c.wire_dtype, self.model, state.nonce, state.token, next_hop_address(target), c.tap, state.head)
            opened = await self._request(state, message, Opened)
            self._check_opened(state, opened)

    def _check_opened(self, state: HopState, opened: Opened) -> None:
        """The hop signed our nonce with the key of the peer we routed to, or it is refused."""
        hop = state.hop
        blocks = (hop.start, hop.end)
        if not hop.peer_id or opened.peer_id != hop.peer_id or peer_id_from_public_key(opened.public_key) != hop.peer_id:
            raise at_hop(HopNotProven(f"{hop} answered with the key of another peer"), hop)
        if opened.blocks != blocks or not verify(opened.public_key, opened.signature, opened_payload(state.nonce, state.session_id, blocks)):
            raise at_hop(HopNotProven(f"{hop} did not sign our nonce for its session"), hop)
        state.public_key = opened.public_key
        record = opened.record
        if record is not None and usable_record(record, hop):
            state.record = record  # the previous hop needs it to admit this one as its next hop

    async def _request(self, state: HopState, message: Message, expect: type[Message]) -> Message:
        """Send a control message to one hop and wait for its reply (`opened`, `retargeted`): only that
        hop's reply of that type, for that session, counts."""
        state.reply = asyncio.get_running_loop().create_future()
        state.expect = expect
        self._asking.add(state)
        try:
            await self._send(state, message)
            return await state.reply
        finally:
            state.reply, state.expect = None, None
            self._asking.discard(state)

    async def _send(self, state: HopState, message: Message) -> None:
        # A connection can be closing before its reader has noticed; the write then raises.
        try:
            if state.ws is None or state.ws.closed:
                raise ConnectionResetError("closed")
            await state.ws.send_bytes(wire.encode(message.to_wire()))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise at_hop(PeerUnavailable(f"connection to {state.hop} is closed ({exc})"), state.hop) from None

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last", timeout: float | None = None) -> torch.Tensor | Candidates:
        """Run hidden [T, D] at position `start` through every hop; returns [1, D] ("last") or [T, D]
        ("all"), or `Candidates` of as many rows when the last hop applies the head (client/remote_head.py).
        `start` may rewind to any position written so far: the hops overwrite from there (speculation).

        A step not answered within `timeout` (default `step_timeout_s`) fails with
        `PeerUnavailable` naming the first hop that has not acknowledged it.
        """
        if self.broken is not None:
            raise self.broken
        return await self._run(self.hops, hidden, start, output, timeout or self.config.step_timeout_s)

    async def _run(self, chain: Sequence[HopState], hidden: torch.Tensor, start: int, output: str, timeout: float) -> torch.Tensor | Candidates:
        """One step sent to `chain[0]`, answered by the chain's last hop."""
        step = self._step
        self._step += 1
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending[step] = Pending(step, done, tuple(chain), hidden.shape[0] if output == "all" else 1)
        if len(chain) > 1:
            self._unacked[step] = (tuple(chain), set(chain[:-1]))
            self._settled.clear()
        first = chain[0]
        if self.tape is not None and first is self.hops[0]:
            self.tape.sent(step, start, hidden, self.config.wire_dtype)
        message = Step(first.session_id, step, start, hidden, self.config.wire_dtype, output)
        # A timer on `done` itself, not wait_for: the answer then wakes this task in one loop pass, not
        # three (wait_for's own future and callbacks), on every step.
        timer = loop.call_later(timeout, fail_future, done, asyncio.TimeoutError())
        try:
            await self._send(first, message)
            return await done
        except asyncio.TimeoutError:
            laggard = next((s.hop for s in chain if s.acked < step), chain[-1].hop)
            raise at_hop(PeerUnavailable(f"step {step} timed out after {timeout:g} s waiting for {laggard}"), laggard) from None
        finally:
            timer.cancel()
            self._pending.pop(step, None)

    async def replace(self, failed: RemoteHop, hops: Sequence[RemoteHop], prefix: torch.Tensor) -> None:
        """Put `hops` (covering exactly `failed`'s blocks) in place of `failed`; other hops keep their caches.

        `prefix` holds the route's inputs (block 0) for every position already
        computed; the new hops' caches are rebuilt from it. Errors are
        `TransientError`s naming the hop that failed. When it is one of `hops`,
        `failed` is still in the route and `replace` may be called again with
        other hops; when it is a hop the session meant to keep, the session is
        beyond repair and should be closed.
        """
        index = self.route.index(failed)
        if not hops or hops[0].start != failed.start or hops[-1].end != failed.end:
            raise BadRequest(f"a replacement for {failed} must cover blocks [{failed.start}, {failed.end})")
        check_contiguous(hops, "replacement")
        old = self.hops[index]
        if not old.retired:
            old.retired = True  # its connection closing is no longer news
            self._retiring.append(asyncio.ensure_future(self._close_hop(old)))  # a dead hop may take a while
        before = self.hops[index - 1] if index > 0 else None
        after = self.hops[index + 1] if index + 1 < len(self.hops) else None
        fresh = [HopState(h, record=h.record) for h in hops]
        times = [time.perf_counter()]
        try:
            boundary = prefix
            # The gap's inputs: the prefix through the hops before it (none when the
            # prefill itself failed: there is nothing to rebuild, and no hop takes 0 tokens).
            for state in self.hops[:index] if prefix.shape[0] else ():
                boundary = await self._forward_once(state.hop, boundary)
            times.append(time.perf_counter())
            await self._connect(fresh)
            await self._open(fresh, None)
            times.append(time.perf_counter())
            if boundary.shape[0]:
                await self._run(fresh, boundary, 0, "last", self.config.step_timeout_s)
            times.append(time.perf_counter())
            if after is not None:
                await self._request(fresh[-1], Retarget(fresh[-1].session_id, next_hop_address(after)), Retargeted)
        except BaseException:
            for state in fresh:
                state.retired = True
            self._retiring.append(asyncio.ensure_future(asyncio.gather(*(self._close_hop(s) for s in fresh))))
            raise
        self.hops[index : index + 1] = fresh
        if before is not None:  # last: until now `before` pushed to the old hop, or nowhere
            await self._request(before, Retarget(before.session_id, next_hop_address(fresh[0])), Retargeted)
        times.append(time.perf_counter())
        if self.broken is not None and hop_of(self.broken) not in self.route:
            self.broken = None  # it was about a hop that is gone now
        phases = " ".join(f"{name} {1e3 * (b - a):.0f} ms" for name, a, b in zip(("boundary", "open", "prefill", "retarget"), times, times[1:]))
        log.info("replaced %s with %s for %d positions: %s", failed, " -> ".join(map(str, hops)), prefix.shape[0], phases)

    async def _forward_once(self, hop: RemoteHop, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states through `hop`'s blocks without touching any session (POST /forward)."""
        body = wire.encode({"type": "forward", "model": self.model, "blocks": [hop.start, hop.end], "hidden": wire.pack_tensor(hidden, self.config.wire_dtype)})
        try:
            async with self.http.post(
                f"{hop.url.rstrip('/')}/forward",
                data=body,
                headers={"Content-Type": "application/msgpack"},
                timeout=aiohttp.ClientTimeout(total=self.config.step_timeout_s),
                ssl=self.transport.pin(hop.peer_id),
            ) as response:
                message = wire.decode(await response.read(), self.config.max_frame)
        except PinMismatch as exc:
            raise at_hop(identity_mismatch(hop, exc), hop) from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise at_hop(PeerUnavailable(f"cannot forward through {hop}: {exc or type(exc).__name__}"), hop) from None
        if message.get("type") == "error":
            raise at_hop(error_from_code(str(message.get("code")), f"{hop}: {message.get('message')}"), hop)
        return wire.unpack_tensor(message.get("hidden"), hidden_size=hidden.shape[1], max_tokens=hidden.shape[0])

    @property
    def head_hop(self) -> RemoteHop | None:
        """The last hop, when it applies the LM head for this session (client/remote_head.py)."""
        return self.hops[-1].hop if self.hops[-1].head else None

    def proven(self, index: int) -> tuple[RemoteHop, str, bytes]:
        """Hop `index` of the route: where it is, its session id, and the key it proved at open."""
        state = self.hops[index]
        return state.hop, state.session_id, state.public_key

    def _fail_all(self, error: SwarmError) -> None:
        if self.broken is None:
            self.broken = error
        replies = [s.reply for s in self._asking if s.reply is not None]
        for future in replies + [p.done for p in self._pending.values()]:
            fail_future(future, error)

    async def close(self) -> None:
        """Close every hop's session and connection. Safe to call twice."""
        await asyncio.gather(*(self._close_hop(s) for s in self.hops), *self._retiring, return_exceptions=True)

    async def _close_hop(self, state: HopState) -> None:
        ws = state.ws
        if ws is not None and not ws.closed:
            try:
                await ws.send_bytes(wire.encode(Close(state.session_id).to_wire()))
                await ws.close()
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        if state.reader is not None:
            state.reader.cancel()
            await asyncio.gather(state.reader, return_exceptions=True)

