"""`cello doctor`: what this host has and lacks for each service, with the fix for each missing piece."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config, split_host_port, tls_listen
from bootfiles.tree import OS_LOADER_ROOTS


@dataclass(frozen=True)
class Check:
    service: str
    item: str
    ok: bool
    needed: bool
    fix: str = ""


def _can_bind(kind: int, host: str, port: int) -> str | None:
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def _port_check(service: str, kind: int, host: str, port: int, needed: bool) -> Check:
    problem = _can_bind(kind, host, port)
    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    fix = ""
    if problem is not None:
        fix = (f"{problem}: run as root or grant CAP_NET_BIND_SERVICE" if port < 1024 and os.geteuid() != 0
               else f"{problem}: stop the program using {proto}/{port} or change the port in the config")
    return Check(service, f"{proto} {host}:{port}", problem is None, needed, fix)


def _tool(service: str, name: str, package: str, needed: bool) -> Check:
    return Check(service, name, shutil.which(name) is not None, needed, f"install {package}")


def _loader(name: str, roots: list[Path], package: str, needed: bool) -> Check:
    found = any((r / name).is_file() for r in roots)
    return Check("tftp", name, found, needed, f"install {package} (or add its folder to tftp.roots)")


def _native_pump(engine: str) -> Check:
    """The C TFTP pump: needed when the config asks for it; "auto" serves from Python without it."""
    from bootfiles import tftp_native

    why = tftp_native.unavailable_reason() if engine != "python" else None
    fix = f"{why}; or set tftp.engine = \"python\"" if why else ""
    return Check("tftp", "native pump", engine != "python" and why is None, engine == "native", fix)


def _tls(config: Config) -> list[Check]:
    """The HTTPS listener's port and the certificate it would serve (the self-signed one is made at the
    first start: none yet is fine)."""
    from web.tls import certificate_problem

    api = config.api
    host, port = split_host_port(tls_listen(api))
    cert = Path(api.tls_cert) if api.tls_cert else config.appliance.state_dir / "tls" / "cert.pem"
    key = Path(api.tls_key) if api.tls_cert else config.appliance.state_dir / "tls" / "key.pem"
    if api.tls_cert and not api.tls_key:
        problem: str | None = "api.tls_cert is given without api.tls_key"
    elif not api.tls_cert and not cert.exists():
        problem = None  # made self-signed by the first start
    else:
        problem = certificate_problem(cert, key)
    return [_port_check("api", socket.SOCK_STREAM, host, port, True),
            Check("api", "TLS certificate", problem is None, True, problem or "")]


def _store(config: Config) -> Check:
    """A PostgreSQL store: does it answer now (read only: a diagnosis migrates nothing), and if not, will
    `cello serve` start all the same, on its cached boot index?"""
    from domain.bootcache import FILE_NAME
    from domain.errors import StoreError
    from domain.pgengine import PgEngine

    problem = None
    engine = None
    try:
        engine = PgEngine(config.store.url)
        engine.version  # noqa: B018  (connects and reads the schema's version)
    except StoreError as e:
        problem = str(e)
    finally:
        if engine is not None:
            engine.close()
    cache = config.appliance.state_dir / FILE_NAME
    fix = f"{problem}: start the database or fix store.url; " + (
        f"until then `cello serve` answers the nodes from {cache}" if cache.exists() else
        f"and no boot index is cached at {cache}, so `cello serve` cannot start until it answers")
    return Check("store", "PostgreSQL answers", problem is None, True, fix)


def checks(config: Config) -> list[Check]:
    out: list[Check] = []
    freebsd = sys.platform.startswith("freebsd")
    default = (config.boot.profiles or {}).get(config.boot.default_profile)
    if config.dhcp.enabled:
        out.append(_port_check("dhcp", socket.SOCK_DGRAM, config.dhcp.listen or "0.0.0.0", config.dhcp.port, True))
        out.append(_port_check("dhcp", socket.SOCK_DGRAM, config.dhcp.listen or "0.0.0.0", config.dhcp.pxe_port,
                               True))
    if config.tftp.enabled:
        host, port = split_host_port(config.tftp.listen)
        out.append(_port_check("tftp", socket.SOCK_DGRAM, host, port, True))
        roots = [Path(r) for r in config.tftp.roots] or list(OS_LOADER_ROOTS)
        syslinux = "syslinux" if freebsd else "pxelinux and syslinux-common"
        # Needed: the default profile's BIOS loader (pxelinux.0 loads ldlinux.c32 next), and on an iPXE
        # default its EFI loader too; the others only serve profiles a site may not use.
        wanted = set() if default is None else \
            {default.bios_loader, *((default.efi_loader,) if default.loader == "ipxe" else ())}
        out.append(_loader("pxelinux.0", roots, syslinux, "pxelinux.0" in wanted))
        out.append(_loader("ldlinux.c32", roots, syslinux, "pxelinux.0" in wanted))
        out.append(_loader("undionly.kpxe", roots, "ipxe", "undionly.kpxe" in wanted))
        out.append(_loader("ipxe.efi", roots, "ipxe", "ipxe.efi" in wanted))
        out.append(_native_pump(config.tftp.engine))
    host, port = split_host_port(config.api.listen)
    out.append(_port_check("api", socket.SOCK_STREAM, host, port, True))
    # iPXE fetches its script, kernel and initrd from the API listener: a loopback one serves no node.
    reachable = host not in ("127.0.0.1", "localhost", "::1")
    over_http = default is not None and default.loader == "ipxe"
    out.append(Check("http-boot", f"nodes reach {host}:{port}", reachable, over_http,
                     f'set api.listen to an address the nodes reach ("0.0.0.0:{port}"): the default profile '
                     f"{config.boot.default_profile} fetches kernel and initrd over HTTP"))
    if tls_listen(config.api):
        out.extend(_tls(config))
    zfs = config.storage.backend == "zfs"
    out.append(_tool("storage", "zfs", "zfsutils-linux (or zfs-fuse)" if not freebsd else "ZFS (base system)", zfs))
    out.append(_tool("storage", "zpool", "zfsutils-linux (or zfs-fuse)" if not freebsd else "ZFS (base system)", zfs))
    driver = config.iscsi.driver
    want_ctld = driver == "ctld" or (driver == "auto" and freebsd)
    want_tgt = driver == "tgt" or (driver == "auto" and not freebsd)
    out.append(_tool("export", "ctld", "ctld (FreeBSD base system)", want_ctld))
    out.append(_tool("export", "ctladm", "ctladm (FreeBSD base system)", want_ctld))
    out.append(_tool("export", "tgtd", "tgt (apt-get install tgt)", want_tgt))
    out.append(_tool("export", "tgtadm", "tgt (apt-get install tgt)", want_tgt))
    out.append(_tool("templates", "mkfs.ext4", "e2fsprogs", True))
    out.append(_tool("templates", "busybox", "busybox-static", False))
    out.append(_tool("templates", "iscsistart", "open-iscsi", False))
    if config.store.url:
        out.append(_store(config))
    return out


def report(results: list[Check]) -> tuple[str, int]:
    lines = [f"{'service':<10} {'item':<28} {'status':<8} fix"]
    missing_needed = 0
    for c in results:
        status = "ok" if c.ok else ("MISSING" if c.needed else "absent")
        if not c.ok and c.needed:
            missing_needed += 1
        lines.append(f"{c.service:<10} {c.item:<28} {status:<8} {'' if c.ok else c.fix}")
    lines.append("all needed pieces are there" if not missing_needed
                 else f"{missing_needed} needed piece(s) missing")
    return "\n".join(lines), 0 if not missing_needed else 1
