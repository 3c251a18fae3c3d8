"""`/api/v1`: health, users and their tokens, pools, services, events (server-sent), reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from domain.events import Event
from domain.services import SERVICES
from domain.users import UserView
from iscsi.model import LimitedDriver
from web import requests
from web.auth import principal
from web.deps import HealthReport, WebDeps
from web.errors import ApiError, json_body
from web.keys import CLOSING, DEPS
from web.routes import Param, Route
from web.schemas import NAME, array_of, ref
from web.state import Principal

GiB = 1 << 30


async def _health(deps: WebDeps) -> HealthReport:
    report = deps.health()
    if inspect.isawaitable(report):
        report = await report
    return report


async def health(request: web.Request) -> web.StreamResponse:
    """The state of each service; no token needed (load balancers, monitoring)."""
    deps = request.app[DEPS]
    services = {k: dict(v) for k, v in (await _health(deps)).items()}
    bad = [k for k, v in services.items() if v.get("state") in ("failed", "unavailable")]
    return web.json_response({"status": "degraded" if bad else "ok", "version": deps.version,
                              "services": services})


# --- users -------------------------------------------------------------------------------------


def _user_json(u: UserView) -> dict[str, Any]:
    return {"name": u.name, "max_volumes": u.max_volumes, "max_data_gb": u.max_data_gb,
            "used_volumes": u.used_volumes, "used_data_gb": round(u.used_data_bytes / GiB, 3)}


async def create_user(request: web.Request) -> web.StreamResponse:
    name, quota = requests.new_user(await json_body(request))
    out = _user_json(await request.app[DEPS].domain.users.create(name, quota))
    return web.json_response(out, status=201, headers={"Location": f"/api/v1/users/{name}"})


async def list_users(request: web.Request) -> web.StreamResponse:
    return web.json_response([_user_json(u) for u in await request.app[DEPS].domain.users.list()])


async def show_user(request: web.Request) -> web.StreamResponse:
    """A user with quota and usage: an admin, or that user's own token."""
    name = request.match_info["name"]
    if not principal(request).may_act_for(name):
        raise ApiError(404, "not_found", f"no user {name}")
    return web.json_response(_user_json(await request.app[DEPS].domain.users.show(name)))


async def set_quota(request: web.Request) -> web.StreamResponse:
    change = requests.quota_change(await json_body(request))
    users = request.app[DEPS].domain.users
    return web.json_response(_user_json(await users.set_quota(request.match_info["name"], change)))


async def delete_user(request: web.Request) -> web.StreamResponse:
    """Delete a user and its tokens; 409 while it still owns servers."""
    await request.app[DEPS].domain.users.delete(request.match_info["name"])
    return web.Response(status=204)


async def create_token(request: web.Request) -> web.StreamResponse:
    """A new user token, shown only in this answer (the store keeps its hash); `{"scope": "read"}` makes
    one that may look at what the user may, and touch nothing."""
    name = request.match_info["name"]
    scope = requests.token_scope(await json_body(request, required=False))
    token = await request.app[DEPS].domain.users.new_token(name, scope)
    return web.json_response({"token": token, "user": name, "scope": scope}, status=201)


async def show_token(request: web.Request) -> web.StreamResponse:
    """The calling token: whose it is and its scope (the dashboard draws no write control for a read one)."""
    who = principal(request)
    return web.json_response({"user": who.owner, "admin": who.admin, "scope": "read" if who.read_only else "full"})


async def create_admin_token(request: web.Request) -> web.StreamResponse:
    """Another admin token, shown once; `{"scope": "read"}` for monitoring (sees all, changes nothing)."""
    scope = requests.token_scope(await json_body(request, required=False))
    token = await request.app[DEPS].domain.users.new_admin_token(scope)
    return web.json_response({"token": token, "user": None, "scope": scope}, status=201)


# --- pools, services, reconcile ----------------------------------------------------------------


