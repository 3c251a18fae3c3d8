"""FreeBSD ctld export driver: render ctl.conf whole, write it only when the bytes change, reload,
and check the result with `ctladm` — never trust the reload's exit status, never restart ctld.

ctld facts (from its source): a reload with a parse error silently keeps the old config and returns
before the new one is applied, so `apply()` polls `ctladm devlist -x` / `ctladm portlist -x` until
the kernel holds exactly the desired LUNs and targets. When `apply()` returns, a LUN removed from the
desired state is gone from ctl, so its volume may be destroyed.

CTL's capacity is fixed at boot (ctl.c): `kern.cam.ctl.max_luns` LUNs (default 1024) and
`kern.cam.ctl.max_ports` ports (default 256) for the whole host, both powers of two. ctld makes one
port per target and portal group, and one LUN per `lun` block; CTL's own ports (tpc, camsim, ioctl,
an HBA's camtgt ports) and LUNs made with `ctladm create` hold their share of the same tables. The
driver reads both tunables, counts the share of others from `ctladm`, and refuses a desired state
that does not fit before it reaches ctld, whose reload would otherwise fail at apply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iscsi import ctlconf
from iscsi.model import ExportState, Session, StorageError, TargetSpec
from iscsi.runner import CommandRunner, default_runner

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
# The ports CTL registers itself (ctl_tpc_local.c, ctl_frontend_cam_sim.c, ctl_frontend_ioctl.c):
# assumed held when `ctladm portlist` cannot be read to count them.
CTL_OWN_PORTS = ("tpc", "camsim", "ioctl")
MAX_LUNS_SYSCTL = "kern.cam.ctl.max_luns"
MAX_PORTS_SYSCTL = "kern.cam.ctl.max_ports"


@dataclass(frozen=True)
class CtlLun:
    ctl_id: int
    ctld_name: str | None
    path: str | None


@dataclass(frozen=True)
class CtlPort:
    port_id: int
    frontend: str
    target: str | None
    lun_map: Mapping[int, int]  # port LUN number -> ctl LUN id


class CtladmParseError(ValueError):
    """`ctladm … -x` printed something that is not the expected XML."""


def parse_devlist(xml: str) -> list[CtlLun]:
    """`ctladm devlist -x` → LUNs. ctld tags the LUNs it made with the `ctld_name` option."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise CtladmParseError(f"ctladm devlist -x: {exc}") from None
    out = []
    for lun in root.iter("lun"):
        try:
            ctl_id = int(lun.get("id", ""))
        except ValueError:
            raise CtladmParseError("ctladm devlist -x: <lun> without a numeric id") from None
        out.append(CtlLun(ctl_id, lun.findtext("ctld_name"), lun.findtext("file")))
    return out


def parse_portlist(xml: str) -> list[CtlPort]:
    """`ctladm portlist -x` → ports with their target name and LUN map."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise CtladmParseError(f"ctladm portlist -x: {exc}") from None
    out = []
    for port in root.iter("targ_port"):
        try:
            lun_map = {int(e.get("id", "")): int(e.text or "") for e in port.findall("lun")}
            port_id = int(port.get("id", ""))
        except ValueError:
            raise CtladmParseError("ctladm portlist -x: non-numeric port or LUN id") from None
        target = port.findtext("cfiscsi_target") or port.findtext("target")
        out.append(CtlPort(port_id, port.findtext("frontend_type") or "", target, lun_map))
    return out


def ctld_made(port: CtlPort) -> bool:
    """ctld's ports are the iSCSI frontend's (one per target and portal group); all others are CTL's own."""
    return port.frontend == "iscsi"


@dataclass(frozen=True)
class CtlLimits:
    """CTL's capacity and what others than ctld's targets hold of it (None: the tunable is unknown)."""

    max_luns: int | None
    max_ports: int | None
    other_luns: int = 0  # LUNs without ctld's `ctld_name` option (e.g. made with `ctladm create`)
    other_ports: int = len(CTL_OWN_PORTS)  # tpc, camsim, ioctl, HBA ports, …

    def refusal(self, targets: int, luns: int) -> str | None:
        """Why `targets` targets with `luns` LUNs in all would not fit into CTL, or None if they fit."""
        if self.max_ports is not None and targets + self.other_ports > self.max_ports:
            return (f"{targets} targets need {targets} CTL ports and CTL's own ports hold {self.other_ports}: "
                    f"more than {MAX_PORTS_SYSCTL}={self.max_ports} (raise it in /boot/loader.conf)")
        if self.max_luns is not None and luns + self.other_luns > self.max_luns:
            return (f"{luns} LUNs, and {self.other_luns} more that ctld did not make, are more than "
                    f"{MAX_LUNS_SYSCTL}={self.max_luns} (raise it in /boot/loader.conf)")
        return None

    def as_json(self) -> dict[str, int | None]:
        return {"max_luns": self.max_luns, "max_ports": self.max_ports, "other_luns": self.other_luns,
                "other_ports": self.other_ports, "max_luns_per_target": ctlconf.MAX_LUNS_PER_TARGET}


