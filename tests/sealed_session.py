"""A raw session over a chain of real nodes with every hop tapped: the evidence a verifying client holds.

`TappedChain` opens one session per hop (last hop first, so each hop can be given
the next one's signed record), steps hidden states through the chain by push, and
keeps what every hop received and sent, exactly as wire tensors, with the seal
of each of its steps. `accusation(hop, steps)` builds the charge a client would
bring against that hop from those taps (swarm/accusation.py).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch

from swarm import wire
from swarm.accusation import Accusation, Evidence
from swarm.identity import Identity, peer_id_from_public_key
from swarm.protocol import Ack, NextHop, Open, Opened, Result, Step, parse


@dataclass
class Hop:
    url: str
    blocks: tuple[int, int]
    peer_id: str
    session: str = ""
    public_key: bytes = b""
    ws: aiohttp.ClientWebSocketResponse | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)  # wire tensors, per step
    outputs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)  # (step, position)
    seals: list[bytes] = field(default_factory=list)


def packed(tensor: torch.Tensor, dtype: str) -> dict[str, Any]:
    """A tensor as its wire dict, with `data` as bytes (what a peer decodes)."""
    out = wire.pack_tensor(tensor, dtype)
    return {**out, "data": bytes(out["data"])}


class TappedChain:
    def __init__(self, http: aiohttp.ClientSession, hops: list[tuple[str, tuple[int, int], str]], model: str, max_length: int = 64, dtype: str = "bfloat16") -> None:
        self.http = http
        self.hops = [Hop(url, tuple(blocks), peer_id) for url, blocks, peer_id in hops]
        self.model = model
        self.max_length = max_length
        self.dtype = dtype
        self.step_number = 0
        self.position = 0

    async def __aenter__(self) -> TappedChain:
        tag = uuid.uuid4().hex[:12]
        after: tuple[Hop, str, Opened] | None = None
        for index in reversed(range(len(self.hops))):
            hop = self.hops[index]
            hop.session = f"t{tag}-{index}"
            token = secrets.token_urlsafe(16)
            hop.ws = await self.http.ws_connect(f"{hop.url}/session", max_msg_size=0)
            following = None
            if after is not None:
                nxt, nxt_token, opened = after
                following = NextHop(nxt.url, nxt.session, nxt.peer_id, nxt_token, opened.record)
            nonce = secrets.token_bytes(32)
            await hop.ws.send_bytes(wire.encode(Open(hop.session, hop.blocks, self.max_length, self.dtype, self.model, nonce, token, following, tap=True).to_wire()))
            opened = await self._receive(hop)
            assert isinstance(opened, Opened), opened
            assert peer_id_from_public_key(opened.public_key) == hop.peer_id
            hop.public_key = opened.public_key
            after = (hop, token, opened)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for hop in self.hops:
            if hop.ws is not None:
                await hop.ws.close()

    async def _receive(self, hop: Hop):
        msg = await hop.ws.receive(timeout=60)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        message = parse(wire.decode(msg.data))
        if message.TYPE == "error":
            raise RuntimeError(f"{hop.url}: {message.code}: {message.message}")
        return message

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """One step of `hidden` [T, D] at the next position (or at `position`, rewinding); the last hop's output."""
        given = packed(hidden, self.dtype)
        step, position = self.step_number, self.position if position is None else position
        first = self.hops[0]
        await first.ws.send_bytes(wire.encode(Step(first.session, step, position, hidden, self.dtype, "all").to_wire()))
        out = None
        for index, hop in enumerate(self.hops):
            answer = await self._receive(hop)
            last = index == len(self.hops) - 1
            assert isinstance(answer, Result if last else Ack), answer
            assert answer.step == step and answer.hidden is not None and answer.dtype == self.dtype
            hop.inputs.append(given)
            hop.outputs.append(packed(answer.hidden, answer.dtype))
            hop.steps.append((step, position))
            hop.seals.append(answer.seal)
            given = hop.outputs[-1]
            out = answer.hidden
        self.step_number += 1
        self.position = position + hidden.shape[0]
        return out

    def accusation(self, index: int, accuser: Identity, steps: int | None = None) -> Accusation:
        """The charge against hop `index` from its first `steps` steps (all by default), signed by `accuser`."""
        hop = self.hops[index]
        count = len(hop.steps) if steps is None else steps
        evidence = tuple(Evidence(s, p, i, o) for (s, p), i, o in zip(hop.steps[:count], hop.inputs[:count], hop.outputs[:count]))
        unsigned = Accusation(self.model, hop.blocks, hop.session, hop.public_key, evidence, hop.seals[count - 1])
        return unsigned.signed_by(accuser)
