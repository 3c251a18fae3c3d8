"""`/api/v1/servers/{uuid}/…`: upgrade (rebuild), rollback, snapshots of the root, power, BMC and labels;
`/api/v1/templates/{name}/captures`; `/api/v1/upgrades` (rolling upgrades of a labelled group).

A root swap answers when it is done (the node powered back on and logged in to its root, with `reboot`);
a refusal because the node is running is 409 `in_use`, naming its iSCSI session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

import naming
from domain.lifecycle import SwapReport
from web import requests
from web.api_servers import SERVER_PARAMS
from web.api_templates import version_json
from web.auth import principal
from web.errors import ApiError, int_field, json_body, require_fields
from web.keys import DEPS
from web.routes import Route
from web.schemas import NAME, array_of, ref


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(422, "invalid", f"{key}: must be true or false")
    return value


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    body = await json_body(request, required=False)
    require_fields(body, allowed)
    return body


def _report(report: SwapReport) -> web.Response:
    return web.json_response(report.as_json())


async def rebuild(request: web.Request) -> web.StreamResponse:
    """Upgrade the server's root to another template version; the old root stays as its restore point."""
    body = await _body(request, {"to", "discard_old", "reboot"})
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise ApiError(422, "invalid", "to: a template version like tiny@v3 (or a template: its newest)")
    lifecycle = request.app[DEPS].domain.lifecycle
    return _report(await lifecycle.rebuild(request.match_info["uuid"].lower(), to,
                                           discard_old=_flag(body, "discard_old"), reboot=_flag(body, "reboot"),
                                           may_act_for=principal(request).may_act_for))


async def rollback(request: web.Request) -> web.StreamResponse:
    """Swap back to the restore point (the root left becomes the restore point)."""
    body = await _body(request, {"reboot"})
    lifecycle = request.app[DEPS].domain.lifecycle
    return _report(await lifecycle.rollback(request.match_info["uuid"].lower(), reboot=_flag(body, "reboot"),
                                            may_act_for=principal(request).may_act_for))


async def list_snapshots(request: web.Request) -> web.StreamResponse:
    lifecycle = request.app[DEPS].domain.lifecycle
    found = await lifecycle.list_snapshots(request.match_info["uuid"].lower(), principal(request).may_act_for)
    return web.json_response([{"name": n, "volume": v, "created_at": at} for n, v, at in found])


async def create_snapshot(request: web.Request) -> web.StreamResponse:
    """A snapshot of the root, counted in the owner's quota."""
    body = await _body(request, {"name"})
    name = requests.string(body, "name", required=True, limit=32)
    uuid = request.match_info["uuid"].lower()
    await request.app[DEPS].domain.lifecycle.create_snapshot(uuid, name, principal(request).may_act_for)
    return web.json_response({"name": name}, status=201,
                             headers={"Location": f"/api/v1/servers/{uuid}/snapshots/{name}"})


async def delete_snapshot(request: web.Request) -> web.StreamResponse:
    await request.app[DEPS].domain.lifecycle.delete_snapshot(
        request.match_info["uuid"].lower(), request.match_info["name"], principal(request).may_act_for)
    return web.Response(status=204)


async def restore_snapshot(request: web.Request) -> web.StreamResponse:
    """The root's content goes back to the snapshot's (newer snapshots: 409)."""
    body = await _body(request, {"reboot"})
    lifecycle = request.app[DEPS].domain.lifecycle
    return _report(await lifecycle.restore_snapshot(
        request.match_info["uuid"].lower(), request.match_info["name"], reboot=_flag(body, "reboot"),
        may_act_for=principal(request).may_act_for))


async def capture(request: web.Request) -> web.StreamResponse:
    """A server's root as the next version of this template, with the node's identity scrubbed."""
    body = await _body(request, {"server", "power_off"})
    server = requests.string(body, "server", required=True, limit=64).lower()
    name = request.match_info["name"]
    tv = await request.app[DEPS].domain.lifecycle.capture(server, name, power_off=_flag(body, "power_off"))
    return web.json_response({"template": name, **version_json(tv, 0)}, status=201)