def state_from_ctladm(luns: Sequence[CtlLun], ports: Sequence[CtlPort]) -> dict[str, dict[str, int]]:
    by_id = {lun.ctl_id: lun for lun in luns}
    targets: dict[str, dict[str, int]] = {}
    for port in ports:
        if not ctld_made(port) or not port.target:
            continue
        mapped = targets.setdefault(port.target, {})
        for number, ctl_id in port.lun_map.items():
            lun = by_id.get(ctl_id)
            if lun is not None and lun.ctld_name:
                mapped[lun.ctld_name] = number
    return targets


def _write_atomically(path: Path, data: bytes, mode: int = 0o640) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class CtldDriver:
    name = "ctld"

    def __init__(
        self,
        conf_path: Path,
        portals: Sequence[str],
        runner: CommandRunner | None = None,
        sleep: Sleep = asyncio.sleep,
        *,
        verify_timeout: float = 15.0,
        verify_interval: float = 0.25,
        max_ports: int | None = None,
        max_luns: int | None = None,
    ) -> None:
        self.conf_path = Path(conf_path)
        self.portals = tuple(portals)
        ctlconf.from_specs([], self.portals)  # validates the portals now, not at the first apply
        self._run = runner or default_runner()
        self._sleep = sleep
        self._timeout = verify_timeout
        self._interval = verify_interval
        self.max_ports = max_ports
        self.max_luns = max_luns
        self.other_ports: int | None = None  # counted from `ctladm portlist -x`; None until read
        self.other_luns = 0
        self._lock = asyncio.Lock()
        self.writes = 0
        self.reloads = 0

    async def start(self) -> None:
        """Learn CTL's limits and what CTL's own ports and LUNs hold of them; ctld itself is a system
        service that Cello never starts or restarts."""
        if self.max_luns is None:
            self.max_luns = await self._sysctl(MAX_LUNS_SYSCTL)
        if self.max_ports is None:
            self.max_ports = await self._sysctl(MAX_PORTS_SYSCTL)
        try:
            await self._ctladm()
        except StorageError as exc:  # ctl.ko not loaded yet, say: the first apply counts again
            log.warning("ctladm: %s; assuming CTL's own ports %s until it answers", exc, ", ".join(CTL_OWN_PORTS))

    async def _sysctl(self, name: str) -> int | None:
        res = await self._run(["sysctl", "-n", name], check=False)
        value = res.stdout.strip()
        return int(value) if res.returncode == 0 and value.isdigit() else None

    def limits(self) -> CtlLimits:
        others = len(CTL_OWN_PORTS) if self.other_ports is None else self.other_ports
        return CtlLimits(self.max_luns, self.max_ports, self.other_luns, others)

    def refusal(self, targets: int, luns: int) -> str | None:
        """Why a desired state of `targets` targets with `luns` LUNs in all would not fit, or None."""
        return self.limits().refusal(targets, luns)

    async def stop(self) -> None:
        """Nothing to do: ctl.conf and ctld stay, and keep serving the nodes' root disks while Cello is down."""

    async def teardown(self, iqn_prefix: str | None = None) -> int:
        """An operator's explicit act: ctl.conf (Cello's whole file) rendered with no target, reloaded."""
        before = len((await self.actual()).targets)
        await self.apply([])
        return before

    def lun_number(self, index: int) -> int:
        return index

    def render(self, targets: Sequence[TargetSpec]) -> str:
        """The whole ctl.conf for a desired state (refuses hostile names and limits first)."""
        if (problem := self.refusal(len(targets), sum(len(t.luns) for t in targets))) is not None:
            raise ctlconf.LimitError(problem)
        return ctlconf.render(ctlconf.from_specs(targets, self.portals))

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        # validating and rendering 10,000 targets takes ~1 s: not on the event loop
        data = (await asyncio.to_thread(self.render, list(targets))).encode()
        want = {t.iqn: {lun.volume: lun.index for lun in t.luns} for t in targets}
        paths = {lun.volume: lun.path for t in targets for lun in t.luns}
        async with self._lock:
            if await asyncio.to_thread(_read_or_none, self.conf_path) != data:
                await asyncio.to_thread(_write_atomically, self.conf_path, data)
                self.writes += 1
                await self._run(["service", "ctld", "reload"])
                self.reloads += 1
            return await self._verify(want, paths)

    async def _verify(self, want: Mapping[str, Mapping[str, int]], paths: Mapping[str, str]) -> ExportState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            luns, ports = await self._ctladm()
            have = state_from_ctladm(luns, ports)
            problems = _differences(want, paths, have, luns)
            if not problems:
                return ExportState(have, True, f"ctld: {len(have)} targets verified with ctladm")
            if loop.time() >= deadline:
                raise StorageError(
                    f"ctld did not apply {self.conf_path} within {self._timeout:g}s (a reload with a "
                    f"parse error keeps the old configuration; see ctld's syslog): " + "; ".join(problems[:5])
                )
            await self._sleep(self._interval)

    async def _ctladm(self) -> tuple[list[CtlLun], list[CtlPort]]:
        dev = await self._run(["ctladm", "devlist", "-x"])
        port = await self._run(["ctladm", "portlist", "-x"])
        try:
            luns, ports = parse_devlist(dev.stdout), parse_portlist(port.stdout)
        except CtladmParseError as exc:
            raise StorageError(str(exc)) from None
        self.other_ports = sum(1 for p in ports if not ctld_made(p))
        self.other_luns = sum(1 for lun in luns if lun.ctld_name is None)
        return luns, ports

    async def actual(self) -> ExportState:
        luns, ports = await self._ctladm()
        return ExportState(state_from_ctladm(luns, ports))

    async def sessions(self, iqn: str) -> list[Session]:
        """The initiators logged in to the target now (`ctladm islist -x`, the kernel's own list)."""
        return (await self.all_sessions()).get(iqn, [])

    async def all_sessions(self) -> dict[str, list[Session]]:
        """Every target's sessions from one `ctladm islist -x`."""
        res = await self._run(["ctladm", "islist", "-x"])
        try:
            connections = parse_islist(res.stdout)
        except CtladmParseError as exc:
            raise StorageError(str(exc)) from None
        out: dict[str, list[Session]] = {}
        for target, session in connections:
            out.setdefault(target, []).append(session)
        return out


