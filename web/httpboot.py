"""HTTP boot: per-node iPXE scripts and the kernels/initrds of the templates.

`GET /boot/<uuid>.ipxe` renders the node's script from the boot policy (404 unknown node, 503 while
the `http-boot` service is disabled, 403 and a `denied` event when the script carries a root disk and
the client is not at its node's address — `BootPolicy.may_fetch`). `GET /boot/files/<path>` serves a
file of the boot files root with sendfile (web.FileResponse: ranges, conditional requests); a path
that would leave the root — `..`, absolute, NUL, or a symlink pointing out — is refused. Every fetch
is published as an `http` event.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import hdrs, web, web_fileresponse
from aiohttp.abc import AbstractStreamWriter

from bootfiles.render import RenderError, render_ipxe
from bootfiles.tree import OS_LINK_TARGETS
from web.errors import ApiError
from web.keys import BOOT_CLIENTS, DEPS, METRICS
from web.routes import Param, Route
from web.schemas import UUID

MAX_PATH = 1024
RESOLVE_TTL = 1.0  # seconds a path → file resolution is reused (as the TFTP side's bootfiles.tree.RESOLVE_TTL)
RESOLVED_MAX = 4096  # resolutions remembered at most (all forgotten when full)


def _publish(request: web.Request, server: str | None, file: str, size: int, status: int) -> None:
    client = request.remote or ""
    request.app[DEPS].domain.events.publish("http", {"server": server, "client": client, "file": file,
                                              "bytes": size, "status": status})
    request.app[METRICS].boot_bytes += size
    request.app[METRICS].boot_fetches["script" if "uuid" in request.match_info else "file", status] += 1


def _http_boot_enabled(request: web.Request) -> bool:
    return request.app[DEPS].domain.services.get("http-boot", True)


async def ipxe_script(request: web.Request) -> web.StreamResponse:
    """The node's iPXE script (iPXE asks `/boot/${uuid}.ipxe?mac=${net0/mac}`)."""
    deps = request.app[DEPS]
    uuid = request.match_info["uuid"].lower()
    file = f"{uuid}.ipxe"
    mac = request.query.get("mac")
    if not _http_boot_enabled(request):
        _publish(request, uuid, file, 0, 503)
        raise ApiError(503, "service_disabled", "the http-boot service is disabled")
    spec = deps.domain.policy.boot_spec(uuid=uuid, mac=mac)
    if spec is None:
        _publish(request, None, file, 0, 404)
        raise ApiError(404, "not_found", f"no bootable server {uuid}")
    client = request.remote or ""
    if not deps.domain.policy.may_fetch(spec, client):
        reason = (f"the boot script of server {spec.server_uuid} goes only to its node's address, not to "
                  f"{client} (no recent DHCP of that node from there, and not its configured address)")
        deps.domain.events.publish("denied", {"server": spec.server_uuid, "client": client, "file": file, "via": "http",
                                       "reason": reason})
        _publish(request, spec.server_uuid, file, 0, 403)
        raise ApiError(403, "denied", reason)
    try:
        body = render_ipxe(spec).encode()
    except RenderError as e:
        _publish(request, spec.server_uuid, file, 0, 500)
        raise ApiError(500, "render_error", f"cannot render the boot script of {spec.server_uuid}: {e}") from None
    request.app[BOOT_CLIENTS].remember(request.remote or "", spec.server_uuid)
    _publish(request, spec.server_uuid, file, len(body), 200)
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


def resolve_inside(root: Path, rel: str, link_targets: Sequence[Path] = ()) -> Path | None:
    """The regular file `rel` names inside `root`, or None when it would leave the root or is no file.
    A packaged link may lead into one of `link_targets` (Debian's ipxe.efi → /boot/ipxe.efi)."""
    if not rel or len(rel) > MAX_PATH or "\0" in rel or "\\" in rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root / rel))
    allowed = [real_root, *(Path(os.path.realpath(t)) for t in link_targets)]
    if not any(target.is_relative_to(a) for a in allowed) or not target.is_file():
        return None
    return target


def resolve_boot_file(files_root: Path, loader_roots: Sequence[Path], rel: str) -> Path | None:
    """Kernels and initrds from the boot files root first, then loader files (ipxe.efi for UEFI HTTP
    boot) from the static loader folders the TFTP server serves too."""
    found = resolve_inside(files_root, rel)
    for root in loader_roots:
        if found is not None:
            break
        found = resolve_inside(root, rel, OS_LINK_TARGETS)
    return found


# (files root, loader roots, path) → (valid until, file). Module state, keyed by the roots, because the
# app is frozen once it serves: a resolution is a pure function of the roots and the file tree.
_resolved: dict[tuple[Path, tuple[Path, ...], str], tuple[float, Path]] = {}


async def _resolved_boot_file(files_root: Path, loader_roots: tuple[Path, ...],
                              rel: str) -> tuple[Path | None, bool]:
    """resolve_boot_file in a worker thread, a found file remembered for RESOLVE_TTL: a boot storm asks
    for the same kernel and initrd hundreds of times a second, and each resolution is a dozen lstat()s
    of Python (os.path.realpath) — in a worker thread that holds the GIL against the event loop. A file
    replaced or removed shows after at most RESOLVE_TTL; one that is not there is looked up every time.
    The flag says the answer was remembered (the file was found within RESOLVE_TTL: its inode is hot)."""
    key = (files_root, loader_roots, rel)
    now = time.monotonic()
    hit = _resolved.get(key)
    if hit is not None and hit[0] > now:
        return hit[1], True
    found = await asyncio.to_thread(resolve_boot_file, files_root, loader_roots, rel)
    if found is not None:
        if len(_resolved) >= RESOLVED_MAX:
            _resolved.clear()
        _resolved[key] = (now + RESOLVE_TTL, found)
    return found, False


