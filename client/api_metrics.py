"""Contract stub for issue 13: `ApiMetrics` is what `swarm serve` counts for `/metrics`.

Its owner replaces the bodies with prometheus-client metrics in the app's own
registry; the API handlers (client/openai_api.py) call these methods as below.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from client.live import LiveGenerations


class ApiMetrics:
    def __init__(self, live: LiveGenerations) -> None:
        self.live = live  # read at scrape time: generations running, and per peer

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request finished (`endpoint`: "/v1/chat/completions", ...; any status, errors included)."""

    def tokens(self, prompt: int, completion: int) -> None:
        """One generation (one choice) finished with these token counts."""

    def first_token(self, seconds: float) -> None:
        """Time from the request's arrival to its first generated token."""

    def inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one generation."""

    def failovers(self, hows: Sequence[str]) -> None:
        """The recoveries of one generation: each "splice" or "reroute" (client/failover.py `Failover.how`)."""


def metrics_routes() -> list[web.RouteDef]:
    return []
