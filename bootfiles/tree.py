"""The virtual TFTP tree: static loader folders + template kernels/initrds + per-node configs rendered on request.

Rendered names (nothing is copied per node; each request asks the policy again):

    pxelinux.cfg/<uuid>              boot_spec(uuid=<uuid>)
    pxelinux.cfg/01-<mac>            boot_spec(mac=<mac>)
    pxelinux.cfg/<IP hex prefix>     boot_spec() — the unknown-node spec, if configured
    pxelinux.cfg/default             boot_spec()
    <uuid>/pxelinux.cfg/default      boot_spec(uuid=<uuid>)  (hcc-cello: pxelinux path prefix <uuid>/)
    grub/grub.cfg-01-<mac>, grub/grub.cfg-<uuid>, grub/grub.cfg-<IP hex>, grub/grub.cfg
    ipxe/<uuid>.ipxe, ipxe/01-<mac>.ipxe, ipxe/default.ipxe, boot/<uuid>.ipxe

Any other name is looked up in files_root (e.g. templates/tiny/v1/vmlinuz), then in each static root.
Under a `<uuid>/` prefix the rest of the path is looked up the same way (pxelinux prefixes ldlinux.c32).

Access: a rendered config whose spec has a root disk is served only to an address the policy's
`may_fetch` allows (its node's, learned from DHCP or configured); others get Denied (TFTP access
violation). Unknown-node configs (no root disk) stay public.

Safety: a name is refused (AccessViolation) when it has a NUL or control byte, a backslash, a `.` or
`..` component or any component starting with a dot, an empty component, or is longer than
MAX_NAME_BYTES. One leading `/` means the root of the tree (as pxelinux sends absolute names and
in.tftpd -s treats them), so `/etc/passwd` is looked up as <root>/etc/passwd. A symlink whose target
leaves every root (and every extra `link_targets` folder) is refused.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import naming
from bootfiles.cache import FileCache, FileSource
from bootfiles.render import RenderError, render_grub, render_ipxe, render_pxelinux
from bootfiles.spec import BootPolicy, BootSpec
from bootfiles.tftp_transfer import BlockSource, BytesSource

MAX_NAME_BYTES = 255
RESOLVE_TTL = 1.0  # seconds a name → file resolution is reused
# seconds past that in which open_now still answers from it while a fresh one is looked up (see open_now)
STALE_TTL = 30.0
CLIENT_TTL = 600.0  # seconds a client address stays attributed to the server whose config it fetched
CLIENT_MEMORY = 4096  # client addresses remembered at most
_SMALL_FILE = 1 << 20  # below this a cache miss just waits for the load

# The usual loader folders of the OSes Cello runs on (Debian: pxelinux, syslinux-common, ipxe;
# FreeBSD: the syslinux and ipxe ports).
OS_LOADER_ROOTS: tuple[Path, ...] = (
    Path("/usr/lib/PXELINUX"),
    Path("/usr/lib/syslinux/modules/bios"),
    Path("/usr/lib/ipxe"),
    Path("/usr/local/share/syslinux/bios"),
    Path("/usr/local/share/syslinux"),
    Path("/usr/local/share/ipxe"),
)
# Debian's ipxe package links /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi: the target folder of such a
# packaged link is allowed as a link target only, never served by name.
OS_LINK_TARGETS: tuple[Path, ...] = (Path("/boot"),)

_UUID = re.compile(naming.UUID.text)
_MAC_NAME = re.compile(r"01-([0-9a-f]{2}(?:-[0-9a-f]{2}){5})")
_IP_HEX = re.compile(r"[0-9A-Fa-f]{1,8}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def pxelinux_uuid_to_smbios(text: str) -> str:
    """Swap the first three UUID fields' byte order (the swap is its own inverse)."""
    return str(uuidlib.UUID(bytes=uuidlib.UUID(text).bytes_le))


def default_static_roots() -> list[Path]:
    """The OS loader folders that exist on this machine."""
    return [p for p in OS_LOADER_ROOTS if p.is_dir()]


class TreeError(Exception):
    """A name the tree does not serve; `code` is the TFTP error code to answer with."""

    code = 0
    outcome = "error"

    def reply_text(self) -> str:
        """The message of the TFTP ERROR packet (the client sees this, so it stays short)."""
        return self.outcome.replace("-", " ")


class NotFound(TreeError):
    code = 1
    outcome = "not-found"


class Refused(TreeError):
    code = 2
    outcome = "refused"


class Denied(Refused):
    """A config that carries a root disk (and its secret), asked for from an address that is not its
    node's (BootPolicy.may_fetch said no)."""

    outcome = "denied"

    def __init__(self, server_uuid: str, client: str) -> None:
        super().__init__(f"the boot config of server {server_uuid} goes only to its node's address, "
                         f"not to {client}")
        self.server_uuid = server_uuid
        self.client = client

    def reply_text(self) -> str:
        return "access denied: this boot config is served only to its node's own address"