async def boot_file(request: web.Request) -> web.StreamResponse:
    """A kernel or initrd (or any file) under the boot files root, sent with sendfile."""
    deps = request.app[DEPS]
    rel = request.match_info["path"]
    server = request.app[BOOT_CLIENTS].server_of(request.remote or "")
    if not _http_boot_enabled(request):
        _publish(request, server, rel, 0, 503)
        raise ApiError(503, "service_disabled", "the http-boot service is disabled")
    target, hot = await _resolved_boot_file(deps.files_root, tuple(deps.loader_roots), rel)
    if target is None:
        _publish(request, server, rel, 0, 404)
        raise ApiError(404, "not_found", f"no boot file {rel[:200]!r}")

    def sent(resp: web.FileResponse, complete: bool) -> None:
        size = 0 if request.method == "HEAD" or resp.status >= 300 or not complete else (resp.content_length or 0)
        _publish(request, server, rel, size, resp.status)

    return _LoggedFileResponse(target, sent, headers={"Cache-Control": "no-cache"}, inline=hot)


# The FileResponse internals _LoggedFileResponse._prepare_inline calls (aiohttp >= 3.10); without them
# every response takes FileResponse.prepare as it is.
_INLINE = hasattr(web_fileresponse, "_FileResponseResult") and all(
    hasattr(web.FileResponse, name) for name in ("_make_response", "_prepare_open_file", "_not_modified",
                                                 "_precondition_failed"))


class _LoggedFileResponse(web.FileResponse):
    """A FileResponse that reports, once sent, what it sent (its status and length are known only then).

    `inline`: the file was resolved within RESOLVE_TTL, so its stat, open and close are done in the
    event loop (as nginx does in its worker) instead of FileResponse's two worker-thread hops. With
    32 requests at once those hops were most of a small file's cost — each a thread waking to hold the
    GIL against the loop — and the loop's own syscalls waited behind them (x0.01 nginx's requests/s)."""

    def __init__(self, path: Path, on_sent: Callable[[web.FileResponse, bool], None],
                 headers: dict[str, str], inline: bool = False) -> None:
        super().__init__(path, headers=headers)
        self._on_sent = on_sent
        self._inline = inline and _INLINE

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        complete = False
        try:
            # either sends the whole file (sendfile)
            writer = await (self._prepare_inline(request) if self._inline else super().prepare(request))
            complete = True
            return writer
        finally:
            self._on_sent(self, complete)

    async def _prepare_inline(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """FileResponse.prepare with _make_response and the close called here, not in the executor."""
        accept_encoding = request.headers.get(hdrs.ACCEPT_ENCODING, "").lower()
        try:
            result, fobj, st, file_encoding = self._make_response(request, accept_encoding)
        except PermissionError:
            self.set_status(web.HTTPForbidden.status_code)
            return await web.StreamResponse.prepare(self, request)
        except OSError:  # removed since it was resolved
            self.set_status(web.HTTPNotFound.status_code)
            return await web.StreamResponse.prepare(self, request)
        results = web_fileresponse._FileResponseResult
        if result is results.NOT_ACCEPTABLE:
            self.set_status(web.HTTPForbidden.status_code)
            return await web.StreamResponse.prepare(self, request)
        if result is results.PRE_CONDITION_FAILED:
            return await self._precondition_failed(request)
        if result is results.NOT_MODIFIED:
            return await self._not_modified(request, f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime)
        assert fobj is not None
        try:
            return await self._prepare_open_file(request, fobj, st, file_encoding)
        finally:
            fobj.close()


_UUID = {"uuid": {"type": "string", "description": UUID["pattern"]}}
_MAC = Param("mac", {"type": "string"}, "the node's MAC, the fallback when the UUID is unknown or broken")
_PATH = {"path": {"type": "string", "description": "path inside the boot files root"}}
_FILE = {"type": "string", "format": "binary"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/boot/{uuid}.ipxe", ipxe_script, "A node's iPXE script", "public", "boot",
          path_params=_UUID, params=(_MAC,), content="text/plain",
          responses={200: ("the script", {"type": "string"}),
                     403: ("the client is not at the node's address", None),
                     503: ("http-boot is disabled", None)}),
    Route("GET", "/boot/files/{path:.+}", boot_file, "A kernel or initrd from the boot files root", "public",
          "boot", path_params=_PATH, content="application/octet-stream",
          responses={200: ("the file", _FILE), 206: ("a range of the file", _FILE),
                     304: ("not modified", None), 503: ("http-boot is disabled", None)}),
    Route("HEAD", "/boot/files/{path:.+}", boot_file, "Size and date of a boot file", "public", "boot",
          path_params=_PATH, content="application/octet-stream", name="head_boot_file",
          responses={200: ("the file's headers", None), 503: ("http-boot is disabled", None)}),
)
