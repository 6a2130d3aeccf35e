"""The web page of `swarm serve`: a streaming chat and a live map of the swarm.

- `GET /`: the page (client/web/index.html; its script and style under `/static/`,
  shipped in the package: no build step, nothing fetched from elsewhere).
- `GET /swarm/map`: the map now, as JSON (client/swarm_map.py).
- `GET /swarm/events`: the map as a server-sent event stream: one `map` event at
  once, another whenever it changes (checked every `FEED_TICK_S`, and at least
  every watch period for the round trips). Streams are bounded: `max_streams` in
  all and `max_streams_per_source` per client address (beyond: 429 `busy`), each
  lives at most `max_stream_s` (the page reconnects), and every one ends when
  its client goes, stops reading, or the server shuts down.

The chat talks to `/v1/chat/completions` (client/openai_api.py) like any OpenAI
client. The page and the map need no API key (the map shows what any bootstrap
peer lists anyway); the page asks for the key when the server wants one.

`install_page(app)` (called by `build_app`) runs the `SwarmWatch` (client/watch.py)
for the server's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from client import swarm_map
from client.watch import SwarmWatch, WatchConfig, watching

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
FEED_TICK_S = 0.5  # how often a feed looks for changes (live sessions come and go between watch rounds)


@dataclass(frozen=True)
class FeedConfig:
    max_streams: int = 64
    max_streams_per_source: int = 4  # a page needs one; a few tabs more
    max_stream_s: float = 600.0  # a stream ends after this; EventSource-style clients reconnect
    write_timeout_s: float = 10.0  # a client that takes longer to read one event loses its stream


class Feeds:
    """The open `/swarm/events` streams: counted per source, all ended at shutdown."""

    def __init__(self, config: FeedConfig) -> None:
        self.config = config
        self.by_source: Counter[str] = Counter()
        self.closing = asyncio.Event()
        self._latest: tuple[float, dict[str, Any], dict[str, Any]] | None = None  # (when, map, its steady part)

    def latest(self, app: web.Application) -> tuple[dict[str, Any], dict[str, Any]]:
        """The map and its steady part, made at most once per half tick however many streams ask."""
        now = time.monotonic()
        if self._latest is None or now - self._latest[0] >= FEED_TICK_S / 2:
            snap = current_map(app)
            self._latest = (now, snap, swarm_map.steady(snap))
        return self._latest[1], self._latest[2]

    @contextlib.contextmanager
    def admit(self, source: str):
        if sum(self.by_source.values()) >= self.config.max_streams or self.by_source[source] >= self.config.max_streams_per_source:
            raise web.HTTPTooManyRequests(
                text=json.dumps({"error": {"message": "too many map streams", "type": "busy", "code": "busy"}}), content_type="application/json"
            )
        self.by_source[source] += 1
        try:
            yield
        finally:
            self.by_source[source] -= 1
            if not self.by_source[source]:
                del self.by_source[source]

    async def close(self, app: web.Application) -> None:
        self.closing.set()


WATCH = web.AppKey("watch", SwarmWatch)
FEEDS = web.AppKey("feeds", Feeds)


def install_page(app: web.Application) -> None:
    """The page's state on `app` (built by `build_app`, after MODEL and CONFIG): the swarm watch,
    run while the server runs, and the map streams, ended when it shuts down."""
    from client.serve import CONFIG, MODEL

    model = app[MODEL]
    app[WATCH] = SwarmWatch(model.planner, model.config.transport, WatchConfig(period_s=app[CONFIG].watch_period_s))
    app[FEEDS] = Feeds(FeedConfig())
    app.cleanup_ctx.append(_run_watch)
    app.on_shutdown.append(app[FEEDS].close)


async def _run_watch(app: web.Application) -> AsyncIterator[None]:
    async with watching(app[WATCH]):
        yield


def current_map(app: web.Application) -> dict[str, Any]:
    from client.serve import CONFIG, LIVE, MODEL, MODEL_IDS

    model, watch = app[MODEL], app[WATCH]
    planner = model.planner
    clock = planner.clock()
    measured = {p: m for p in planner.measurements.peers if (m := planner.measurements.measured_per_block(p, clock)) is not None}
    snap = swarm_map.snapshot(
        planner.num_layers,
        app[MODEL_IDS][0],  # the name requests use (client/openai_api.py model_ids)
        watch.records(),
        watch.health,
        app[LIVE].snapshot(),
        measured,
        now=watch.clock(),
        monotonic_now=time.monotonic(),
    )
    snap["watch"] = {"rounds": watch.rounds, "period_s": watch.config.period_s, "bootstrap_ok": watch.bootstrap_ok}
    snap["api_key_required"] = app[CONFIG].api_key is not None
    return snap


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})


async def map_json(request: web.Request) -> web.Response:
    return web.json_response(current_map(request.app), headers={"Cache-Control": "no-store"})


async def map_events(request: web.Request) -> web.StreamResponse:
    feeds, watch = request.app[FEEDS], request.app[WATCH]
    with feeds.admit(request.remote or "?"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        ends = time.monotonic() + feeds.config.max_stream_s
        last: dict[str, Any] | None = None
        last_sent = 0.0
        # the client went, or does not read what it asked for (its buffers full): its stream ends here
        with contextlib.suppress(ConnectionResetError, asyncio.TimeoutError):
            while not feeds.closing.is_set() and time.monotonic() < ends:
                snap, steady = feeds.latest(request.app)
                if steady != last or time.monotonic() - last_sent >= watch.config.period_s:
                    event = f"event: map\ndata: {json.dumps(snap, separators=(',', ':'))}\n\n".encode()
                    await asyncio.wait_for(response.write(event), feeds.config.write_timeout_s)
                    last, last_sent = steady, time.monotonic()
                await _first(watch.changed.wait(), feeds.closing.wait(), timeout=FEED_TICK_S)
        return response


async def _first(*waits, timeout: float) -> None:
    """Wait until one of `waits` finishes or `timeout` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def page_routes() -> list[web.RouteDef]:
    return [
        web.get("/", index),
        web.get("/swarm/map", map_json),
        web.get("/swarm/events", map_events),
        web.static("/static", WEB),
    ]
