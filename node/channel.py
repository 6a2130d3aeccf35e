"""A websocket we send frames on, from several tasks at once.

Sends are serialised by a lock so frames never interleave, and a peer that went
away is not an exception for the sender: `send` says whether the frame left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from swarm import wire

log = logging.getLogger(__name__)


class Channel:
    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, name: str) -> None:
        self.ws = ws
        self.name = name
        self._lock = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def send(self, message: dict[str, Any]) -> bool:
        frame = wire.encode(message)
        async with self._lock:
            if self.ws.closed:
                return False
            try:
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                log.debug("send to %s failed: %s", self.name, exc)
                return False
        return True
