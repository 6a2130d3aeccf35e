"""The inference sessions a node holds: who owns each, where it pushes, its KV cache and push token."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field

from node.channel import Channel
from node.limits import Held
from swarm.errors import BadRequest, SessionNotFound
from swarm.model.block import KVCache
from swarm.protocol import NextHop
from swarm.seal import Transcript


@dataclass
class Session:
    id: str
    owner: Channel  # the client's websocket: acks, results and errors go here; only it may close or retarget
    blocks: tuple[int, int]
    max_length: int
    wire_dtype: str
    next_hop: NextHop | None  # checked by node/push.py `check_next_hop` before it is set
    cache: KVCache
    push_token: str = field(repr=False)  # the previous hop must present it with every pushed step
    transcript: Transcript = field(repr=False)  # every step run, chained: what each ack's seal signs
    tap: bool = False  # the owner wants each output pushed on, in its ack
    hold: Held | None = None  # this session's place in its source's session count
    head: int = 0  # K > 0: answer each step with the LM head's top K (node/head_service.py)
    newest_step: int = -1  # highest step number run so far (-1: never stepped)
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def may_push(self, token: str | None) -> bool:
        """Whether a step carrying `token` may come from someone other than the owner (constant time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.push_token.encode())


class Sessions:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self.emptied = asyncio.Event()  # set while no session is open (a draining node waits on it)
        self.emptied.set()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def add(self, session: Session) -> None:
        if session.id in self._by_id:
            raise BadRequest(f"session {session.id} is already open on this node")
        self._by_id[session.id] = session
        self.emptied.clear()

    def get(self, session_id: str) -> Session:
        session = self._by_id.get(session_id)
        if session is None:
            raise SessionNotFound(f"no open session {session_id} on this node")
        return session

    def find(self, session_id: object) -> Session | None:
        return self._by_id.get(session_id) if isinstance(session_id, str) else None

    def pop(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._by_id[session_id]
        if not self._by_id:
            self.emptied.set()
        return session

    def owned_by(self, owner: Channel) -> list[Session]:
        return [s for s in self._by_id.values() if s.owner is owner]

    def expired(self, timeout_s: float, grace_s: float, now: float | None = None) -> list[tuple[Session, str]]:
        """Sessions to free, with why: idle for `timeout_s`, or never stepped within `grace_s` of opening."""
        now = time.monotonic() if now is None else now
        out = []
        for s in self._by_id.values():
            if s.newest_step < 0 and now - s.opened_at > grace_s:
                out.append((s, f"was never stepped within {grace_s:g} s of opening"))
            elif now - s.last_active > timeout_s:
                out.append((s, f"expired after {timeout_s:g} s idle"))
        return out
