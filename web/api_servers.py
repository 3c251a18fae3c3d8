"""`/api/v1/servers` (and their volumes) and `/api/v1/volumes`.

Ownership: a user token sees only its own servers; another user's server answers 404, exactly as a
server that does not exist, so a user cannot even learn which UUIDs are taken by others' listings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from domain.store import ServerRow, VolumeRow
from web import requests
from web.auth import principal
from web.deps import WebDeps
from web.errors import ApiError, json_body
from web.keys import DEPS
from web.routes import Param, Route
from web.schemas import UUID, array_of, ref
from web.state import Principal

GiB = 1 << 30
SERVER_PARAMS = {"uuid": UUID}


def volume_json(v: VolumeRow, luns: Mapping[str, int] | None) -> dict[str, Any]:
    return {"name": v.name, "server": v.server, "kind": v.kind, "index": v.idx, "size": v.size,
            "size_gb": round(v.size / GiB, 3), "state": v.state, "serial": v.serial,
            "lun": None if luns is None else luns.get(v.name)}


def _exported_luns(deps: WebDeps, uuid: str) -> Mapping[str, int] | None:
    state = deps.domain.exports.last_state
    if state is None:
        return None
    return state.targets.get(deps.domain.servers.iqn(uuid))


def server_json(deps: WebDeps, s: ServerRow, volumes: Iterable[VolumeRow]) -> dict[str, Any]:
    servers = deps.domain.servers
    luns = _exported_luns(deps, s.uuid)
    vols = [volume_json(v, luns) for v in volumes]
    ip, port = deps.domain.policy.portal
    portal = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return {
        "uuid": s.uuid, "template": s.template, "version": s.version, "profile": s.profile, "user": s.owner,
        "state": s.state, "reason": s.reason, "macs": list(s.macs), "hostname": s.hostname,
        "address": s.address, "created_at": s.created_at, "updated_at": s.updated_at,
        "labels": s.label_map, "bmc": s.bmc_url,  # never the BMC's credentials
        "appliance": s.appliance,
        "volumes": vols,
        "target": {
            "iqn": servers.iqn(s.uuid), "portal": portal, "initiator": servers.initiator(s.uuid),
            "exported": luns is not None,
            "luns": [{"volume": v["name"], "index": v["index"], "lun": v["lun"]} for v in vols],
            # the names only: secrets reach the node in its boot config, never an API client
            "chap": "mutual" if s.chap_mutual_secret else "on" if s.chap_secret else "off",
            "chap_user": s.chap_user, "chap_mutual_user": s.chap_mutual_user,
        },
    }


async def visible_server(request: web.Request, uuid: str) -> ServerRow:
    """The server, if this caller may see it (NotFound, as for a missing one, otherwise)."""
    return await request.app[DEPS].domain.servers.get(uuid, principal(request).may_act_for)


def _owner_for(p: Principal, body: Mapping[str, Any]) -> str:
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise ApiError(422, "invalid", "user: must be a user name")
    if p.admin:
        if user is None:
            raise ApiError(422, "invalid", "user: an admin token must name the user the server is for")
        return user
    assert p.owner is not None
    if user is not None and user != p.owner:
        raise ApiError(403, "forbidden", f"a user token creates servers only for its own user ({p.owner})")
    return p.owner


async def create_server(request: web.Request) -> web.StreamResponse:
    """Record the server (`creating`, quota reserved) and start its create workflow; 202."""
    deps = request.app[DEPS]
    servers = deps.domain.servers
    body = await json_body(request)
    req = requests.create_server(body, _owner_for(principal(request), body))
    pin, labels = requests.placement_wish(body)
    placement = await deps.domain.fleet.place_create(req, pin=pin, labels=labels)
    row = await servers.create_server(req, appliance=placement.chosen)
    out = server_json(deps, row, await servers.volumes_of(row.uuid))  # the record as recorded, before the workflow
    out["placement"] = placement.as_dict()
    if row.appliance == servers.appliance:  # else its appliance takes it from the store
        deps.domain.tasks.spawn(servers.run_create(row.uuid), f"create-{row.uuid}")
    return web.json_response(out, status=202, headers={"Location": f"/api/v1/servers/{row.uuid}"})


async def list_servers(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    p = principal(request)
    owner = p.owner if not p.admin else request.query.get("user") or None
    servers, volumes = await deps.domain.servers.listing(owner)
    by_server: dict[str, list[VolumeRow]] = {}
    for v in volumes:
        by_server.setdefault(v.server, []).append(v)
    return web.json_response([server_json(deps, s, by_server.get(s.uuid, [])) for s in servers])


async def show_server(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    server = await visible_server(request, request.match_info["uuid"])
    return web.json_response(server_json(deps, server, await deps.domain.servers.volumes_of(server.uuid)))


async def delete_server(request: web.Request) -> web.StreamResponse:
    """Unexport, destroy its volumes, forget it; answers 204 once done (the workflow runs in the request)."""
    deps = request.app[DEPS]
    # The owner check rides on the delete's own first store call (another user's server is not
    # found, as in visible_server): one trip less through the store's queue per DELETE of a burst.
    power_off = request.query.get("power_off", "false").lower()
    if power_off not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid", "power_off: must be true or false")
    await deps.domain.lifecycle.delete(request.match_info["uuid"].lower(), power_off=power_off in ("true", "1"),
                                       may_act_for=principal(request).may_act_for)
    return web.Response(status=204)


async def server_events(request: web.Request) -> web.StreamResponse:
    """The server's boot log: its stored events, oldest first."""
    deps = request.app[DEPS]
    server = await visible_server(request, request.match_info["uuid"])
    limit = _int_query(request, "limit", 100, 1, 10000)
    await deps.domain.events.flush()
    return web.json_response(await deps.domain.servers.boot_log(server.uuid, limit))


