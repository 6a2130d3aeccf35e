"""`swarm serve`: one aiohttp server for the OpenAI API, the web page and `/metrics`.

The pieces, each its own module: client/openai_api.py (`/v1/*`), client/page.py
(`/`, its static files, the live swarm map), client/api_metrics.py (`/metrics`),
client/watch.py (keeps the swarm view fresh and probes each peer, for the map
and for routing). What they share lives in the app under the keys below.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from client.api_metrics import ApiMetrics, metrics_routes
from client.live import LiveGenerations
from client.openai_schema import ApiError
from client.speculate import MAX_DRAFT
from client.swarm import SwarmModel

log = logging.getLogger(__name__)

MODEL = web.AppKey("model", SwarmModel)
CONFIG = web.AppKey("config", "ServeConfig")
LIVE = web.AppKey("live", LiveGenerations)
METRICS = web.AppKey("metrics", ApiMetrics)
MODEL_IDS = web.AppKey("model_ids", tuple)  # the id /v1/models lists, then the other names of the same checkpoint
TOKENS = web.RequestKey("tokens", int)  # completion tokens a request produced, for its log line

# With an api key set, these need it; the page (`/`) and its static files stay open.
PROTECTED_PREFIXES = ("/v1/", "/metrics")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth (a loopback server); else /v1 and /metrics need `Authorization: Bearer KEY`
    model_id: str = ""  # the name /v1/models lists and requests must use ("" : the checkpoint's alias)
    max_concurrent: int = 64  # generations in flight; beyond it a request gets 429 `busy`
    watch_period_s: float = 2.0  # how often the swarm view is re-read and peers probed (client/watch.py)
    default_max_tokens: int = 512  # a request without max_tokens gets this many at most (each session's KV cache is sized by it)
    speculate: bool = True  # requests that do not say (the API's `speculate` field) send draft tokens (client/speculate.py)
    max_draft: int = 8  # the most drafts a step carries

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.default_max_tokens < 1:
            raise ValueError("max_concurrent and default_max_tokens must be at least 1")
        if not 0 <= self.max_draft <= MAX_DRAFT:
            raise ValueError(f"max_draft must be in [0, {MAX_DRAFT}]")


def build_app(model: SwarmModel, config: ServeConfig) -> web.Application:
    from client.openai_api import api_errors, model_ids, openai_routes  # they read the keys above: imported here, not at the top
    from client.page import install_page, page_routes

    app = web.Application(middlewares=[request_log, authenticate, web.middleware(api_errors)])
    app[MODEL] = model
    app[CONFIG] = config
    app[MODEL_IDS] = model_ids(model, config)
    app[LIVE] = LiveGenerations()
    app[METRICS] = ApiMetrics(app[LIVE])
    app.add_routes(openai_routes())
    app.add_routes(page_routes())
    install_page(app)  # the swarm watch (client/watch.py) and the map's streams
    app.add_routes(metrics_routes())
    return app


@web.middleware
async def request_log(request: web.Request, handler) -> web.StreamResponse:
    """One line per request on this module's logger (method, path, status, tokens, seconds), and the request metric."""
    began = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away before the answer was complete
        raise
    finally:
        seconds = time.perf_counter() - began
        log.info("%s %s %d %d tokens %.3f s", request.method, request.path, status, request.get(TOKENS, 0), seconds)
        resource = request.match_info.route.resource
        request.app[METRICS].request(resource.canonical if resource is not None else "unmatched", status, seconds)


@web.middleware
async def authenticate(request: web.Request, handler) -> web.StreamResponse:
    """With `ServeConfig.api_key` set, /v1 and /metrics need `Authorization: Bearer KEY` (compared in constant time)."""
    key = request.app[CONFIG].api_key
    if key is not None and request.path.startswith(PROTECTED_PREFIXES):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            error = ApiError(
                401,
                "Incorrect API key provided: give it as `Authorization: Bearer KEY`.",
                "invalid_request_error",
                "invalid_api_key",
            )
            return web.json_response(error.body(), status=401, headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def run_server(
    model: SwarmModel, config: ServeConfig, ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (or the task is cancelled). `ready(url)` is called once listening
    (port 0 picks a free port; the url says which)."""
    app = build_app(model, config)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # generations it runs, whose sessions close at once instead of running to max_tokens.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        log.info("serving %s at %s", app[MODEL_IDS][0], url)
        if ready is not None:
            ready(url)
        await (stop if stop is not None else asyncio.Event()).wait()
    finally:
        await runner.cleanup()
