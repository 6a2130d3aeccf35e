"""A websocket we send frames on, from several tasks at once.

Sends are serialised by a lock so frames never interleave, and a peer that went
away is not an exception for the sender: `send` says whether the frame left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from swarm import wire
from swarm.protocol import Error, Message

log = logging.getLogger(__name__)


class Channel:
    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        name: str,
        source: str = "",
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.ws = ws
        self.on_error = on_error  # told the code of every error frame sent (node/metrics.py counts them)
        self.name = name
        self.source = source  # the per-source limits' key of whoever is at the other end (inbound only)
        self.proved = False  # inbound: this connection already had its one `proof` signed
        self.last_used = time.monotonic()  # last frame in or out: idle connections are closed
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def send(self, message: Message | dict[str, Any]) -> bool:
        if self.on_error is not None and isinstance(message, Error):
            self.on_error(message.code)
        frame = wire.encode(message if isinstance(message, dict) else message.to_wire())
        async with self._lock:
            if self.ws.closed:
                return False
            try:
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                log.debug("send to %s failed: %s", self.name, exc)
                return False
        self.last_used = time.monotonic()
        return True
