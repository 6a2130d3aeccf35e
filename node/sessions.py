"""The inference sessions a node holds: who owns each, where it pushes, its KV cache."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from node.channel import Channel
from swarm.errors import BadRequest, SessionNotFound
from swarm.model.block import KVCache


@dataclass(frozen=True)
class NextHop:
    url: str
    session: str


@dataclass
class Session:
    id: str
    owner: Channel  # the client's websocket: acks, results and errors go here
    blocks: tuple[int, int]
    max_length: int
    wire_dtype: str
    next_hop: NextHop | None
    cache: KVCache
    newest_step: int = -1  # highest step number run so far
    last_active: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()


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

    def idle(self, timeout_s: float, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        return [s for s in self._by_id.values() if now - s.last_active > timeout_s]
