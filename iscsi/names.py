"""Strict name validation: every name is checked against a whitelist before it reaches a command
line or a config file. Hostile names are refused, never escaped.

Names (compatible with hcc-cello): template `<os>-template`, snapshot `<os>-template@<version>`,
OS clone `<os>-OS-<uuid>`, data `<os>-DATA-<uuid>` then `-2`, `-3`, ….

Cello's own additions: an OS clone's later generations `<os>-OS-<uuid>-g2`, `-g3`, … (an upgrade
clones the new root under the next generation and keeps the old one as the restore point, so nothing
is ever renamed; generation 1 keeps hcc-cello's name), and snapshots of an OS volume
`<os>-OS-<uuid>[-g<n>]@<snap>`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import naming
from iscsi.model import NameError_

MAX_NAME = naming.MAX_IQN  # anything longer is refused (an IQN may not exceed 223 bytes, RFC 3720 §3.2.6.1)
MAX_LUN_INDEX = 1023  # ctl: 1024 LUNs per target
MAX_GENERATION = 9999  # an OS volume's generation: `-g2` … `-g9999`
DEFAULT_BLOCKSIZE = 512  # ctld's blocksize for a disk LUN without one (ctld.h DEFAULT_BLOCKSIZE)

_OS = naming.TEMPLATE.text
_UUID = naming.UUID.text
_VERSION = naming.VERSION.text
_TEMPLATE_RE = re.compile(rf"\A(?P<os>{_OS})-template\Z")
_SNAPSHOT_RE = re.compile(rf"\A(?P<os>{_OS})-template@(?P<version>{_VERSION})\Z")
_OSVOL_RE = re.compile(rf"\A(?P<os>{_OS})-OS-(?P<uuid>{_UUID})(?:-g(?P<g>[2-9]|[1-9][0-9]{{1,3}}))?\Z")
_DATA_RE = re.compile(rf"\A(?P<os>{_OS})-DATA-(?P<uuid>{_UUID})(?:-(?P<n>[2-9]|[1-9][0-9]{{1,3}}))?\Z")
# ZFS dataset components (the pool or a parent dataset the appliance was given).
_POOL_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_.:-]{0,63}(?:/[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}){0,8}\Z")
_CHAP_USER_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
_CHAP_SECRET_RE = re.compile(r"\A[A-Za-z0-9._~+=!@%^*:,/-]{12,16}\Z")
_SERIAL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,15}\Z")  # ctl: CTL_SN_LEN 16
_DEVICE_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")  # ctl: CTL_DEVID_LEN 64
_PATH_RE = re.compile(r"\A(?:/[A-Za-z0-9_.@:+-]+)+\Z")
_GROUP_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,229}\Z")

VolumeKind = Literal["template", "os", "data"]


def _refuse(what: str, value: object, rule: str) -> NameError_:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "…'"
    return NameError_(f"invalid {what} {shown}: {rule}")


def _check(what: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not pattern.match(value):
        raise _refuse(what, value, rule)
    return value


def os_name(value: str) -> str:
    return naming.TEMPLATE.check(value, NameError_, "OS name")


def server_uuid(value: str) -> str:
    return naming.UUID.check(value, NameError_)


def version(value: str) -> str:
    return naming.VERSION.check(value, NameError_)


def pool(value: str) -> str:
    return _check("pool/dataset", value, _POOL_RE, "must be a ZFS dataset name of [A-Za-z0-9_.:-] parts")


def iqn(value: str) -> str:
    return naming.IQN.check(value, NameError_, "target IQN")


def iqn_prefix(value: str) -> str:
    return naming.IQN_PREFIX.check(value, NameError_)


def chap_user(value: str) -> str:
    return _check("CHAP user", value, _CHAP_USER_RE, "must be 1–64 chars of [A-Za-z0-9._:-]")


def chap_secret(value: str) -> str:
    if not isinstance(value, str) or not _CHAP_SECRET_RE.match(value):
        raise NameError_("invalid CHAP secret: must be 12–16 chars of [A-Za-z0-9._~+=!@%^*:,/-]")
    return value


def serial(value: str) -> str:
    return _check("LUN serial", value, _SERIAL_RE, "must be 1–16 chars of [A-Za-z0-9_.-]")


def device_id(value: str) -> str:
    return _check("LUN device-id", value, _DEVICE_ID_RE, "must be 1–64 chars of [A-Za-z0-9_.:-]")


def path(value: str) -> str:
    _check("path", value, _PATH_RE, "must be an absolute path of [A-Za-z0-9_.@:+-] parts")
    if any(part in (".", "..") for part in value.split("/")):
        raise _refuse("path", value, "may not contain . or .. components")
    return value


def group_name(value: str) -> str:
    # "ag-" + an IQN of up to 222 chars: group names get a few more characters than other names
    if not isinstance(value, str) or len(value) > MAX_NAME + 8 or not _GROUP_RE.match(value):
        raise _refuse("group name", value, "must be [A-Za-z0-9][A-Za-z0-9_.:-]*, ≤230 chars")
    return value


def initiator_portal(value: str) -> str:
    """An address or network ("10.77.0.0/24"); returned in canonical form.

    An IPv6 zone (`fe80::1%eth0`) is refused: ctld parses initiator portals with inet_pton, which has
    no zones, and refuses the whole file. An IPv4-mapped address or network (`::ffff:10.77.0.5`) is
    returned in its IPv4 form (`10.77.0.5`): ctld compares address families, an IPv4 initiator always
    arrives as AF_INET, so the mapped form (which ctld shows as `::ffff:a4d:5`) would never match the
    node it names; the IPv4 form is what such an entry can only have meant.
    """
    if not isinstance(value, str) or len(value) > 64:
        raise _refuse("initiator portal", value, "must be an IP address or network")
    if "%" in value:
        raise _refuse("initiator portal", value, "an IPv6 zone (%…) is refused: ctld cannot parse it")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _refuse("initiator portal", value, "must be an IP address or network") from None
    if isinstance(net, ipaddress.IPv6Network) and (v4 := net.network_address.ipv4_mapped) is not None:
        # a mapped network's prefix is at least /96 (its ::ffff bits are part of it)
        net = ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}")
    return str(net) if "/" in value else str(net.network_address)


def portal(value: str) -> tuple[str, int]:
    """A listen portal "addr:port" or "[v6]:port" → (address, port)."""
    if not isinstance(value, str) or len(value) > 64:
        raise _refuse("portal", value, "must be ADDR:PORT or [V6]:PORT")
    if value.startswith("["):
        host, sep, port_s = value[1:].partition("]:")
    else:
        host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise _refuse("portal", value, "must be ADDR:PORT or [V6]:PORT")
    if "%" in host:
        # ctld resolves a zone when it binds: where it does not resolve, the whole file is refused
        raise _refuse("portal", value, "a scoped IPv6 address (%zone) is refused: listen on the address alone")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise _refuse("portal", value, "address must be a literal IP address") from None
    if value.startswith("[") != (addr.version == 6):
        raise _refuse("portal", value, "IPv6 addresses must be bracketed, IPv4 not")
    return str(addr), int(port_s)


def portals(values: Sequence[str]) -> tuple[str, ...]:
    """Listen portals in canonical form; one given twice (after canonicalisation) is refused: ctld's
    second bind of it fails at apply, which at start stops ctld and on a reload is only logged."""
    out: dict[str, str] = {}
    for value in values:
        canonical = format_portal(*portal(value))
        if canonical in out:
            raise _refuse("portal", value,
                          f"given twice (as {out[canonical]!r} too): ctld's second listen on {canonical} fails")
        out[canonical] = value
    return tuple(out)


def lun_size(size: int, what: str, blocksize: int | None = None) -> int:
    """A LUN size in bytes; ctld refuses the whole file for one that is not a multiple of its blocksize."""
    block = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise NameError_(f"invalid size {size!r} for {what}: must be a positive number of bytes")
    if size % block:
        raise NameError_(f"invalid size {size} for {what}: must be a multiple of its {block}-byte blocksize "
                         f"(ctld refuses the whole ctl.conf otherwise)")
    return size


def format_portal(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# -- volume names ---------------------------------------------------------------------------


def template_volume(os: str) -> str:
    return f"{os_name(os)}-template"


def snapshot_name(os: str, ver: str) -> str:
    return f"{template_volume(os)}@{version(ver)}"


def os_volume(os: str, uuid: str, generation: int = 1) -> str:
    """Generation 1 → `<os>-OS-<uuid>` (hcc-cello's name), n ≥ 2 → `<os>-OS-<uuid>-g<n>`."""
    if (not isinstance(generation, int) or isinstance(generation, bool)
            or not 1 <= generation <= MAX_GENERATION):
        raise NameError_(f"invalid OS volume generation {generation!r}: must be 1..{MAX_GENERATION}")
    base = f"{os_name(os)}-OS-{server_uuid(uuid)}"
    return base if generation == 1 else f"{base}-g{generation}"


def snapshot_label(value: str) -> str:
    """The `<snap>` of an OS volume's snapshot `<volume>@<snap>`."""
    return naming.SNAPSHOT.check(value, NameError_)


def os_volume_name(value: str) -> str:
    """An OS volume's name, of any generation; a template or data volume is refused."""
    vol = parse_volume(value)
    if vol.kind != "os":
        raise NameError_(f"invalid volume {vol.name!r} for a snapshot: only OS volumes (<os>-OS-<uuid>[-g<n>]) "
                         "have snapshots of their own")
    return vol.name


def volume_snapshot(volume_name: str, snap: str) -> str:
    """`<volume>@<snap>` for an OS volume (template snapshots are `snapshot_name`'s)."""
    return f"{os_volume_name(volume_name)}@{snapshot_label(snap)}"


def parse_volume_snapshot(name: str) -> tuple[str, str]:
    """"tiny-OS-<uuid>-g2@before" → ("tiny-OS-<uuid>-g2", "before"); an OS volume's snapshot only."""
    if isinstance(name, str) and len(name) <= MAX_NAME and name.count("@") == 1:
        volume_name, _, snap = name.partition("@")
        try:
            return volume_name, volume_snapshot(volume_name, snap).partition("@")[2]
        except NameError_:
            pass
    raise _refuse("volume snapshot name", name, "must be <os>-OS-<uuid>[-g<n>]@<snap>")


def data_volume(os: str, uuid: str, index: int) -> str:
    """Index 1 → no suffix, index n ≥ 2 → `-n`."""
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= MAX_LUN_INDEX:
        raise NameError_(f"invalid data volume index {index!r}: must be 1..{MAX_LUN_INDEX}")
    base = f"{os_name(os)}-DATA-{server_uuid(uuid)}"
    return base if index == 1 else f"{base}-{index}"


@dataclass(frozen=True)
class VolumeName:
    name: str
    kind: VolumeKind
    os: str
    uuid: str | None = None
    index: int = 0  # 0 for a template, the generation (1..) for an OS volume, 1.. for data volumes


def parse_volume(name: str) -> VolumeName:
    """Validate a volume name (no pool, no snapshot) and say what it is."""
    if isinstance(name, str) and len(name) <= MAX_NAME:
        if m := _TEMPLATE_RE.match(name):
            return VolumeName(name, "template", m["os"])
        if m := _OSVOL_RE.match(name):
            return VolumeName(name, "os", m["os"], m["uuid"], int(m["g"] or 1))
        if m := _DATA_RE.match(name):
            return VolumeName(name, "data", m["os"], m["uuid"], int(m["n"] or 1))
    raise _refuse("volume name", name, "must be <os>-template, <os>-OS-<uuid>[-g<n>] or <os>-DATA-<uuid>[-n]")


def parse_snapshot(name: str) -> tuple[str, str]:
    """"tiny-template@v1" → ("tiny", "v1")."""
    if isinstance(name, str) and len(name) <= MAX_NAME and (m := _SNAPSHOT_RE.match(name)):
        return m["os"], m["version"]
    raise _refuse("snapshot name", name, "must be <os>-template@v<N>")


def volume(name: str) -> str:
    return parse_volume(name).name


def target_iqn(prefix: str, uuid: str) -> str:
    """`<iqn_prefix>:<server-uuid>`."""
    return iqn(f"{iqn_prefix(prefix)}:{server_uuid(uuid)}")


def lun_serial(volume_name: str) -> str:
    """A stable 16-char SCSI serial derived from the volume name (ctl's CTL_SN_LEN is 16)."""
    return "C" + hashlib.sha256(volume(volume_name).encode()).hexdigest()[:15].upper()


def lun_device_id(volume_name: str) -> str:
    """A stable device-id (≤64 chars; tgt keeps 36) derived from the volume name."""
    return "cello-" + hashlib.sha256(volume(volume_name).encode()).hexdigest()[:30]
