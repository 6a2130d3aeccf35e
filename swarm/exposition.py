"""`GET /metrics` for aiohttp: one handler for a node (node/metrics.py) and `swarm serve` (client/api_metrics.py).

Each process renders its own `CollectorRegistry`, never prometheus-client's global one,
so two nodes in one process (tests) or a node beside a client never mix their counts.
The format follows the scraper's `Accept` header: Prometheus text by default, OpenMetrics
when asked. Rendering reads plain counters and a few histograms: well under a
millisecond, so the route is as cheap for a stranger as `/info`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

METRICS_PATH = "/metrics"


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The registry's samples in the format `accept` asks for: (body, content type)."""
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type


def metrics_handler(registry: Callable[[web.Request], CollectorRegistry]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler that renders the registry `registry(request)` returns (it lives in the app's state)."""

    async def get_metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry(request), request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return get_metrics
