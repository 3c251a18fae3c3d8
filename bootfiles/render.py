"""Boot config rendering (pure): a BootSpec in, the text of a pxelinux / iPXE / GRUB config out.

Strict, as pixiecore's expandCmdline: every value is checked before it reaches a config; a missing
value, a newline, a stray space or a character that a loader's parser gives meaning to is refused with
`RenderError`, never escaped.

The kernel command line always carries both initramfs conventions and Cello's own keys, in this order:

    <profile.kernel_args> ISCSI_INITIATOR=… ISCSI_TARGET_NAME=… ISCSI_TARGET_IP=… ISCSI_TARGET_PORT=…
    ISCSI_TARGET_GROUP=1 [ISCSI_USERNAME=… ISCSI_PASSWORD=…]
    netroot=iscsi:[user:pass@]<ip>::<port>:<lun>:<iqn> rd.iscsi.initiator=… cello.server=… cello.lun=…

A diskless spec (root None: an unknown node on the unknown-node profile) carries only
`<profile.kernel_args> cello.server=<uuid>` and no SAN hook.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib

import naming
from bootfiles.profiles import BUILTIN_PROFILES  # re-exported: the built-in profiles live there
from bootfiles.spec import BootSpec, IscsiRoot

__all__ = ["BUILTIN_PROFILES", "RenderError", "kernel_cmdline", "render_grub", "render_ipxe", "render_pxelinux"]


class RenderError(ValueError):
    """A boot spec that cannot be rendered safely; says which field and why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# One token of a kernel command line: printable ASCII without space and without the characters that
# pxelinux, GRUB's script parser or iPXE's expansion treat specially.
_TOKEN = re.compile(r"[!%&()*+,\-./0-9:<=>?@A-Z\[\]^_a-z~]+")
_CHAP = re.compile(r"[A-Za-z0-9._\-+=]{1,255}")  # no ':' or '@': they delimit dracut's netroot
_PATH = re.compile(r"[A-Za-z0-9._\-+][A-Za-z0-9._\-+/]*")
_HTTP_BASE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._\-/]*)?")
MAX_LUN = 16383
IPXE_INITRD_NAME = "initrd.img"  # SAM flat addressing; ctld allows 1024 per target


def _require(field: str, value: object) -> None:
    if value is None or value == "":
        raise RenderError(field, "missing")


def _check_token(field: str, value: str) -> str:
    _require(field, value)
    if any(c in value for c in "\r\n\t\0"):
        raise RenderError(field, "contains a line break or control character")
    if " " in value:
        raise RenderError(field, "contains a space")
    if not _TOKEN.fullmatch(value):
        raise RenderError(field, f"contains a character not allowed in a boot config: {value!r}")
    return value


def _check_kernel_args(value: str) -> str:
    if value == "":
        return value
    if any(c in value for c in "\r\n\t\0"):
        raise RenderError("profile.kernel_args", "contains a line break or control character")
    if value != value.strip() or "  " in value:
        raise RenderError("profile.kernel_args", "has a stray space")
    for token in value.split(" "):
        _check_token("profile.kernel_args", token)
    return value


def _check_iqn(field: str, value: str) -> str:
    _check_token(field, value)
    if not naming.IQN.ok(value):
        raise RenderError(field, f"not an iSCSI name ({naming.IQN.explain}): {value!r}")
    return value


