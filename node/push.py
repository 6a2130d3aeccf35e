"""Outbound websockets to next hops, one per URL, shared by every session that pushes there.

A node pushes each step's output straight to the next hop's session. The
connection is opened on first use and reused; if it breaks, the push fails (the
session owner hears `peer_unavailable`) and the next push dials again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from node.channel import Channel
from swarm import wire
from swarm.errors import PeerUnavailable

log = logging.getLogger(__name__)


class PushPool:
    def __init__(self, http: aiohttp.ClientSession, max_frame: int, connect_timeout: float = 5.0) -> None:
        self.http = http
        self.max_frame = max_frame
        self.connect_timeout = connect_timeout
        self._channels: dict[str, Channel] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._readers: set[asyncio.Task] = set()

    async def push(self, url: str, message: dict[str, Any]) -> None:
        channel = await self._channel(url)
        if not await channel.send(message):
            self._channels.pop(url, None)
            raise PeerUnavailable(f"next hop {url} closed the connection")

    async def _channel(self, url: str) -> Channel:
        channel = self._channels.get(url)
        if channel and not channel.closed:
            return channel
        async with self._dialing.setdefault(url, asyncio.Lock()):
            channel = self._channels.get(url)
            if channel and not channel.closed:
                return channel
            try:
                ws = await self.http.ws_connect(
                    f"{url.rstrip('/')}/session", timeout=aiohttp.ClientWSTimeout(ws_close=2.0), max_msg_size=2 * self.max_frame,
                    heartbeat=None, autoping=True, compress=0,
                )
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise PeerUnavailable(f"cannot reach next hop {url}: {exc}") from None
            channel = Channel(ws, url)
            self._channels[url] = channel
            reader = asyncio.create_task(self._read(channel), name=f"push-reader {url}")
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            return channel

    async def _read(self, channel: Channel) -> None:
        """Drain what the next hop says on this connection (only errors it cannot route to an owner)."""
        async for msg in channel.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                try:
                    message = wire.decode(msg.data, self.max_frame)
                except Exception as exc:  # noqa: BLE001 - a bad frame from a peer is only logged
                    log.debug("unreadable frame from %s: %s", channel.name, exc)
                    continue
                log.debug("next hop %s says %s: %s", channel.name, message.get("type"), message.get("message", ""))
        if self._channels.get(channel.name) is channel:
            del self._channels[channel.name]

    async def close(self) -> None:
        for channel in list(self._channels.values()):
            await channel.ws.close()
        self._channels.clear()
        for reader in list(self._readers):
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
