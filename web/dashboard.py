"""The dashboard: `GET /` and `GET /ui/{name}`, plain files shipped in the package (web/static).

No build step and no framework: an HTML page, a stylesheet and JavaScript modules that talk to
`/api/v1` with the token the operator types in (kept in the tab's sessionStorage). The page reads the
event stream with fetch() so that it can send the bearer token; the API's auth is unchanged, and these
routes serve only files that hold no data. A strict Content-Security-Policy keeps the page to its
own scripts and its own origin.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from web.auth import clear_text_problem
from web.errors import ApiError
from web.keys import DEPS
from web.routes import Route

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
# Every file the page is made of; the routes serve these names only (no path is joined from a request).
FILES = tuple(sorted(p.name for p in STATIC.iterdir() if p.suffix in _TYPES)) if STATIC.is_dir() else ()
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _file(name: str) -> web.Response:
    if name not in FILES:
        raise ApiError(404, "not_found", f"no dashboard file {name[:100]!r}")
    path = STATIC / name
    body = await asyncio.to_thread(path.read_bytes)
    return web.Response(body=body, content_type=_TYPES[path.suffix], charset="utf-8", headers=_HEADERS)


async def dashboard(request: web.Request) -> web.StreamResponse:
    """The dashboard page (it asks for a token; the data comes from /api/v1). With an HTTPS listener, a
    browser on the plain one is sent there: the token it would type must not cross the LAN in clear."""
    if clear_text_problem(request) is not None:
        return web.Response(status=308, headers={"Location": request.app[DEPS].tls_url + "/"})
    return await _file("index.html")


async def dashboard_script(request: web.Request) -> web.StreamResponse:
    """A JavaScript module of the dashboard."""
    return await _file(request.match_info["name"] + ".js")


async def dashboard_style(request: web.Request) -> web.StreamResponse:
    """The dashboard's stylesheet."""
    return await _file(request.match_info["name"] + ".css")


def _stems(suffix: str) -> list[str]:
    return [n.removesuffix(suffix) for n in FILES if n.endswith(suffix)]


_TEXT = {"type": "string"}
_NAME = "{name:[a-z][a-z0-9-]{0,40}}"

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", dashboard, "The dashboard (log in with a token; its data comes from /api/v1)", "public",
          "dashboard", content="text/html", responses={200: ("the page", _TEXT)}),
    Route("GET", f"/ui/{_NAME}.js", dashboard_script, "A script (JavaScript module) of the dashboard", "public",
          "dashboard", path_params={"name": {"type": "string", "enum": _stems(".js")}}, content="text/javascript",
          responses={200: ("the module", _TEXT)}),
    Route("GET", f"/ui/{_NAME}.css", dashboard_style, "The dashboard's stylesheet", "public", "dashboard",
          path_params={"name": {"type": "string", "enum": _stems(".css")}}, content="text/css",
          responses={200: ("the stylesheet", _TEXT)}),
)
