"""The fleet over HTTP: `/api/v1/appliances` (the operator's view, disable/enable), a server's move, the
fleet channel `/fleet/v1/…` other appliances pull template versions and moving volumes from (each
request signed with the fleet's shared secret, each answer sealed with it), and the forwarding of a
write on a server to the appliance that holds it (any appliance's API serves the whole fleet).
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from domain.errors import InvalidRequest
from web import fleetseal, requests
from web.api_servers import SERVER_PARAMS, server_json
from web.auth import authenticate
from web.errors import ApiError, Handler, json_body
from web.keys import DEPS
from web.peers import peer_tls
from web.routes import Param, Route
from web.schemas import NAME, array_of, ref

FORWARDED = "X-Cello-Forwarded-By"  # set on a forwarded request: the owner never forwards it again
_SERVER_WRITE = re.compile(r"^/api/v1/servers/([0-9A-Fa-f-]{36})(?:/.*)?$")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
APPLIANCE_PARAMS = {"name": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}}
STREAM = "application/octet-stream"


# --- the operator's view ------------------------------------------------------------------------

async def list_appliances(request: web.Request) -> web.StreamResponse:
    fleet = request.app[DEPS].domain.fleet
    now = time.time()
    return web.json_response([v.as_json(now) for v in await fleet.view()])


async def show_appliance(request: web.Request) -> web.StreamResponse:
    fleet = request.app[DEPS].domain.fleet
    name = request.match_info["name"]
    for v in await fleet.view():
        if v.row.name == name:
            return web.json_response(v.as_json(time.time()))
    raise ApiError(404, "not_found", f"no appliance {name}")


async def disable_appliance(request: web.Request) -> web.StreamResponse:
    """No new placement there; what it holds keeps running and booting."""
    body = await json_body(request) if request.can_read_body else {}
    why = requests.string(body, "reason", limit=200) if isinstance(body, dict) else ""
    await request.app[DEPS].domain.fleet.set_disabled(request.match_info["name"], True, why or "disabled")
    return await show_appliance(request)


async def enable_appliance(request: web.Request) -> web.StreamResponse:
    await request.app[DEPS].domain.fleet.set_disabled(request.match_info["name"], False)
    return await show_appliance(request)


async def move_server(request: web.Request) -> web.StreamResponse:
    """Move a powered-off server's volumes to another appliance; answers once it is there (200)."""
    deps = request.app[DEPS]
    body = await json_body(request)
    to = requests.string(body, "appliance", required=True, limit=63)
    moved = await deps.domain.fleet.move(request.match_info["uuid"].lower(), to)
    return web.json_response(server_json(deps, moved, await deps.domain.servers.volumes_of(moved.uuid)))


# --- the fleet channel ------------------------------------------------------------------------------

