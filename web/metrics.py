"""`GET /metrics` in the Prometheus text exposition format (0.0.4), and the middleware that counts requests.

Names follow Prometheus conventions: `cello_` first, `_total` on counters, the unit in the name
(`_seconds`, `_bytes`). The proxyDHCP and TFTP counters come from the services themselves, read through
`WebDeps.collect` (the composition root holds the services); iSCSI sessions from the export driver, one
read per scrape at most (domain/census.py); the durations from the event stream (domain/timings.py).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Iterable

from aiohttp import web

from dhcp import pxe
from domain.states import ServerState
from domain.timings import Histogram
from iscsi.model import StorageError
from web.deps import ServiceCounters, WebDeps
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

    def histogram(self, name: str, hist: Histogram, **labels: object) -> None:
        for le, n in hist.cumulative():
            self.sample(f"{name}_bucket", n, **labels, le=le)
        self.sample(f"{name}_bucket", hist.count, **labels, le="+Inf")
        self.lines.append(f"{name}_sum{_labels(**labels)} {float(hist.total)!r}")
        self.sample(f"{name}_count", hist.count, **labels)

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
    counters = deps.collect()
    _dhcp(out, counters)
    _tftp(out, counters)
    out.family("cello_http_boot_fetches_total", "counter", "HTTP boot fetches by kind (script, file) and status")
    for (kind, status), n in sorted(m.boot_fetches.items()):
        out.sample("cello_http_boot_fetches_total", n, kind=kind, status=status)
    await _sessions(out, deps)
    _timings(out, deps)
    await _service_up(out, deps)
    await _fleet(out, deps)
    return web.Response(text=out.text(), headers={"Content-Type": CONTENT_TYPE})


ARCH_NAMES = {pxe.ARCH_BIOS: "bios", pxe.ARCH_EFI_IA32: "efi-ia32", pxe.ARCH_EFI_BC: "efi-bc",
              pxe.ARCH_EFI_X64: "efi-x64", pxe.ARCH_EFI_ARM64: "efi-arm64", pxe.ARCH_EFI_X64_HTTP: "efi-x64-http",
              pxe.ARCH_EFI_ARM64_HTTP: "efi-arm64-http"}  # RFC 4578 §2.1 / IANA processor architecture types


def _by_arch(out: _Out, name: str, kind_help: str, table: dict[int, int] | None) -> None:
    out.family(name, "counter", kind_help)
    for arch, n in sorted((table or {}).items()):
        out.sample(name, n, arch=ARCH_NAMES.get(arch, str(arch)))


def _counter(out: _Out, name: str, help_text: str, value: int | None) -> None:
    out.family(name, "counter", help_text)
    if value is not None:
        out.sample(name, value)


def _dhcp(out: _Out, counters: ServiceCounters) -> None:
    s = counters.dhcp
    _counter(out, "cello_dhcp_received_total", "Datagrams the proxyDHCP received (any DHCP traffic it hears)",
             None if s is None else s.received)
    _by_arch(out, "cello_dhcp_boot_requests_total", "PXE / iPXE / UEFI HTTP boot requests, by firmware arch",
             None if s is None else s.requests_by_arch)
    _by_arch(out, "cello_dhcp_offers_total", "proxyDHCP offers sent (port 67), by firmware arch",
             None if s is None else s.offers_by_arch)
    _by_arch(out, "cello_dhcp_acks_total", "PXE boot server ACKs sent (port 4011), by firmware arch",
             None if s is None else s.acks_by_arch)
    out.family("cello_dhcp_ignored_total", "counter", "Requests not answered, by reason")
    for reason, n in sorted((s.by_reason if s else {}).items()):
        out.sample("cello_dhcp_ignored_total", n, reason=reason)
    for name, help_text, value in (
            ("cello_dhcp_malformed_total", "Datagrams the DHCP codec refused", None if s is None else s.malformed),
            ("cello_dhcp_errors_total", "Requests that failed inside the responder (a bug)",
             None if s is None else s.errors),
            ("cello_dhcp_send_failures_total", "Replies the socket would not take",
             None if s is None else s.send_failures),
            ("cello_dhcp_receive_errors_total", "Receives that failed", None if s is None else s.recv_errors)):
        _counter(out, name, help_text, value)


FINISHED = ("ok", "tsize-probe")  # a UEFI tsize probe ends with the client's ERROR 8 by design


def _tftp(out: _Out, counters: ServiceCounters) -> None:
    s = counters.tftp
    _counter(out, "cello_tftp_transfers_started_total", "TFTP transfers started", None if s is None else s.started)
    ended = sorted((s.ended if s else {}).items())
    out.family("cello_tftp_transfers_finished_total", "counter", "TFTP transfers that ended well, by outcome")
    for outcome, n in ended:
        if outcome in FINISHED:
            out.sample("cello_tftp_transfers_finished_total", n, outcome=outcome)
    out.family("cello_tftp_transfers_failed_total", "counter",
               "TFTP transfers that ended badly, by outcome (timeout, not-found, denied, aborted, error, ...)")
    for outcome, n in ended:
        if outcome not in FINISHED:
            out.sample("cello_tftp_transfers_failed_total", n, outcome=outcome)
    out.family("cello_tftp_requests_refused_total", "counter",
               "TFTP requests refused or dropped before a transfer (refused-write, bad-mode, busy, disabled)")
    for outcome, n in sorted((s.refused if s else {}).items()):
        out.sample("cello_tftp_requests_refused_total", n, outcome=outcome)
    _counter(out, "cello_tftp_sent_bytes_total", "Bytes sent by ended TFTP transfers",
             None if s is None else s.bytes_sent)
    _counter(out, "cello_tftp_retransmits_total", "Windows / OACKs sent again by ended TFTP transfers",
             None if s is None else s.retransmits)
    out.family("cello_tftp_transfers_active", "gauge", "TFTP transfers running now")
    if s is not None:
        out.sample("cello_tftp_transfers_active", counters.tftp_active)


async def _sessions(out: _Out, deps: WebDeps) -> None:
    try:
        per_target = await deps.domain.census.per_target()
    except (StorageError, OSError):  # the driver cannot say now: no figure rather than a wrong one
        per_target = None
    out.family("cello_iscsi_sessions_readable", "gauge", "1 when the export driver answered the session read")
    out.sample("cello_iscsi_sessions_readable", 0 if per_target is None else 1)
    out.family("cello_iscsi_sessions", "gauge", "iSCSI sessions (initiators logged in) per exported target")
    for iqn, n in sorted((per_target or {}).items()):
        out.sample("cello_iscsi_sessions", n, target=iqn, server=iqn.rpartition(":")[2])
    try:
        failed = await deps.domain.census.logins.total()
    except OSError:
        failed = None
    out.family("cello_iscsi_login_failures_total", "counter",
               "iSCSI logins the target refused (CHAP), from the supervised tgtd's log; absent where none is kept")
    if failed is not None:
        out.sample("cello_iscsi_login_failures_total", failed)


def _timings(out: _Out, deps: WebDeps) -> None:
    t = deps.domain.timings
    out.family("cello_workflow_duration_seconds", "histogram",
               "Workflow durations (create, delete, rebuild, rollback, ...) from first step to done or failed")
    for (workflow, outcome), hist in sorted(t.workflows.items()):
        out.histogram("cello_workflow_duration_seconds", hist, workflow=workflow, outcome=outcome)
    out.family("cello_boot_power_on_to_root_seconds", "histogram",
               "Power-on (through the BMC) to the node's iSCSI login, for reboots onto a new root")
    out.histogram("cello_boot_power_on_to_root_seconds", t.power_on_to_root)
    out.family("cello_server_last_dhcp_reply_timestamp_seconds", "gauge",
               "When the server's node last got a proxyDHCP offer or ACK (Unix time)")
    for server, at in sorted(t.last_dhcp_reply.items()):
        out.lines.append(f"cello_server_last_dhcp_reply_timestamp_seconds{_labels(server=server)} {at!r}")


UP_STATES = {"running": 1, "disabled": 1, "failed": 0, "unavailable": 0}  # "off": not configured, not shown


async def _service_up(out: _Out, deps: WebDeps) -> None:
    report = deps.health()
    if inspect.isawaitable(report):
        report = await report
    out.family("cello_service_up", "gauge", "1 when the service runs (or is switched off on purpose), 0 when it "
               "failed or is unavailable")
    for name, h in sorted(report.items()):
        up = UP_STATES.get(h.get("state", ""))
        if up is not None:
            out.sample("cello_service_up", up, service=name)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/metrics", metrics, "Prometheus metrics (text format 0.0.4)", "public", "misc",
          content="text/plain", responses={200: ("metrics", {"type": "string"})}),
)


async def _fleet(out: _Out, deps: WebDeps) -> None:
    """The fleet as the shared store says, seen from this appliance (every appliance says the same)."""
    views = await deps.domain.fleet.view()
    out.family("cello_fleet_appliance_up", "gauge", "1 when the appliance heartbeats (0: down)")
    out.family("cello_fleet_appliance_disabled", "gauge", "1 when an operator disabled placement there")
    out.family("cello_fleet_appliance_bytes", "gauge", "Placement capacity and what is placed, by appliance")
    out.family("cello_fleet_appliance_servers", "gauge", "Servers whose volumes the appliance holds")
    out.family("cello_fleet_template_copies", "gauge", "Template version copies on the appliance, by state")
    for v in views:
        name = v.row.name
        out.sample("cello_fleet_appliance_up", 0 if v.state == "down" else 1, appliance=name)
        out.sample("cello_fleet_appliance_disabled", 1 if v.row.disabled else 0, appliance=name)
        out.sample("cello_fleet_appliance_bytes", v.row.capacity_bytes, appliance=name, kind="capacity")
        out.sample("cello_fleet_appliance_bytes", v.placed_bytes, appliance=name, kind="placed")
        out.sample("cello_fleet_appliance_servers", v.servers, appliance=name)
        out.sample("cello_fleet_template_copies", len(v.templates), appliance=name, state="ready")
        out.sample("cello_fleet_template_copies", len(v.copying), appliance=name, state="copying")
