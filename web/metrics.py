"""`GET /metrics` in the Prometheus text exposition format (0.0.4), and the middleware that counts requests."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from aiohttp import web

from domain.states import ServerState
from web.errors import Handler
from web.keys import DEPS, METRICS
from web.routes import Route
from web.state import DURATION_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        request.app[METRICS].observe(_route_of(request), request.method, status, time.perf_counter() - start)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: object) -> None:
        text = repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))
        self.lines.append(f"{name}{_labels(**labels)} {text}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _all(values: Iterable[str], seen: Iterable[str]) -> list[str]:
    return sorted(set(values) | set(seen))


async def metrics(request: web.Request) -> web.StreamResponse:
    deps = request.app[DEPS]
    m = request.app[METRICS]
    domain = deps.domain
    out = _Out()
    out.family("cello_build_info", "gauge", "Cello version")
    out.sample("cello_build_info", 1, version=deps.version)

    servers, volumes = await domain.servers.counts()
    out.family("cello_servers", "gauge", "Server records by state")
    for state in _all(ServerState, servers):
        out.sample("cello_servers", servers.get(state, 0), state=state)
    out.family("cello_volumes", "gauge", "Volume records by kind and state")
    for (kind, state), n in sorted(volumes.items()):
        out.sample("cello_volumes", n, kind=kind, state=state)

    out.family("cello_export_applies_total", "counter", "Export configuration applies (coalesced)")
    out.sample("cello_export_applies_total", domain.exports.applies)
    last = domain.exports.last_state
    out.family("cello_exported_targets", "gauge", "Targets the export driver reported after its last apply")
    out.sample("cello_exported_targets", len(last.targets) if last is not None else 0)
    out.family("cello_exports_available", "gauge", "1 when the export driver is available")
    out.sample("cello_exports_available", 1 if last is None or last.available else 0)

    out.family("cello_service_enabled", "gauge", "1 when the service is enabled")
    for name, enabled in sorted(domain.services.items()):
        out.sample("cello_service_enabled", 1 if enabled else 0, service=name)

    out.family("cello_events_total", "counter", "Events published, by kind")
    for kind, n in sorted(domain.events.counts.items()):
        out.sample("cello_events_total", n, kind=kind)

    builds = Counter(str(job.state) for job in domain.templates.builds.values())
    out.family("cello_template_builds", "gauge", "Template builds since start, by state")
    for state in _all(("running", "done", "failed"), builds):
        out.sample("cello_template_builds", builds.get(state, 0), state=state)

    try:
        cap = await domain.backend.capacity()
    except Exception:  # a pool that cannot answer must not take /metrics down with it
        cap = None
    out.family("cello_pool_bytes", "gauge", "Storage pool capacity")
    if cap is not None:
        for kind, value in (("total", cap.total), ("used", cap.used), ("free", cap.free)):
            out.sample("cello_pool_bytes", value, pool=domain.backend.name, kind=kind)

    out.family("cello_http_boot_bytes_total", "counter", "Bytes sent by HTTP boot (scripts, kernels, initrds)")
    out.sample("cello_http_boot_bytes_total", m.boot_bytes)

    out.family("cello_http_requests_total", "counter", "HTTP requests by route, method and status")
    for (route, method, status), n in sorted(m.requests.items()):
        out.sample("cello_http_requests_total", n, route=route, method=method, status=status)
    out.family("cello_http_request_duration_seconds", "histogram", "HTTP request latency by route")
    for route in sorted(m.duration_count):
        cumulative = 0
        for le in DURATION_BUCKETS:
            cumulative += m.buckets.get((route, le), 0)
            out.sample("cello_http_request_duration_seconds_bucket", cumulative, route=route, le=le)
        out.sample("cello_http_request_duration_seconds_bucket", m.duration_count[route], route=route, le="+Inf")
        out.lines.append(f"cello_http_request_duration_seconds_sum{_labels(route=route)} {m.duration_sum[route]!r}")
        out.sample("cello_http_request_duration_seconds_count", m.duration_count[route], route=route)
    return web.Response(text=out.text(), headers={"Content-Type": CONTENT_TYPE})


ROUTES: tuple[Route, ...] = (
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format 0.0.4)", "public", "misc",
          content="text/plain", responses={200: ("metrics", {"type": "string"})}),
)