async def power(request: web.Request) -> web.StreamResponse:
    """on | off | cycle | status, through the server's BMC."""
    body = await _body(request, {"action"})
    action = body.get("action")
    if action not in ("on", "off", "cycle", "status"):
        raise ApiError(422, "invalid", "action: on, off, cycle or status")
    state = await request.app[DEPS].domain.lifecycle.power(request.match_info["uuid"].lower(), action,
                                                            principal(request).may_act_for)
    return web.json_response({"server": request.match_info["uuid"].lower(), "action": action, "state": state})


async def set_bmc(request: web.Request) -> web.StreamResponse:
    """The server's BMC: redfish://host[:port]/SystemId or ipmi://host[:port] ("" removes it)."""
    body = await _body(request, {"url", "user", "password"})
    url = requests.string(body, "url", limit=512)
    user, password = requests.string(body, "user", limit=128), requests.string(body, "password", limit=128)
    servers = request.app[DEPS].domain.servers
    await servers.set_bmc(request.match_info["uuid"].lower(), url, user, password)
    return web.json_response({"url": url, "user": user})  # never the password


async def set_labels(request: web.Request) -> web.StreamResponse:
    body = await _body(request, {"labels"})
    labels = body.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ApiError(422, "invalid", "labels: an object of label name -> string value")
    await request.app[DEPS].domain.servers.set_labels(request.match_info["uuid"].lower(), labels,
                                                      principal(request).may_act_for)
    return web.json_response({"labels": labels})


async def start_upgrade(request: web.Request) -> web.StreamResponse:
    """A rolling upgrade of the servers a selector names, in waves. Without `confirm` it only says which
    servers it would touch (a group action says how many before it acts)."""
    body = await _body(request, {"selector", "to", "batch", "max_failures", "reboot", "discard_old", "confirm"})
    body.setdefault("batch", 1)
    body.setdefault("max_failures", 0)
    selector = body.get("selector")
    if not isinstance(selector, dict) or not selector or not all(isinstance(v, str) for v in selector.values()):
        raise ApiError(422, "invalid", "selector: an object of label name -> value, at least one")
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise ApiError(422, "invalid", "to: a template version like tiny@v3")
    batch = int_field(body, "batch", 1, 1000)
    budget = int_field(body, "max_failures", 0, 1000)
    rolling = request.app[DEPS].domain.rolling
    if not _flag(body, "confirm"):
        plan = await rolling.plan(selector)
        return web.json_response({"servers": plan, "count": len(plan), "confirm": False})
    job = await rolling.start(selector, to, batch=batch, max_failures=budget, reboot=_flag(body, "reboot"),
                              discard_old=_flag(body, "discard_old"))
    return web.json_response(job.as_json(), status=202, headers={"Location": f"/api/v1/upgrades/{job.id}"})


async def show_upgrade(request: web.Request) -> web.StreamResponse:
    job = request.app[DEPS].domain.rolling.jobs.get(request.match_info["id"])
    if job is None:
        raise ApiError(404, "not_found", f"no upgrade {request.match_info['id']}")
    return web.json_response(job.as_json())


_SNAP = {**SERVER_PARAMS, "name": {"type": "string", "pattern": naming.SNAPSHOT.anchored}}
_BOOL = {"type": "boolean"}
_SWAP_BODY = {"type": "object", "additionalProperties": False, "properties": {"reboot": _BOOL}}

