"""`/api/v1/templates`: OS templates, their versions and builds."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from appliance.template_sources import parse_source
from domain.provisioner import NAME_RE
from domain.store import Store, TemplateVersion
from web.errors import ApiError, json_body, require_fields
from web.keys import DEPS
from web.routes import Route
from web.schemas import NAME, array_of, ref


def version_json(tv: TemplateVersion, clones: int) -> dict[str, Any]:
    return {"version": tv.version, "source": tv.source, "size": tv.size, "kernel": tv.kernel,
            "initrd": tv.initrd, "created_at": tv.created_at, "clones": clones}


def _templates(store: Store, name: str | None) -> list[dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for tv in store.template_versions(name):
        grouped.setdefault(tv.template, []).append(version_json(tv, len(store.clones_of(tv.template, tv.version))))
    return [{"name": n, "versions": vs} for n, vs in sorted(grouped.items())]


async def list_templates(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    return web.json_response(await deps.store.call(_templates, deps.store.sync, None))


async def show_template(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    name = request.match_info["name"]
    found = await deps.store.call(_templates, deps.store.sync, name)
    if not found:
        raise ApiError(404, "not_found", f"no template {name}")
    return web.json_response(found[0])


def build_json(job: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in job.items()}


async def start_build(request: web.Request) -> web.StreamResponse:
    """Build the next version of a template from a source; 202 with the build to poll."""
    deps = request.app[DEPS]
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise ApiError(422, "invalid", "name: templates are named [a-z0-9][a-z0-9_.-]*, up to 63 chars")
    body = await json_body(request)
    require_fields(body, {"source"})
    source = body.get("source")
    if not isinstance(source, str) or not source or len(source) > 4096:
        raise ApiError(422, "invalid", "source: required string (tiny, debian[:SUITE] or tar:/path/rootfs.tar)")
    parse_source(source)  # syntax only; the build itself checks the host
    job = await deps.provisioner.start_build(name, source)
    return web.json_response(build_json(job), status=202, headers={"Location": f"/api/v1/templates/builds/{job['id']}"})


async def show_build(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    job = deps.provisioner.builds.get(request.match_info["id"])
    if job is None:
        raise ApiError(404, "not_found", f"no build {request.match_info['id']}")
    return web.json_response(build_json(job))


async def delete_template_version(request: web.Request) -> web.StreamResponse:
    """Delete a version (its snapshot); 409 while servers are cloned from it."""
    deps = request.app[DEPS]
    await deps.provisioner.delete_template_version(request.match_info["name"], request.match_info["version"])
    return web.Response(status=204)


_NAME = {"name": NAME}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/templates", list_templates, "List templates and their versions", "user", "templates",
          responses={200: ("templates", array_of("Template"))}),
    Route("GET", "/api/v1/templates/{name}", show_template, "Show a template", "user", "templates",
          path_params=_NAME, responses={200: ("the template", ref("Template"))}),
    Route("POST", "/api/v1/templates/{name}/builds", start_build, "Build a new template version", "admin",
          "templates", path_params=_NAME, body=ref("StartBuild"), responses={202: ("build started", ref("Build"))}),
    Route("GET", "/api/v1/templates/builds/{id}", show_build, "A build's state and progress", "admin",
          "templates", path_params={"id": {"type": "string"}}, responses={200: ("the build", ref("Build"))}),
    Route("DELETE", "/api/v1/templates/{name}/versions/{version}", delete_template_version,
          "Delete a template version (409 while it has clones)", "admin", "templates",
          path_params={**_NAME, "version": {"type": "string"}}, responses={204: ("deleted", None)}),
)
