"""Every typed key of the web app, in one place (aiohttp's AppKey / RequestKey)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from web.deps import WebDeps
from web.state import ClientMemory, HttpMetrics, Principal

DEPS = web.AppKey("deps", WebDeps)
METRICS = web.AppKey("metrics", HttpMetrics)
CLOSING = web.AppKey("closing", asyncio.Event)  # set at shutdown; ends the server-sent event streams
BOOT_CLIENTS = web.AppKey("boot_clients", ClientMemory)
PRINCIPAL = web.RequestKey("principal", Principal)
OPENAPI = web.AppKey("openapi", dict)  # the generated document, built once in create_app