def _check_ip(field: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    _check_token(field, value)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise RenderError(field, f"not an IP address: {value!r}") from None


def _check_path(field: str, value: str) -> str:
    _check_token(field, value)
    if not _PATH.fullmatch(value) or any(part in ("", ".", "..") for part in value.split("/")):
        raise RenderError(field, f"not a relative path inside the boot tree: {value!r}")
    return value


def _check_uuid(value: str) -> str:
    _require("server_uuid", value)
    try:
        canonical = str(uuidlib.UUID(value))
    except ValueError:
        raise RenderError("server_uuid", f"not a UUID: {value!r}") from None
    if canonical != value.lower():
        raise RenderError("server_uuid", f"not in canonical 8-4-4-4-12 form: {value!r}")
    return canonical


class _Checked:
    """The validated fields of a BootSpec, computed once per render."""

    def __init__(self, spec: BootSpec) -> None:
        self.uuid = _check_uuid(spec.server_uuid)
        self.kernel_args = _check_kernel_args(spec.profile.kernel_args)
        self.kernel = _check_path("kernel", spec.kernel)
        self.initrd = _check_path("initrd", spec.initrd)
        self.diskless = spec.root is None
        # A diskless spec renders with a placeholder root that nothing below reads.
        root: IscsiRoot = spec.root or IscsiRoot("iqn.2026-01.invalid:none", "127.0.0.1", 1, 0,
                                                 "iqn.2026-01.invalid:none")
        self.initiator = _check_iqn("root.initiator_iqn", root.initiator_iqn)
        self.iqn = _check_iqn("root.target_iqn", root.target_iqn)
        self.ip = _check_ip("root.portal_ip", root.portal_ip)
        if not isinstance(root.portal_port, int) or not 1 <= root.portal_port <= 65535:
            raise RenderError("root.portal_port", f"not a port: {root.portal_port!r}")
        self.port = root.portal_port
        if not isinstance(root.lun, int) or not 0 <= root.lun <= MAX_LUN:
            raise RenderError("root.lun", f"not a LUN number: {root.lun!r}")
        self.lun = root.lun
        self.chap = _chap_pair("root.chap", root.chap_user, root.chap_secret)
        self.mutual = _chap_pair("root.chap_mutual", root.chap_mutual_user, root.chap_mutual_secret)
        if self.mutual is not None and self.chap is None:
            raise RenderError("root.chap_mutual_user", "mutual CHAP needs CHAP too")
        # dracut and iPXE want an IPv6 portal in brackets; open-iscsi's ISCSI_TARGET_IP wants it bare.
        self.ip_bare = str(self.ip)
        self.ip_uri = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)


def _chap_pair(field: str, user: str | None, secret: str | None) -> tuple[str, str] | None:
    """A CHAP user and secret, both or neither, each fit for a command line and dracut's netroot."""
    if user is None and secret is None:
        return None
    if user is None or secret is None:
        raise RenderError(f"{field}_user", "CHAP needs both a user and a secret")
    for name, value in ((f"{field}_user", user), (f"{field}_secret", secret)):
        _check_token(name, value)
        if not _CHAP.fullmatch(value):
            raise RenderError(name, "CHAP values allow only letters, digits and ._-+=")
    return user, secret


def kernel_cmdline(spec: BootSpec) -> str:
    """The full kernel command line of a server (see the module docstring for the order)."""
    return _cmdline(_Checked(spec))


def _cmdline(c: _Checked) -> str:
    parts: list[str] = [c.kernel_args] if c.kernel_args else []
    if c.diskless:
        return " ".join([*parts, f"cello.server={c.uuid}"])
    parts += [
        f"ISCSI_INITIATOR={c.initiator}",
        f"ISCSI_TARGET_NAME={c.iqn}",
        f"ISCSI_TARGET_IP={c.ip_bare}",
        f"ISCSI_TARGET_PORT={c.port}",
        "ISCSI_TARGET_GROUP=1",
    ]
    auth = ""
    if c.chap is not None:
        parts += [f"ISCSI_USERNAME={c.chap[0]}", f"ISCSI_PASSWORD={c.chap[1]}"]
        auth = f"{c.chap[0]}:{c.chap[1]}@"
    if c.mutual is not None:
        # open-iscsi's initramfs (and Cello's) read ISCSI_IN_*; dracut reads rd.iscsi.in.*
        parts += [f"ISCSI_IN_USERNAME={c.mutual[0]}", f"ISCSI_IN_PASSWORD={c.mutual[1]}",
                  f"rd.iscsi.in.username={c.mutual[0]}", f"rd.iscsi.in.password={c.mutual[1]}"]
    parts += [
        f"netroot=iscsi:{auth}{c.ip_uri}::{c.port}:{c.lun}:{c.iqn}",
        f"rd.iscsi.initiator={c.initiator}",
        f"cello.server={c.uuid}",
        f"cello.lun={c.lun}",
    ]
    return " ".join(parts)