def _int_query(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(422, "invalid", f"{key}: must be an integer {lo}..{hi}")
    return int(raw)


async def list_server_volumes(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    server = await visible_server(request, request.match_info["uuid"])
    volumes = await deps.domain.servers.volumes_of(server.uuid)
    luns = _exported_luns(deps, server.uuid)
    return web.json_response([volume_json(v, luns) for v in volumes])


async def add_volume(request: web.Request) -> web.StreamResponse:
    """Create and export a data volume (within the owner's quota); 201 once it is exported."""
    deps = request.app[DEPS]
    server = await visible_server(request, request.match_info["uuid"])
    size = requests.size_gb(await json_body(request))
    row = await deps.domain.servers.add_data_volume(server.uuid, size)
    out = volume_json(row, _exported_luns(deps, server.uuid))
    return web.json_response(out, status=201,
                             headers={"Location": f"/api/v1/servers/{server.uuid}/volumes/{row.name}"})


async def remove_volume(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    server = await visible_server(request, request.match_info["uuid"])
    await deps.domain.servers.remove_data_volume(server.uuid, request.match_info["name"])
    return web.Response(status=204)


async def list_volumes(request: web.Request) -> web.StreamResponse:
    """Every volume of the caller's servers (all servers for an admin)."""
    deps = request.app[DEPS]
    p = principal(request)
    owner = p.owner if not p.admin else request.query.get("user") or None
    servers, volumes = await deps.domain.servers.listing(owner)
    mine = {s.uuid for s in servers}
    out = [volume_json(v, _exported_luns(deps, v.server)) for v in volumes if v.server in mine]
    return web.json_response(out)


_USER_FILTER = Param("user", {"type": "string"}, "admin only: only this user's objects")
_VOL = {"name": {"type": "string"}}

ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/servers", create_server, "Create a server (202, state creating)", "user", "servers",
          body=ref("CreateServer"), responses={202: ("recorded; the create workflow runs", ref("Server"))}),
    Route("GET", "/api/v1/servers", list_servers, "List servers", "user", "servers", params=(_USER_FILTER,),
          responses={200: ("servers", array_of("Server"))}),
    Route("GET", "/api/v1/servers/{uuid}", show_server, "Show a server", "user", "servers",
          path_params=SERVER_PARAMS, responses={200: ("the server", ref("Server"))}),
    Route("DELETE", "/api/v1/servers/{uuid}", delete_server, "Delete a server and its volumes (204 when done; "
          "409 while its node holds a session, unless power_off)", "user", "servers", path_params=SERVER_PARAMS,
          params=(Param("power_off", {"type": "boolean"}, "power the node off through its BMC first"),),
          responses={204: ("deleted", None)}),
    Route("GET", "/api/v1/servers/{uuid}/events", server_events, "A server's stored boot log", "user", "servers",
          path_params=SERVER_PARAMS,
          params=(Param("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "newest N events"),),
          responses={200: ("events, oldest first", array_of("Event"))}),
    Route("GET", "/api/v1/servers/{uuid}/volumes", list_server_volumes, "A server's volumes", "user", "volumes",
          path_params=SERVER_PARAMS, responses={200: ("volumes", array_of("Volume"))}),
    Route("POST", "/api/v1/servers/{uuid}/volumes", add_volume, "Add a data volume (201 when exported)", "user",
          "volumes", path_params=SERVER_PARAMS, body=ref("AddVolume"),
          responses={201: ("created and exported", ref("Volume"))}),
    Route("DELETE", "/api/v1/servers/{uuid}/volumes/{name}", remove_volume, "Remove a data volume", "user",
          "volumes", path_params={**SERVER_PARAMS, **_VOL}, responses={204: ("removed", None)}),
    Route("GET", "/api/v1/volumes", list_volumes, "Volumes of the caller's servers", "user", "volumes",
          params=(_USER_FILTER,), responses={200: ("volumes", array_of("Volume"))}),
)
