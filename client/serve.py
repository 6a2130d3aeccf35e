"""`swarm serve`: one aiohttp server for the OpenAI API, the web page and `/metrics`.

The pieces, each its own module: client/openai_api.py (`/v1/*`), client/page.py
(`/`, its static files, the live swarm map), client/api_metrics.py (`/metrics`),
client/watch.py (keeps the swarm view fresh and probes each peer, for the map
and for routing). What they share lives in the app under the keys below.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from client.api_metrics import ApiMetrics, metrics_routes
from client.live import LiveGenerations
from client.swarm import SwarmModel

MODEL = web.AppKey("model", SwarmModel)
CONFIG = web.AppKey("config", "ServeConfig")
LIVE = web.AppKey("live", LiveGenerations)
METRICS = web.AppKey("metrics", ApiMetrics)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth (a loopback server); else every /v1 request needs `Authorization: Bearer KEY`
    model_id: str = ""  # the name /v1/models lists and requests must use ("" : the checkpoint's alias)
    max_concurrent: int = 64  # generations in flight; beyond it a request gets 429 `busy`
    watch_period_s: float = 2.0  # how often the swarm view is re-read and peers probed (client/watch.py)


def build_app(model: SwarmModel, config: ServeConfig) -> web.Application:
    from client.openai_api import openai_routes  # they read the keys above: imported here, not at the top
    from client.page import install_page, page_routes

    app = web.Application()
    app[MODEL] = model
    app[CONFIG] = config
    app[LIVE] = LiveGenerations()
    app[METRICS] = ApiMetrics(app[LIVE])
    app.add_routes(openai_routes())
    app.add_routes(page_routes())
    install_page(app)  # the swarm watch (client/watch.py) and the map's streams
    app.add_routes(metrics_routes())
    return app
