"""The OpenAPI 3.1 document, generated from the route table (so it names exactly the served routes)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from web.keys import OPENAPI
from web.routes import Route
from web.schemas import COMPONENTS, ref

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^{}]*(?:\{[^{}]*\}[^{}]*)*)?\}")


def openapi_path(aiohttp_path: str) -> str:
    """`/boot/files/{path:.+}` → `/boot/files/{path}`."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", aiohttp_path)


def path_param_names(aiohttp_path: str) -> list[str]:
    return [m.group(1) for m in _PARAM.finditer(aiohttp_path)]


_ERROR = {"description": "error", "content": {"application/json": {"schema": ref("Error")}}}


def _operation(route: Route) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": n, "in": "path", "required": True, "schema": route.path_params.get(n, {"type": "string"})}
        for n in path_param_names(route.path)
    ]
    params += [{"name": p.name, "in": p.where, "required": False, "schema": p.schema,
                **({"description": p.description} if p.description else {})} for p in route.params]
    responses: dict[str, Any] = {}
    for status, (text, schema) in sorted(route.responses.items()):
        if schema is None or route.method == "HEAD":
            responses[str(status)] = {"description": text}
        else:
            ctype = "application/json" if status >= 400 else route.content
            responses[str(status)] = {"description": text, "content": {ctype: {"schema": schema}}}
    responses["4XX"] = _ERROR
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "responses": responses,
    }
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
    op["security"] = [] if route.access == "public" else [{"bearer": []}]
    if route.access == "admin":
        op["description"] = "Needs an admin token."
    if route.access == "peer":
        op["description"] = "The fleet channel: the bearer is the fleet's shared secret ([fleet] secret)."
    return op


def document(routes: Iterable[Route], version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(openapi_path(route.path), {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cello control API",
            "version": version,
            "description": (
                "Network-boot appliance: servers with iSCSI root disks cloned from OS templates. "
                "Bearer tokens: admin tokens manage everything; user tokens see and change only their own "
                "servers and volumes, within quota. Errors are JSON {\"error\": code, \"detail\": text}."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[OPENAPI])


ROUTE = Route("GET", "/api/v1/openapi.json", openapi_json, "This document", "public", "misc",
              responses={200: ("the OpenAPI document", {"type": "object"})})
