"""Contract stub: filled in by its owner in issue 13."""

from aiohttp import web


def openai_routes() -> list[web.RouteDef]:
    return []