def parse_islist(text: str) -> list[tuple[str, Session]]:
    """`ctladm islist -x` → (target, session) per connection: cfiscsi's `<ctlislist><connection id="N">`
    with `<initiator>`, `<initiator_addr>` and `<target>` among its fields."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise CtladmParseError(f"ctladm islist -x: not XML: {exc}") from None
    if root.tag != "ctlislist":
        raise CtladmParseError(f"ctladm islist -x: expected <ctlislist>, got <{root.tag}>")
    return [(c.findtext("target", ""), Session(c.findtext("initiator", ""), c.findtext("initiator_addr", "")))
            for c in root.iter("connection")]


def _differences(
    want: Mapping[str, Mapping[str, int]],
    paths: Mapping[str, str],
    have: Mapping[str, Mapping[str, int]],
    luns: Sequence[CtlLun],
) -> list[str]:
    out = []
    for iqn in sorted(set(want) | set(have)):
        if iqn not in have:
            out.append(f"target {iqn} missing")
        elif iqn not in want:
            out.append(f"target {iqn} still present")
        elif dict(want[iqn]) != dict(have[iqn]):
            out.append(f"target {iqn} LUNs {dict(have[iqn])} != {dict(want[iqn])}")
    for lun in luns:
        if lun.ctld_name is None:
            continue
        if lun.ctld_name not in paths:
            out.append(f"LUN {lun.ctld_name} (ctl {lun.ctl_id}) not yet removed")
        elif lun.path is not None and lun.path != paths[lun.ctld_name]:
            out.append(f"LUN {lun.ctld_name} serves {lun.path}, not {paths[lun.ctld_name]}")
    return out
