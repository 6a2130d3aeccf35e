"""Contract stub: filled in by its owner in issue 13."""

from aiohttp import web


def page_routes() -> list[web.RouteDef]:
    return []