async def list_pools(request: web.Request) -> web.StreamResponse:
    domain = request.app[DEPS].domain
    backend = domain.backend
    cap = await backend.capacity()
    status = {k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
              for k, v in backend.status().items()}
    driver = domain.driver
    # what the export driver's target layer can hold (ctld: CTL's max_luns/max_ports); null where unbounded
    limits = dict(driver.limits().as_json()) if isinstance(driver, LimitedDriver) else None
    return web.json_response([{"name": backend.name, "total": cap.total, "used": cap.used, "free": cap.free,
                               "status": status, "export": {"driver": driver.name, "limits": limits}}])


async def _services_json(deps: WebDeps) -> list[dict[str, Any]]:
    report = await _health(deps)
    slot = {"http-boot": "api"}  # the HTTP boot service runs inside the API's server
    out = []
    for name in SERVICES:
        h: Mapping[str, str] = report.get(name) or report.get(slot.get(name, ""), {}) or {}
        enabled = deps.domain.services.get(name, True)
        state = h.get("state", "unknown")
        if not enabled:
            state = "disabled"
        out.append({"name": name, "enabled": enabled, "state": state, "detail": h.get("detail", "")})
    return out


async def list_services(request: web.Request) -> web.StreamResponse:
    return web.json_response(await _services_json(request.app[DEPS]))


async def set_service(request: web.Request) -> web.StreamResponse:
    """Enable or disable a service at run time (kept across restarts)."""
    deps = request.app[DEPS]
    name = request.match_info["name"]
    await deps.domain.services.set(name, requests.enabled(await json_body(request)))  # NotFound: no such service
    return web.json_response(next(s for s in await _services_json(deps) if s["name"] == name))


async def reconcile(request: web.Request) -> web.StreamResponse:
    """Compare the store with the volumes and exports; repair what is safe, report the rest."""
    report = await request.app[DEPS].domain.reconcile()
    return web.json_response(report.as_json())


# --- events (server-sent) ----------------------------------------------------------------------


class _Visibility:
    """Which events a token may see: all for an admin; for a user, only those of its own servers."""

    def __init__(self, deps: WebDeps, who: Principal) -> None:
        self.deps = deps
        self.who = who
        self._owners: dict[str, str | None] = {}

    async def allows(self, event: Event) -> bool:
        if self.who.admin:
            return True
        server = event.data.get("server")
        if not isinstance(server, str):
            return False
        if server not in self._owners:
            owner = await self.deps.domain.servers.owner_of(server)
            if len(self._owners) > 10000:
                self._owners.clear()
            self._owners[server] = owner
        return self._owners[server] == self.who.owner


