"""The operator's view: `/api/v1/discovered` (PXE clients no server record names, and their adoption) and
`/api/v1/servers/{uuid}/diagnose` ("why didn't it boot?": domain/diagnose.py).

Discovered nodes are the whole LAN's, so they are an admin's; a diagnosis is its server's owner's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

import naming
from domain.diagnose import STEPS, diagnose, gather_facts
from domain.requests import MAX_DATA_GB
from domain.store import DiscoveredRow
from web import requests
from web.api_servers import SERVER_PARAMS, server_json
from web.auth import principal
from web.errors import ApiError, int_field, json_body, require_fields
from web.keys import DEPS
from web.routes import Route
from web.schemas import NAME, SIZE_GB, Schema, ref

ADOPT_FIELDS = {"template", "user", "profile", "data_volumes", "hostname"}
MAX_ADOPT_VOLUMES = 64


def discovered_json(node: DiscoveredRow) -> dict[str, Any]:
    return {"mac": node.mac, "uuid": node.uuid or None, "arch": node.arch if node.arch >= 0 else None,
            "vendor_class": node.vendor_class, "user_class": node.user_class, "address": node.address or None,
            "first_seen": node.first_seen, "last_seen": node.last_seen, "count": node.count}


def _mac(request: web.Request) -> str:
    mac = naming.normalize_mac(request.match_info["mac"])
    if not naming.MAC.ok(mac):
        raise ApiError(422, "invalid", f"mac: {naming.MAC.explain}")
    return mac


async def list_discovered(request: web.Request) -> web.StreamResponse:
    """PXE clients the proxyDHCP saw that no server record names, most recently seen first."""
    nodes = request.app[DEPS].domain.discovered.listing()
    return web.json_response([discovered_json(n) for n in nodes])


async def forget_discovered(request: web.Request) -> web.StreamResponse:
    if not await request.app[DEPS].domain.discovered.forget(_mac(request)):
        raise ApiError(404, "not_found", f"no discovered node {request.match_info['mac']}")
    return web.Response(status=204)


async def adopt(request: web.Request) -> web.StreamResponse:
    """Create the server from the node's record (its UUID, or a new one; its MAC); 202, as a create."""
    deps = request.app[DEPS]
    mac = _mac(request)
    body = await json_body(request)
    require_fields(body, ADOPT_FIELDS)
    volumes = body.get("data_volumes", [])
    if not isinstance(volumes, list) or len(volumes) > MAX_ADOPT_VOLUMES:
        raise ApiError(422, "invalid", f"data_volumes: must be a list of at most {MAX_ADOPT_VOLUMES}")
    sizes = []
    for i, v in enumerate(volumes):
        if not isinstance(v, dict) or set(v) != {"size_gb"}:
            raise ApiError(422, "invalid", f'data_volumes[{i}]: must be {{"size_gb": N}}')
        sizes.append(int_field(v, "size_gb", 1, MAX_DATA_GB, where=f"data_volumes[{i}].size_gb"))
    row = await deps.domain.adoption.adopt(
        mac, template=requests.string(body, "template", required=True, limit=64),
        owner=requests.string(body, "user", required=True, limit=64),
        profile=requests.string(body, "profile", limit=64),
        data_gb=sizes, hostname=requests.string(body, "hostname", limit=253))
    out = server_json(deps, row, await deps.domain.servers.volumes_of(row.uuid))
    return web.json_response(out, status=202, headers={"Location": f"/api/v1/servers/{row.uuid}"})


async def diagnose_server(request: web.Request) -> web.StreamResponse:
    """The last step of the boot path the node reached, and what is wrong, from what the appliance saw."""
    domain = request.app[DEPS].domain
    facts = await gather_facts(domain, request.match_info["uuid"], principal(request).may_act_for)
    return web.json_response(diagnose(facts).as_json())


_MAC_PARAM = {"mac": {"type": "string", "pattern": "^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$"}}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
DISCOVERED: Schema = {
    "type": "object",
    "required": ["mac", "first_seen", "last_seen", "count"],
    "properties": {
        "mac": {"type": "string"}, "uuid": _NULLABLE_STRING,
        "arch": {"type": ["integer", "null"], "description": "DHCP option 93 (0 BIOS, 7 x64 UEFI, ...)"},
        "vendor_class": {"type": "string"}, "user_class": {"type": "string"}, "address": _NULLABLE_STRING,
        "first_seen": {"type": "number"}, "last_seen": {"type": "number"},
        "count": {"type": "integer", "description": "boot requests seen"},
    },
}
ADOPT: Schema = {
    "type": "object",
    "required": ["template", "user"],
    "additionalProperties": False,
    "properties": {
        "template": NAME, "user": {"type": "string"}, "profile": {"type": "string"}, "hostname": {"type": "string"},
        "data_volumes": {"type": "array", "maxItems": MAX_ADOPT_VOLUMES, "items": {
            "type": "object", "required": ["size_gb"], "additionalProperties": False,
            "properties": {"size_gb": SIZE_GB}}},
    },
}
DIAGNOSIS: Schema = {
    "type": "object",
    "required": ["server", "ok", "reached", "problem", "summary", "hints", "steps"],
    "properties": {
        "server": {"type": "string"}, "ok": {"type": "boolean"},
        "reached": {"type": ["string", "null"], "enum": [*STEPS, None]}, "reached_text": {"type": "string"},
        "problem": {"type": ["string", "null"], "description": "a short code (no_dhcp, no_site_dhcp, "
                    "tftp_disabled, no_tftp, no_config, config_denied, login_refused, no_iscsi_login, "
                    "template_version_deleted, "
                    "root_disk_missing, export_unavailable, ...); null when nothing is wrong"},
        "summary": {"type": "string"}, "hints": {"type": "array", "items": {"type": "string"}},
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "step": {"type": "string", "enum": list(STEPS)}, "text": {"type": "string"}, "seen": {"type": "boolean"},
            "at": {"type": ["number", "null"]}, "detail": {"type": "string"}}}},
    },
}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/discovered", list_discovered, "PXE clients no server record names (discovered nodes)",
          "admin", "discovered", responses={200: ("discovered nodes, most recently seen first",
                                                   {"type": "array", "items": DISCOVERED})}),
    Route("DELETE", "/api/v1/discovered/{mac}", forget_discovered, "Forget a discovered node", "admin",
          "discovered", path_params=_MAC_PARAM, responses={204: ("forgotten", None)}),
    Route("POST", "/api/v1/discovered/{mac}/adopt", adopt, "Create a server from a discovered node (202, state "
          "creating; the record goes)", "admin", "discovered", path_params=_MAC_PARAM, body=ADOPT,
          responses={202: ("recorded; the create workflow runs", ref("Server"))}),
    Route("GET", "/api/v1/servers/{uuid}/diagnose", diagnose_server, "Why didn't it boot: the last boot step its "
          "node reached, and what is wrong", "user", "servers", path_params=SERVER_PARAMS,
          responses={200: ("the diagnosis", DIAGNOSIS)}),
)