class RenderFailed(TreeError):
    code = 0
    outcome = "render-error"


@dataclass
class OpenedFile:
    source: BlockSource
    size: int
    server_uuid: str | None
    kind: Literal["rendered", "static"]
    data: bytes | None = None  # the whole file when it is in memory (needed for netascii)
    _file: FileSource | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def fileno(self) -> int:
        """The descriptor of a file served from disk, else -1 (in memory: `data`)."""
        return self._file.fileno() if self._file is not None else -1


def split_name(name: str) -> list[str]:
    """Validate a requested name and split it into path components (pure). Raises Refused."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise Refused(f"name longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(name):  # one regex scan: a generator over the characters cost ~15 us per RRQ
        raise Refused("NUL or control character in name")
    if "\\" in name:
        raise Refused("backslash in name")
    if name.startswith("::"):  # pxelinux: "::name" is root-relative
        name = name[2:]
    if name.startswith("/"):
        name = name[1:]
    if not name:
        raise Refused("empty name")
    parts = name.split("/")
    for part in parts:
        if part == "":
            raise Refused("empty path component")
        if part.startswith("."):
            raise Refused(f"path component {part!r} starts with a dot")
    return parts


def pxelinux_config_names(uuid: str | None, mac: str | None, ip: str | None) -> list[str]:
    """The names pxelinux tries, in order (syslinux doc/pxelinux.txt)."""
    names: list[str] = []
    if uuid:
        names.append(f"pxelinux.cfg/{uuid.lower()}")
    if mac:
        names.append("pxelinux.cfg/01-" + mac.lower().replace(":", "-"))
    if ip:
        hexip = "".join(f"{int(octet):02X}" for octet in ip.split("."))
        names += [f"pxelinux.cfg/{hexip[:n]}" for n in range(8, 0, -1)]
    names.append("pxelinux.cfg/default")
    return names


_Kind = Literal["pxelinux", "grub", "ipxe"]


def _route(parts: list[str]) -> tuple[_Kind, str | None, str | None] | None:
    """A rendered name → (format, uuid, mac); None for a static name. Pure."""
    prefix_uuid: str | None = None
    lower = [p.lower() for p in parts]
    if len(lower) > 1 and _UUID.fullmatch(lower[0]):
        prefix_uuid = lower[0]
        lower = lower[1:]
    if len(lower) != 2:
        return None
    folder, name = lower
    fallback = (prefix_uuid, None)
    if folder == "pxelinux.cfg":
        kind: _Kind = "pxelinux"
        leaf = name
    elif folder == "grub" and (name == "grub.cfg" or name.startswith("grub.cfg-")):
        kind = "grub"
        leaf = "default" if name == "grub.cfg" else name[len("grub.cfg-") :]
    elif folder == "ipxe" and name.endswith(".ipxe"):
        kind = "ipxe"
        leaf = name[: -len(".ipxe")]
    elif folder == "boot" and name.endswith(".ipxe") and _UUID.fullmatch(name[: -len(".ipxe")]):
        return ("ipxe", name[: -len(".ipxe")], None)
    else:
        return None
    if _UUID.fullmatch(leaf):
        return (kind, leaf, None)
    if m := _MAC_NAME.fullmatch(leaf):
        return (kind, None, m.group(1).replace("-", ":"))
    if leaf == "default" or (kind != "ipxe" and _IP_HEX.fullmatch(leaf)):
        return (kind, *fallback)
    return None


class BootTree:
    """What the TFTP server reads. `open` is async: static files are resolved and loaded off the loop."""

    def __init__(
        self,
        static_roots: Sequence[Path],
        files_root: Path | None,
        policy: BootPolicy,
        cache_bytes: int = 512 * 1024 * 1024,
        *,
        max_entry_bytes: int | None = None,
        link_targets: Sequence[Path] = OS_LINK_TARGETS,
        resolve_ttl: float = RESOLVE_TTL,
        stale_ttl: float = STALE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock  # for the resolve and client TTLs; tests pass their own
        roots = ([files_root] if files_root is not None else []) + list(static_roots)
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.link_targets = [Path(os.path.realpath(p)) for p in link_targets]
        self.cache = FileCache(cache_bytes, max_entry_bytes)
        self.resolve_ttl = resolve_ttl
        self.stale_ttl = stale_ttl
        self._resolved: dict[str, tuple[float, tuple[Path, os.stat_result] | None]] = {}
        self._resolving: dict[str, asyncio.Future[tuple[Path, os.stat_result] | None]] = {}
        # requested name -> (until, bytes, server of its <uuid>/ prefix): open_now's answers (static only)
        self._served_now: dict[str, tuple[float, bytes, str | None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}  # open_now answers being looked up again
        self._clients: dict[str, tuple[str, float]] = {}  # client address -> (server, until)

    def open_now(self, name: str, client: tuple[str, int]) -> OpenedFile | None:
        """`open` when the answer needs no thread: a rendered config, or a static file whose name was
        resolved within resolve_ttl and whose bytes are in the cache (every request of a boot storm
        after the first). None means "ask `open`". Raises TreeError as `open` does.

        The server calls this in the listener's callback, so that such a request's OACK or first DATA
        leaves before the loop turns (a task would start only on the next trip through it).

        A static answer outlives its resolution by up to stale_ttl: a request then is still answered
        from it, and a fresh resolution is looked up in the background (stale-while-revalidate, as
        HTTP caches do). Without that, each burst of a storm that came after the answer's second was
        up waited for a worker thread before its first block. A replaced file is served in full, old
        or new, never mixed: the old bytes until that look-up has seen the change, the new ones after."""
        now = self.clock()
        # A storm asks for one static name hundreds of times: its answer, found below once, is kept
        # (checking and routing the name cost ~20 us of each request). Only static names get here: a
        # rendered name never reaches the end of this method.
        served = self._served_now.get(name)
        if served is not None:
            until, kept, kept_server = served
            if until <= now:
                if until + self.stale_ttl <= now:
                    del self._served_now[name]
                    served = None
                else:
                    self._refresh_soon(name, kept, kept_server)
            if served is not None:
                server = kept_server if kept_server is not None else self.server_of(client[0])
                return OpenedFile(BytesSource(kept), len(kept), server, "static", kept)
        parts = split_name(name)
        rendered = self._open_rendered(parts, client[0])
        if rendered is not None:
            return rendered
        hit = self._resolved.get("/".join(parts))
        if hit is None or hit[0] <= now:
            return None
        found = hit[1]
        if found is None:
            if len(parts) > 1 and _UUID.fullmatch(parts[0].lower()):
                return None  # the name under its <uuid>/ prefix may be resolved yet: `open` looks
            raise NotFound(name)
        _, st = found
        data = self.cache.peek(st) if self.cache.cacheable(st.st_size) else None
        if data is None:
            return None
        prefix_server = self._keep_answer(name, parts, data)
        server = prefix_server if prefix_server is not None else self.server_of(client[0])
        return OpenedFile(BytesSource(data), len(data), server, "static", data)

    def _keep_answer(self, name: str, parts: list[str], data: bytes) -> str | None:
        """Remember `name`'s answer for open_now until its resolution expires (and stale_ttl past that);
        returns the server its <uuid>/ prefix names, if any."""
        prefix_server = parts[0].lower() if _UUID.fullmatch(parts[0].lower()) else None
        hit = self._resolved.get("/".join(parts))
        if hit is None:  # not remembered at all (resolve_ttl 0)
            return prefix_server
        if len(self._served_now) >= 4096:  # bounded like _resolved: a flood of names costs no memory
            self._served_now.clear()
        self._served_now[name] = (hit[0], data, prefix_server)
        return prefix_server

    def _refresh_soon(self, name: str, kept: bytes, kept_server: str | None) -> None:
        """Look `name` up again in the background (once at a time); its open_now answer is then kept for
        another resolve_ttl if it still is the file's content, else dropped (the next request opens)."""
        if name in self._refreshing:
            return
        self._refreshing[name] = asyncio.get_running_loop().create_task(self._refresh(name, kept, kept_server))

    async def _refresh(self, name: str, kept: bytes, kept_server: str | None) -> None:
        try:
            parts = split_name(name)
            found = await self._lookup(parts)
            hit = self._resolved.get("/".join(parts))
            same = found is not None and hit is not None and self.cache.peek(found[1]) is kept
            if same and hit is not None:
                self._served_now[name] = (hit[0], kept, kept_server)
            else:
                self._served_now.pop(name, None)
        except Exception:  # a name now refused or unreadable: the next request opens it and is told
            self._served_now.pop(name, None)
        finally:
            self._refreshing.pop(name, None)

    async def open(self, name: str, client: tuple[str, int]) -> OpenedFile:
        parts = split_name(name)
        rendered = self._open_rendered(parts, client[0])
        if rendered is not None:
            return rendered
        found = await self._lookup(parts)
        direct = found is not None  # not found under its <uuid>/ prefix: only those are kept for open_now
        if found is None and len(parts) > 1 and _UUID.fullmatch(parts[0].lower()):
            found = await self._lookup(parts[1:])
        if found is None:
            raise NotFound(name)
        real, st = found
        server = parts[0].lower() if _UUID.fullmatch(parts[0].lower()) else self.server_of(client[0])
        if self.cache.cacheable(st.st_size):
            data = self.cache.peek(st)
            if data is not None:
                if direct:  # the next burst for this name, even one after its resolution, needs no wait
                    self._keep_answer(name, parts, data)
                return OpenedFile(BytesSource(data), len(data), server, "static", data)
            if st.st_size <= _SMALL_FILE:
                data = await self.cache.get(real, st)
                if direct:
                    self._keep_answer(name, parts, data)
                return OpenedFile(BytesSource(data), len(data), server, "static", data)
            # A big file not in memory yet (a kernel at the start of a boot storm): load it in the
            # background and serve this request from disk, so the first byte does not wait for the load.
            self.cache.prefetch(real, st)
        reader = await asyncio.to_thread(FileSource, real, st.st_size)
        return OpenedFile(reader, st.st_size, server, "static", None, reader)

    def _open_rendered(self, parts: list[str], client: str) -> OpenedFile | None:
        """A rendered name's config (None for a static name)."""
        route = _route(parts)
        if route is None:
            return None
        opened = self._render(*route, client=client)
        self._remember_client(client, opened.server_uuid)
        return opened

    def _remember_client(self, address: str, server: str | None) -> None:
        if server is None:
            return
        if len(self._clients) >= CLIENT_MEMORY and address not in self._clients:
            self._clients.pop(next(iter(self._clients)))  # the oldest: dicts keep insertion order
        self._clients.pop(address, None)
        self._clients[address] = (server, self.clock() + CLIENT_TTL)

    def server_of(self, address: str) -> str | None:
        """The server whose config this client address fetched last: a kernel or initrd request names
        no server, but boot events should (the web's HTTP boot does the same for its fetches)."""
        hit = self._clients.get(address)
        return hit[0] if hit is not None and hit[1] > self.clock() else None

    async def _lookup(self, parts: list[str]) -> tuple[Path, os.stat_result] | None:
        """Resolve in a worker thread, remembering answers for a second: a boot storm asks for the
        same few names hundreds of times, and a replaced file shows after at most resolve_ttl."""
        key = "/".join(parts)
        now = self.clock()
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        # Single flight: a storm's burst of RRQs for one name, arriving after its answer expired, waits
        # for one resolution instead of queueing one worker-thread job each ahead of its first byte.
        pending = self._resolving.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[Path, os.stat_result] | None] = asyncio.get_running_loop().create_future()
        self._resolving[key] = future
        try:
            found = await asyncio.to_thread(self._resolve_static, parts)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters (if any) get it raised
            raise
        finally:
            self._resolving.pop(key, None)
        future.set_result(found)
        if len(self._resolved) >= 4096:
            self._resolved.clear()
        if self.resolve_ttl > 0:
            self._resolved[key] = (now + self.resolve_ttl, found)
        return found

    def _render(self, kind: _Kind, uuid: str | None, mac: str | None, *, client: str) -> OpenedFile:
        spec: BootSpec | None = self.policy.boot_spec(uuid=uuid, mac=mac)
        if spec is None and kind == "pxelinux" and uuid is not None:
            # pxelinux prints option 97's bytes in wire order: its pxelinux.cfg/<uuid> is the SMBIOS UUID
            # with the first three fields byte-swapped (seen with qemu's ROM). Answer that name too.
            spec = self.policy.boot_spec(uuid=pxelinux_uuid_to_smbios(uuid), mac=mac)
        if spec is None:
            raise NotFound(f"no boot spec for uuid={uuid} mac={mac}")
        if not self.policy.may_fetch(spec, client):
            raise Denied(spec.server_uuid, client)
        try:
            if kind == "pxelinux":
                text = render_pxelinux(spec)
            elif kind == "grub":
                text = render_grub(spec)
            else:
                text = render_ipxe(spec)
        except RenderError as exc:
            raise RenderFailed(f"server {spec.server_uuid}: {exc}") from exc
        data = text.encode("ascii")
        return OpenedFile(BytesSource(data), len(data), spec.server_uuid, "rendered", data)

    def _inside(self, real: Path, folders: Sequence[Path]) -> bool:
        return any(real == f or real.is_relative_to(f) for f in folders)

    def _resolve_static(self, parts: list[str]) -> tuple[Path, os.stat_result] | None:
        """Blocking (run in a thread): the real path of a regular file inside the roots."""
        for root in self.roots:
            candidate = root.joinpath(*parts)
            try:
                real = Path(os.path.realpath(candidate, strict=True))
                st = os.stat(real)
            except (OSError, RuntimeError):
                continue
            if not self._inside(real, self.roots):
                # A link out: allowed only into a declared link-target folder, and only as a link.
                if not (self._inside(real, self.link_targets) and real != candidate):
                    raise Refused(f"{'/'.join(parts)} leads out of the boot tree")
            if not stat.S_ISREG(st.st_mode):
                continue
            return real, st
        return None