def sse_frame(event: Event) -> bytes:
    data = json.dumps(event.as_json(), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


def _since(request: web.Request) -> int | None:
    raw = request.query.get("since", request.headers.get("Last-Event-ID"))
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ApiError(422, "invalid", "since: must be an event id (a non-negative integer)")
    return int(raw)


def _follow(request: web.Request) -> bool:
    raw = request.query.get("follow", "true").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid", "follow: must be true or false")
    return raw in ("true", "1")


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: DHCP offers, TFTP and HTTP fetches, export changes, workflow steps.
    `?since=ID` (or Last-Event-ID) first replays the recent events after ID; `?follow=false` ends there."""
    deps = request.app[DEPS]
    since = _since(request)
    follow = _follow(request)
    visible = _Visibility(deps, principal(request))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    try:
        if not follow:
            for event in deps.domain.events.recent(since or 0):
                if await visible.allows(event):
                    await resp.write(sse_frame(event))
            await resp.write_eof()
            return resp
        await resp.write(b": cello events\n\n")
        await _pump(request, resp, visible, since)
    except ConnectionError:  # the reader went away
        pass
    return resp


async def _pump(request: web.Request, resp: web.StreamResponse, visible: _Visibility, since: int | None) -> None:
    deps = request.app[DEPS]
    closing = request.app[CLOSING]
    stream = deps.domain.events.subscribe(since)
    closer: asyncio.Future[Any] = asyncio.ensure_future(closing.wait())
    pending: asyncio.Future[Event] | None = None
    try:
        while not closing.is_set():
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            waiting: set[asyncio.Future[Any]] = {pending, closer}
            done, _ = await asyncio.wait(waiting, timeout=deps.sse_heartbeat,
                                         return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                fut, pending = pending, None
                try:
                    event = fut.result()
                except StopAsyncIteration:  # the bus stopped, or cut off a reader that fell behind
                    break
                if await visible.allows(event):
                    await resp.write(sse_frame(event))
            elif not done:
                await resp.write(b": keep-alive\n\n")
    finally:
        closer.cancel()
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        with contextlib.suppress(RuntimeError):
            await stream.aclose()  # type: ignore[attr-defined]


_NAME = {"name": NAME}
_SSE = {"type": "string", "description": "text/event-stream: `id:`, `event: KIND`, `data: {JSON event}`"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/health", health, "State of each service (no token needed)", "public", "misc",
          responses={200: ("health", ref("Health"))}),
    Route("POST", "/api/v1/users", create_user, "Create a user with a quota", "admin", "users",
          body=ref("CreateUser"), responses={201: ("created", ref("User"))}),
    Route("GET", "/api/v1/users", list_users, "List users with quota and usage", "admin", "users",
          responses={200: ("users", array_of("User"))}),
    Route("GET", "/api/v1/users/{name}", show_user, "A user (an admin, or the user itself)", "user", "users",
          path_params=_NAME, responses={200: ("the user", ref("User"))}),
    Route("PUT", "/api/v1/users/{name}/quota", set_quota, "Change a user's quota", "admin", "users",
          path_params=_NAME, body=ref("Quota"), responses={200: ("the user", ref("User"))}),
    Route("DELETE", "/api/v1/users/{name}", delete_user, "Delete a user and its tokens (409 while it owns servers)",
          "admin", "users", path_params=_NAME, responses={204: ("deleted", None)}),
    Route("POST", "/api/v1/users/{name}/tokens", create_token, "A new token for the user, shown once", "admin",
          "users", path_params=_NAME, body=ref("CreateToken"), responses={201: ("the token", ref("NewToken"))}),
    Route("GET", "/api/v1/token", show_token, "The calling token: its user (null: admin) and scope", "user",
          "users", responses={200: ("the token", ref("Token"))}),
    Route("POST", "/api/v1/admin/tokens", create_admin_token, "A new admin token (scope read: look, not touch)",
          "admin", "users", body=ref("CreateToken"), responses={201: ("the token", ref("NewToken"))}),
    Route("GET", "/api/v1/pools", list_pools, "Storage pool capacity and status", "admin", "misc",
          responses={200: ("pools", array_of("Pool"))}),
    Route("GET", "/api/v1/services", list_services, "Services and whether each is enabled", "user", "services",
          responses={200: ("services", array_of("Service"))}),
    Route("PUT", "/api/v1/services/{name}", set_service, "Enable or disable a service", "admin", "services",
          path_params={"name": {"type": "string", "enum": list(SERVICES)}}, body=ref("SetService"),
          responses={200: ("the service", ref("Service"))}),
    Route("GET", "/api/v1/events", events, "Live events (server-sent events)", "user", "events",
          params=(Param("since", {"type": "integer", "minimum": 0}, "replay recent events after this id"),
                  Param("follow", {"type": "boolean"}, "false: replay and end (default true)")),
          content="text/event-stream", responses={200: ("event stream", _SSE)}),
    Route("POST", "/api/v1/reconcile", reconcile, "Reconcile the store with volumes and exports", "admin", "misc",
          responses={200: ("report", ref("Reconcile"))}),
)
