"""`/api/v1/templates`: OS templates, their versions and builds."""

from __future__ import annotations

from typing import Any

from aiohttp import web

import naming
from domain.errors import InvalidRequest
from domain.store import TemplateVersion
from web import requests
from web.errors import ApiError, json_body
from web.keys import DEPS
from web.routes import Route
from web.schemas import NAME, array_of, ref


def version_json(tv: TemplateVersion, clones: int) -> dict[str, Any]:
    return {"version": tv.version, "source": tv.source, "size": tv.size, "kernel": tv.kernel,
            "initrd": tv.initrd, "created_at": tv.created_at, "clones": clones}


def _templates_json(listing: list[tuple[str, list[tuple[TemplateVersion, int]]]]) -> list[dict[str, Any]]:
    return [{"name": n, "versions": [version_json(tv, clones) for tv, clones in vs]} for n, vs in listing]


async def list_templates(request: web.Request) -> web.StreamResponse:
    return web.json_response(_templates_json(await request.app[DEPS].domain.templates.listing()))


async def show_template(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    found = _templates_json(await request.app[DEPS].domain.templates.listing(name))
    if not found:
        raise ApiError(404, "not_found", f"no template {name}")
    return web.json_response(found[0])


async def start_build(request: web.Request) -> web.StreamResponse:
    """Build the next version of a template from a source; 202 with the build to poll."""
    name = request.match_info["name"]
    naming.TEMPLATE.check(name, InvalidRequest, "name")
    source = requests.build_source(await json_body(request))
    job = await request.app[DEPS].domain.templates.start_build(name, source)
    return web.json_response(job.as_json(), status=202, headers={"Location": f"/api/v1/templates/builds/{job.id}"})


async def show_build(request: web.Request) -> web.StreamResponse:
    job = request.app[DEPS].domain.templates.builds.get(request.match_info["id"])
    if job is None:
        raise ApiError(404, "not_found", f"no build {request.match_info['id']}")
    return web.json_response(job.as_json())


async def delete_template_version(request: web.Request) -> web.StreamResponse:
    """Delete a version (its snapshot); 409 while servers are cloned from it."""
    templates = request.app[DEPS].domain.templates
    await templates.delete_version(request.match_info["name"], request.match_info["version"])
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