async def _stream(request: web.Request, chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """The peer's answer, sealed with the fleet's secret for this request (web/fleetseal.py): the
    route's role already checked that the request is signed with it."""
    secret = request.app[DEPS].domain.fleet.settings.secret
    resp = web.StreamResponse(headers={"Content-Type": STREAM, "Cache-Control": "no-store"})
    await resp.prepare(request)
    async for chunk in fleetseal.seal(chunks, secret, request.headers["Authorization"]):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def template_stream(request: web.Request) -> web.StreamResponse:
    """A template version's snapshot as the backend streams it (incremental from `base` where it can)."""
    deps = request.app[DEPS]
    template, version = request.match_info["template"], request.match_info["version"]
    base = request.query.get("base") or None
    tv = [v for v in await deps.domain.store.call(deps.domain.store.sync.template_versions, template)
          if v.version == version]
    if not tv:
        raise ApiError(404, "not_found", f"no template version {template}@{version}")
    if base is not None and not re.fullmatch(r"v[1-9][0-9]{0,8}", base):
        raise InvalidRequest("base: must be a version like v1")
    return await _stream(request, deps.domain.backend.send_template(template, version, base=base))


async def volume_stream(request: web.Request) -> web.StreamResponse:
    """A volume of a server moving away from here (nothing else is served)."""
    deps = request.app[DEPS]
    name = request.match_info["volume"]
    origin = await deps.domain.fleet.volume_for_move(name)
    return await _stream(request, deps.domain.backend.send_volume(name, origin=origin))


async def pull_server(request: web.Request) -> web.StreamResponse:
    """Asked by a server's owner: fetch its volumes here (a move); 204 once they are all here."""
    await request.app[DEPS].domain.fleet.pull(request.match_info["uuid"].lower())
    return web.Response(status=204)


# --- forwarding ---------------------------------------------------------------------------------------

@web.middleware
async def forward_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write on a server another appliance holds is that appliance's work: pass it on, with the
    caller's own token (the owner checks it against the shared store) and its answer passed back."""
    match = _SERVER_WRITE.match(request.path)
    if match is None or request.method in _READS or FORWARDED in request.headers:
        return await handler(request)
    domain = request.app[DEPS].domain
    server = await domain.store.call(domain.store.sync.server, match.group(1).lower())
    fleet = domain.fleet
    if server is None or server.appliance in ("", fleet.name):
        return await handler(request)
    await authenticate(request)  # strangers are refused here, not relayed
    owner = await domain.store.call(domain.store.sync.appliance, server.appliance)
    if owner is None or fleet.state_of(owner, time.time()) == "down":
        raise ApiError(503, "unavailable", f"server {server.uuid} is on appliance {server.appliance}, which is "
                       "down: its node keeps its root disk; changes wait until that appliance is back")
    deps = request.app[DEPS]
    if deps.tls_url and not owner.api_url.startswith("https://"):
        raise ApiError(503, "unavailable", f"server {server.uuid} is on appliance {owner.name}, whose API "
                       f"({owner.api_url}) is plain HTTP: this appliance does not send a token there in clear "
                       "(give that appliance an api.tls_listen, or send the write to it)")
    headers = {FORWARDED: fleet.name, "Authorization": request.headers.get("Authorization", "")}
    if request.content_type:
        headers["Content-Type"] = request.content_type
    body = await request.read()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600, connect=5)) as session, \
                session.request(request.method, owner.api_url.rstrip("/") + request.path_qs, data=body,
                                headers=headers, ssl=peer_tls(owner)) as answer:
            data = await answer.read()
            keep = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "location")}
            return web.Response(status=answer.status, body=data, headers=keep)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ApiError(503, "unavailable", f"server {server.uuid} is on appliance {owner.name}, which did not "
                       f"answer: {e or type(e).__name__}") from None


ROUTES = (
    Route("GET", "/api/v1/appliances", list_appliances, "The fleet's appliances: state, capacity, templates held",
          "admin", "fleet", responses={200: ("appliances", array_of("Appliance"))}),
    Route("GET", "/api/v1/appliances/{name}", show_appliance, "One appliance of the fleet", "admin", "fleet",
          path_params=APPLIANCE_PARAMS, responses={200: ("the appliance", ref("Appliance"))}),
    Route("POST", "/api/v1/appliances/{name}/disable", disable_appliance,
          "No new placement on this appliance (what it holds keeps running)", "admin", "fleet",
          path_params=APPLIANCE_PARAMS, body={"type": "object", "additionalProperties": False,
                                              "properties": {"reason": {"type": "string", "maxLength": 200}}},
          responses={200: ("the appliance", ref("Appliance"))}),
    Route("POST", "/api/v1/appliances/{name}/enable", enable_appliance, "Placement on this appliance again",
          "admin", "fleet", path_params=APPLIANCE_PARAMS, responses={200: ("the appliance", ref("Appliance"))}),
    Route("POST", "/api/v1/servers/{uuid}/move", move_server,
          "Move a powered-off server's volumes to another appliance", "admin", "fleet", path_params=SERVER_PARAMS,
          body={"type": "object", "required": ["appliance"], "additionalProperties": False,
                "properties": {"appliance": NAME}},
          responses={200: ("moved", ref("Server"))}),
    Route("GET", "/fleet/v1/templates/{template}/{version}/stream", template_stream,
          "A template version's snapshot, for another appliance of the fleet", "peer", "fleet",
          path_params={"template": NAME, "version": {"type": "string", "pattern": "^v[1-9][0-9]{0,8}$"}},
          params=(Param("base", {"type": "string"}, "an older version the receiver holds (incremental)"),),
          content=STREAM, responses={200: ("the stream", None)}),
    Route("GET", "/fleet/v1/volumes/{volume}/stream", volume_stream,
          "A volume of a server moving to another appliance", "peer", "fleet",
          path_params={"volume": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"}},
          content=STREAM, responses={200: ("the stream", None)}),
    Route("POST", "/fleet/v1/servers/{uuid}/pull", pull_server,
          "Fetch a moving server's volumes here (asked by its appliance)", "peer", "fleet",
          path_params=SERVER_PARAMS, responses={204: ("its volumes are here", None)}),
)
