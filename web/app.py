"""The aiohttp application: `create_app(deps)` builds it from one route table.

Middlewares, outermost first: request metrics, the audit log of API writes (web/audit.py), the
error boundary (JSON errors, never a traceback), then the fleet's forwarding of a write on a server
another appliance holds (web/api_fleet.py). Access checks are per route (`web.auth.guarded`),
from the route table's `access`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from web import (
    api_fleet,
    api_lifecycle,
    api_misc,
    api_operator,
    api_servers,
    api_templates,
    audit,
    dashboard,
    httpboot,
    metrics,
    openapi,
)
from web.auth import guarded
from web.deps import WebDeps
from web.errors import error_middleware
from web.keys import BOOT_CLIENTS, CLOSING, DEPS, METRICS, OPENAPI
from web.routes import Route
from web.state import ClientMemory, HttpMetrics

__all__ = ["WebDeps", "create_app", "routes"]


def routes() -> tuple[Route, ...]:
    return (*api_misc.ROUTES, *api_servers.ROUTES, *api_lifecycle.ROUTES, *api_templates.ROUTES, openapi.ROUTE,
            *httpboot.ROUTES, *metrics.ROUTES, *dashboard.ROUTES, *audit.ROUTES, *api_operator.ROUTES,
            *api_fleet.ROUTES)


async def _event_streams(app: web.Application) -> AsyncIterator[None]:
    yield
    app[CLOSING].set()


async def _end_event_streams(app: web.Application) -> None:
    # on_shutdown runs before the runner waits for handlers: open /events streams end now.
    app[CLOSING].set()


def create_app(deps: WebDeps) -> web.Application:
    app = web.Application(client_max_size=deps.client_max_size,
                          middlewares=[metrics.metrics_middleware, audit.audit_middleware, error_middleware,
                                       api_fleet.forward_middleware])
    app[DEPS] = deps
    app[METRICS] = HttpMetrics()
    app[CLOSING] = asyncio.Event()
    app[BOOT_CLIENTS] = ClientMemory()
    table = routes()
    app[OPENAPI] = openapi.document(table, deps.version)
    for route in table:
        app.router.add_route(route.method, route.path, guarded(route.handler, route.access))
    app.cleanup_ctx.append(_event_streams)
    app.on_shutdown.append(_end_event_streams)
    return app