ROUTES: tuple[Route, ...] = (
    Route("POST", "/api/v1/servers/{uuid}/rebuild", rebuild, "Upgrade the root to a template version", "user",
          "lifecycle", path_params=SERVER_PARAMS, body={"type": "object", "additionalProperties": False,
          "properties": {"to": {"type": "string"}, "discard_old": _BOOL, "reboot": _BOOL}},
          responses={200: ("done", ref("SwapReport"))}),
    Route("POST", "/api/v1/servers/{uuid}/rollback", rollback, "Back onto the restore point", "user", "lifecycle",
          path_params=SERVER_PARAMS, body=_SWAP_BODY, responses={200: ("done", ref("SwapReport"))}),
    Route("GET", "/api/v1/servers/{uuid}/snapshots", list_snapshots, "Snapshots of the root", "user", "lifecycle",
          path_params=SERVER_PARAMS, responses={200: ("snapshots", array_of("Snapshot"))}),
    Route("POST", "/api/v1/servers/{uuid}/snapshots", create_snapshot, "Snapshot the root", "user", "lifecycle",
          path_params=SERVER_PARAMS, body={"type": "object", "required": ["name"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "pattern": naming.SNAPSHOT.anchored}}},
          responses={201: ("made", {"type": "object"})}),
    Route("DELETE", "/api/v1/servers/{uuid}/snapshots/{name}", delete_snapshot, "Delete a snapshot", "user",
          "lifecycle", path_params=_SNAP, responses={204: ("deleted", None)}),
    Route("POST", "/api/v1/servers/{uuid}/snapshots/{name}/restore", restore_snapshot, "Restore the root from "
          "a snapshot", "user", "lifecycle", path_params=_SNAP, body=_SWAP_BODY,
          responses={200: ("done", ref("SwapReport"))}),
    Route("POST", "/api/v1/servers/{uuid}/power", power, "Power the node through its BMC", "user", "lifecycle",
          path_params=SERVER_PARAMS, body={"type": "object", "required": ["action"], "additionalProperties": False,
          "properties": {"action": {"type": "string", "enum": ["on", "off", "cycle", "status"]}}},
          responses={200: ("the power state after", {"type": "object"})}),
    Route("PUT", "/api/v1/servers/{uuid}/bmc", set_bmc, "Set the node's BMC (URL and credentials)", "admin",
          "lifecycle", path_params=SERVER_PARAMS, body={"type": "object", "additionalProperties": False,
          "properties": {"url": {"type": "string"}, "user": {"type": "string"}, "password": {"type": "string"}}},
          responses={200: ("set (the password is never shown)", {"type": "object"})}),
    Route("PUT", "/api/v1/servers/{uuid}/labels", set_labels, "Set the server's labels", "user", "lifecycle",
          path_params=SERVER_PARAMS, body={"type": "object", "required": ["labels"], "additionalProperties": False,
          "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
          responses={200: ("set", {"type": "object"})}),
    Route("POST", "/api/v1/templates/{name}/captures", capture, "A server's root as a new template version",
          "admin", "lifecycle", path_params={"name": NAME}, body={"type": "object", "required": ["server"],
          "additionalProperties": False, "properties": {"server": {"type": "string"}, "power_off": _BOOL}},
          responses={201: ("the new version", ref("TemplateVersion"))}),
    Route("POST", "/api/v1/upgrades", start_upgrade, "A rolling upgrade of a labelled group (plan unless "
          "confirm)", "admin", "lifecycle", body={"type": "object", "required": ["selector"],
          "additionalProperties": False, "properties": {
              "selector": {"type": "object", "additionalProperties": {"type": "string"}}, "to": {"type": "string"},
              "batch": {"type": "integer", "minimum": 1, "maximum": 1000},
              "max_failures": {"type": "integer", "minimum": 0, "maximum": 1000},
              "reboot": _BOOL, "discard_old": _BOOL, "confirm": _BOOL}},
          responses={200: ("the plan", {"type": "object"}), 202: ("started", ref("Upgrade"))}),
    Route("GET", "/api/v1/upgrades/{id}", show_upgrade, "A rolling upgrade's progress, per node", "admin",
          "lifecycle", path_params={"id": {"type": "string"}}, responses={200: ("the upgrade", ref("Upgrade"))}),
)