def render_pxelinux(spec: BootSpec) -> str:
    """pxelinux.cfg file; kernel and initrd paths are relative to the TFTP root."""
    c = _Checked(spec)
    return (
        "DEFAULT cello\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL cello\n"
        f"  KERNEL /{c.kernel}\n"
        f"  INITRD /{c.initrd}\n"
        f"  APPEND {_cmdline(c)}\n"
    )


def _check_http_base(value: str) -> str:
    _check_token("http_base", value)
    if not _HTTP_BASE.fullmatch(value):
        raise RenderError("http_base", f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def render_ipxe(spec: BootSpec) -> str:
    """iPXE script: SAN-hook the root LUN (so the kernel finds it in the iBFT) and boot the kernel over HTTP.

    Also served over HTTP by `web` at /boot/<uuid>.ipxe."""
    c = _Checked(spec)
    base = _check_http_base(spec.http_base)
    lines = ["#!ipxe"]
    if not c.diskless:
        lines.append(f"set initiator-iqn {c.initiator}")
        if c.chap is not None:
            lines += [f"set username {c.chap[0]}", f"set password {c.chap[1]}"]
        if c.mutual is not None:
            lines += [f"set reverse-username {c.mutual[0]}", f"set reverse-password {c.mutual[1]}"]
        lines += _retried("sanhook", f"sanhook --drive 0x80 iscsi:{c.ip_uri}::{c.port}:{c.lun:x}:{c.iqn}")
    # The initrd is named, and named on the command line, because a kernel started through its EFI
    # stub (UEFI iPXE) finds its initrd only that way; under BIOS the extra word is ignored.
    # The address iPXE got from the site DHCP goes to the initramfs (`ip=client:server:gateway:netmask`,
    # expanded by iPXE): a node of a boot storm asks the site DHCP once, not twice.
    lines += _retried("kernel", f"kernel {base}/boot/files/{c.kernel} {_cmdline(c)} {IPXE_IP_ARG} "
                                f"initrd={IPXE_INITRD_NAME}")
    lines += _retried("initrd", f"initrd --name {IPXE_INITRD_NAME} {base}/boot/files/{c.initrd}")
    lines += ["boot", ":cello_failed", "echo cello: giving up, back to the next boot device", "exit 1"]
    return "\n".join(lines) + "\n"


IPXE_IP_ARG = "ip=${ip}:${next-server}:${gateway}:${netmask}"
IPXE_TRIES = 8  # per step; waits 1, 2, … 7 s between tries (28 s in all) — a target restarting, a storm


def _retried(step: str, command: str) -> list[str]:
    """One step of an iPXE script, tried again with a growing wait (iPXE has `inc` but no arithmetic:
    the wait is the try's number), then `cello_failed`. Stock iPXE gives up on the first error."""
    return [
        "set tries 0",
        f":cello_{step}",
        f"{command} && goto cello_{step}_ok ||",
        "inc tries",
        f"iseq ${{tries}} {IPXE_TRIES} && goto cello_failed ||",
        f"echo cello: {step} failed, try ${{tries}} of {IPXE_TRIES}, again in ${{tries}} s",
        "sleep ${tries}",
        f"goto cello_{step}",
        f":cello_{step}_ok",
    ]


def render_grub(spec: BootSpec) -> str:
    """GRUB config for UEFI network boot; paths are on GRUB's (tftp) root device."""
    c = _Checked(spec)
    return (
        "set default=0\n"
        "set timeout=0\n"
        f'menuentry "cello {c.uuid}" {{\n'
        f"  linux /{c.kernel} {_cmdline(c)}\n"
        f"  initrd /{c.initrd}\n"
        "}\n"
    )
