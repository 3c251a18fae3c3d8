"""Configuration: one TOML file → frozen dataclasses with documented defaults.

Every key is optional. Unknown keys and bad values are refused with one line that names the key
(`tftp.blksize_max: must be 8..65464`); `cello serve` turns a ConfigError into exit status 2.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import naming
from bootfiles.spec import Profile
from domain.discovered import AdoptRule
from domain.store import POSTGRES_SCHEMES


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


Check = Callable[[Any], str | None]  # returns a complaint, or None when the value is fine

T = TypeVar("T")


def _opt(default: Any, doc: str, check: Check | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _range(lo: int, hi: int) -> Check:
    return lambda v: None if lo <= v <= hi else f"must be {lo}..{hi}"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)


def _host_port(value: str) -> str | None:
    try:
        split_host_port(value)
    except ValueError as e:
        return str(e)
    return None


def _portals(values: tuple[str, ...]) -> str | None:
    if not values:
        return "needs at least one portal"
    for v in values:
        if (problem := _host_port(v)) is not None:
            return f"{v!r}: {problem}"
    return None


def _ipv4_or_empty(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return "must be an IPv4 address or empty"
    return None


def _iqn_prefix(value: str) -> str | None:
    return None if naming.IQN_PREFIX.ok(value) else naming.IQN_PREFIX.explain


TLS_PORT = 8443  # api.tls_listen = "auto": the HTTPS listener's port


def tls_listen(api: ApiConfig) -> str:
    """The HTTPS listener's address ('' = none). "auto": beside `api.listen` unless that is loopback,
    where no token crosses a network and nothing needs TLS."""
    if api.tls_listen != "auto":
        return api.tls_listen
    host, _ = split_host_port(api.listen)
    if host == "localhost" or ipaddress.ip_address(host).is_loopback:
        return ""
    return f"{api.listen.rpartition(':')[0]}:{TLS_PORT}"


def split_host_port(value: str) -> tuple[str, int]:
    """'0.0.0.0:69' → ('0.0.0.0', 69). Raises ValueError with a readable reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("port must be 0..65535")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ApplianceConfig:
    state_dir: Path = _opt(Path("./var/cello"), "SQLite store, volumes (file backend) and boot files")
    advertise: str = _opt("", "address nodes use for TFTP/HTTP/iSCSI; '' = first non-loopback IPv4",
                          _ipv4_or_empty)


def _store_url(value: str) -> str | None:
    if value == "" or (value.split("://", 1)[0] in POSTGRES_SCHEMES and "://" in value):
        return None
    return "must be '' (the SQLite file <state_dir>/cello.db) or a postgresql://… URL"


@dataclass(frozen=True)
class StoreConfig:
    url: str = _opt("", "'' = the SQLite file <state_dir>/cello.db; postgresql://USER@HOST/DB (libpq's URL, "
                        "?host=/socket/dir for a unix socket) = a PostgreSQL the appliances of a fleet share",
                    _store_url)


@dataclass(frozen=True)
class ApiConfig:
    # every interface: the default profile's nodes fetch their script, kernel and initrd here
    listen: str = _opt("0.0.0.0:8080", "API, HTTP boot, /metrics (nodes must reach it)", _host_port)
    admin_token: str = _opt("", "'' = generate one on first start and print it once",
                            lambda v: None if v == "" or len(v) >= 16 else "must be empty or >= 16 chars")
    tls_listen: str = _opt("auto", "HTTPS listener: the API, dashboard and fleet channel over TLS; 'auto' = port "
                                   f"{TLS_PORT} on listen's address unless that is loopback, '' = none. With one, "
                                   "`listen` keeps boot files, /metrics and health, and answers API calls from "
                                   "this host only", lambda v: None if v in ("", "auto") else _host_port(v))
    tls_cert: str = _opt("", "PEM certificate (with its chain) for tls_listen; '' = a self-signed one made on "
                             "the first start in <state_dir>/tls")
    tls_key: str = _opt("", "the certificate's private key (PEM); given with tls_cert")


@dataclass(frozen=True)
class TftpConfig:
    enabled: bool = _opt(True, "run the TFTP server")
    listen: str = _opt("0.0.0.0:69", "TFTP listen address", _host_port)
    roots: tuple[str, ...] = _opt((), "static loader folders; () = the OS's usual pxelinux/syslinux/ipxe folders")
    blksize_max: int = _opt(1468, "largest blksize granted (RFC 2348)", _range(8, 65464))
    windowsize_max: int = _opt(64, "largest windowsize granted (RFC 7440)", _range(1, 64))
    max_transfers: int = _opt(512, "concurrent transfers; further requests get an error", _range(1, 65536))
    engine: str = _opt("auto", "who runs the transfers: 'native' (the C pump make setup builds, a thread of its own), "
                               "'python' (the event loop), 'auto' (native where built)",
                       _one_of("auto", "native", "python"))


@dataclass(frozen=True)
class DhcpConfig:
    enabled: bool = _opt(True, "run the proxyDHCP responder")
    listen: str = _opt("0.0.0.0", "address to bind", _ipv4_or_empty)
    port: int = _opt(67, "DHCP port", _range(1, 65535))
    pxe_port: int = _opt(4011, "PXE boot server discovery port", _range(1, 65535))
    interface: str = _opt("", "interface to answer on; '' = all",
                          lambda v: None if re.fullmatch(r"[A-Za-z0-9_.:-]{0,15}", v) else "not an interface name")
    unknown: str = _opt("ignore", "unknown nodes: 'ignore' (no answer) or the name of a boot profile")
    unknown_template: str = _opt("", "what unknown nodes on a profile boot, diskless: that template's newest "
                                     "kernel and initrd; '' = the most recently built template")
    adopt: AdoptRule | None = _opt(None, "[dhcp.adopt] mac_prefix, arch, template, user, profile: adopt discovered "
                                         "nodes that match automatically; none = adopt only by hand")
    responder: str = _opt("process", "where DHCP is answered: 'process' (a child process of its own, no GIL shared "
                                     "with TFTP/HTTP/API), 'thread' (threads of the appliance's process), 'loop' "
                                     "(its main loop)", _one_of("process", "thread", "loop"))


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool = _opt(False, "answer A/PTR queries for provisioned servers")
    listen: str = _opt("127.0.0.1:5353", "DNS listen address", _host_port)
    zone: str = _opt("cello.internal", "zone the server names live in",
                     lambda v: None if re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)*", v) else "not a DNS zone")


@dataclass(frozen=True)
class StorageConfig:
    backend: str = _opt("file", "file | zfs", _one_of("file", "zfs"))
    path: str = _opt("", "file backend folder; '' = <state_dir>/volumes")
    pool: str = _opt("", "zfs backend: pool or parent dataset")
    kind: str = _opt("zvol", "zfs backend: zvol | file", _one_of("zvol", "file"))


@dataclass(frozen=True)
class IscsiConfig:
    driver: str = _opt("auto", "auto | ctld | tgt | none", _one_of("auto", "ctld", "tgt", "none"))
    iqn_prefix: str = _opt("iqn.2026-11.io.cello", "targets are <iqn_prefix>:<server-uuid>", _iqn_prefix)
    portals: tuple[str, ...] = _opt(("0.0.0.0:3260",), "iSCSI portals", _portals)
    tgt_control_port: int = _opt(7, "tgt: control port of the appliance's own tgtd", _range(0, 1023))
    tgt_manage_daemon: bool = _opt(True, "tgt: run our own supervised tgtd (false = use the system tgtd)")
    ctld_conf: str = _opt("/etc/ctl.conf", "ctld: the file the appliance renders")
    chap: str = _opt("on", "per-server CHAP for new servers: on | mutual (the target proves itself too) | off",
                     _one_of("on", "mutual", "off"))


@dataclass(frozen=True)
class BootConfig:
    default_profile: str = _opt("compute", "profile of servers created without one")
    profiles: Mapping[str, Profile] = _opt(None, "extra profiles: [boot.profiles.NAME] loader, kernel_args, ...")


def _fleet_name(value: str) -> str | None:
    return None if value == "" or naming.APPLIANCE.ok(value) else naming.APPLIANCE.explain


def _http_url_or_empty(value: str) -> str | None:
    return None if value == "" or re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?/?", value) else \
        "must be empty or http(s)://HOST[:PORT]"


@dataclass(frozen=True)
class FleetConfig:
    name: str = _opt("", "this appliance's name in the fleet; '' = the host's name", _fleet_name)
    api_url: str = _opt("", "where the other appliances reach this one's API; '' = https://<advertise>:<tls port> "
                            "with api.tls_listen, else http://<advertise>:<api port>", _http_url_or_empty)
    labels: Mapping[str, str] = _opt(None, "[fleet.labels] placement labels of this appliance (rack = \"3\")")
    capacity_gb: int = _opt(0, "placement capacity; 0 = the backend's pool size", _range(0, 1 << 30))
    secret: str = _opt("", "shared by every appliance of a fleet: the channel templates and moved servers travel "
                       "over; '' = neither", lambda v: None if v == "" or len(v) >= 16 else
                       "must be empty or >= 16 chars")
    heartbeat_s: float = _opt(5.0, "seconds between heartbeats", lambda v: None if 0.1 <= v <= 3600 else
                              "must be 0.1..3600")
    down_after_s: float = _opt(30.0, "an appliance without a heartbeat for this long is down (no placement there)",
                               lambda v: None if 0.5 <= v <= 86400 else "must be 0.5..86400")
    os_reserve_gb: int = _opt(10, "what placement counts per OS clone (thin: it holds only what its node writes; "
                              "data volumes count in full)", _range(0, 1 << 20))
    poll_s: float = _opt(1.0, "seconds between looks at the shared store for this appliance's work",
                         lambda v: None if 0.05 <= v <= 600 else "must be 0.05..600")


@dataclass(frozen=True)
class Config:
    appliance: ApplianceConfig = field(default_factory=ApplianceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    iscsi: IscsiConfig = field(default_factory=IscsiConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check one TOML value against the field's type; tuples come from TOML arrays of strings."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string")
        if "\n" in value or "\x00" in value:
            raise ConfigError(f"{key}: must be one line")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        return Path(value)
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be an array of strings")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported setting")  # pragma: no cover - a new field type needs a branch


PROFILE_KEYS = {f.name for f in fields(Profile)} - {"name"}


def _profiles(raw: Any) -> dict[str, Profile]:
    from bootfiles.profiles import BUILTIN_PROFILES, DEFAULT_BIOS_LOADER  # the built-ins may be overridden by name

    out = dict(BUILTIN_PROFILES)
    if not isinstance(raw, dict):
        raise ConfigError("boot.profiles: must be a table of tables")
    for name, table in raw.items():
        where = f"boot.profiles.{name}"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise ConfigError(f"{where}: profile names are [a-z0-9_-], up to 32 chars")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in table:
            if key not in PROFILE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(PROFILE_KEYS))})")
        values = {k: _coerce(f"{where}.{k}", str, v) for k, v in table.items()}
        if values.get("loader", "pxelinux") not in ("pxelinux", "ipxe"):
            raise ConfigError(f"{where}.loader: must be 'pxelinux' or 'ipxe'")
        for k in ("bios_loader", "efi_loader"):
            if k in values and not re.fullmatch(r"[A-Za-z0-9_.+/-]{1,128}", values[k]):
                raise ConfigError(f"{where}.{k}: must be a plain file name")
        if "loader" in values and "bios_loader" not in values:
            # A profile that names only its loader gets that loader's BIOS file, not the one of the profile
            # it overrides (`compute` is iPXE now: loader = "pxelinux" alone must not chain undionly.kpxe).
            values["bios_loader"] = DEFAULT_BIOS_LOADER[values["loader"]]
        base = out.get(name, Profile(name=name))
        out[name] = replace(base, **values)
    return out


ADOPT_KEYS = ("mac_prefix", "arch", "template", "user", "profile")


def _adopt_rule(raw: Any) -> AdoptRule:
    where = "dhcp.adopt"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    for key in raw:
        if key not in ADOPT_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(ADOPT_KEYS)})")
    for key in ("template", "user"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: required (the template and the user adopted nodes get)")
    values = {k: _coerce(f"{where}.{k}", int if k == "arch" else str, v) for k, v in raw.items()}
    prefix = naming.normalize_mac(values.get("mac_prefix", ""))
    if prefix and not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){0,5}", prefix):
        raise ConfigError(f"{where}.mac_prefix: must be 1 to 6 hex pairs like 52:54:00")
    if "arch" in values and not 0 <= values["arch"] <= 65535:
        raise ConfigError(f"{where}.arch: must be 0..65535 (RFC 4578 option 93: 0 BIOS, 7 x64 UEFI, ...)")
    if not prefix and "arch" not in values:
        raise ConfigError(f"{where}: needs mac_prefix or arch (a rule that adopts every stranger is refused)")
    if not naming.TEMPLATE.ok(values["template"]):
        raise ConfigError(f"{where}.template: {naming.TEMPLATE.explain}")
    if not naming.USER.ok(values["user"]):
        raise ConfigError(f"{where}.user: {naming.USER.explain}")
    return AdoptRule(template=values["template"], user=values["user"], mac_prefix=prefix,
                     arch=values.get("arch"), profile=values.get("profile", ""))


def _labels(where: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table of label = \"value\"")
    for key, value in raw.items():
        if not naming.LABEL.ok(key) or not isinstance(value, str) or not naming.LABEL.ok(value):
            raise ConfigError(f"{where}.{key}: {naming.LABEL.explain}")
    return dict(raw)


def _section(name: str, cls: type[T], raw: Any) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        if name == "boot" and key == "profiles":
            values[key] = _profiles(value)
            continue
        if name == "dhcp" and key == "adopt":
            values[key] = _adopt_rule(value)
            continue
        if name == "fleet" and key == "labels":
            values[key] = _labels(where, value)
            continue
        coerced = _coerce(where, hints[key], value)
        check = known[key].metadata.get("check")
        if check is not None and (problem := check(coerced)) is not None:
            raise ConfigError(f"{where}: {problem}")
        values[key] = coerced
    return cls(**values)


def parse_config(raw: Mapping[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(SECTIONS)})")
        sections[name] = _section(name, SECTIONS[name], table)
    config = Config(**sections)
    if config.boot.profiles is None:
        config = replace(config, boot=replace(config.boot, profiles=_profiles({})))
    return _cross_check(config)


def _cross_check(config: Config) -> Config:
    profiles = config.boot.profiles
    if config.boot.default_profile not in profiles:
        raise ConfigError(f"boot.default_profile: no profile named {config.boot.default_profile!r}")
    if config.dhcp.unknown != "ignore" and config.dhcp.unknown not in profiles:
        raise ConfigError(f"dhcp.unknown: must be 'ignore' or a profile name ({', '.join(sorted(profiles))})")
    adopt = config.dhcp.adopt
    if adopt is not None and adopt.profile and adopt.profile not in profiles:
        raise ConfigError(f"dhcp.adopt.profile: no profile named {adopt.profile!r}")
    if config.dhcp.unknown_template and not naming.TEMPLATE.ok(config.dhcp.unknown_template):
        raise ConfigError("dhcp.unknown_template: not a template name")
    if config.store.url and not config.fleet.name:
        # on a shared store a server belongs to the appliance its record names: a name that changed with
        # the host name would leave this appliance's servers to nobody (and their targets unexported)
        raise ConfigError("fleet.name: a PostgreSQL store ([store] url) needs this appliance's name set")
    if config.storage.backend == "zfs" and not config.storage.pool:
        raise ConfigError("storage.pool: the zfs backend needs a pool or parent dataset")
    return config


def load_config(path: Path | None) -> Config:
    """Load and validate; None means the embedded defaults."""
    if path is None:
        return parse_config({})
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(raw)


def describe_defaults() -> list[tuple[str, object, str]]:
    """(key, default, doc) for every key: the README's configuration reference is made from this."""
    rows: list[tuple[str, object, str]] = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            rows.append((f"{section}.{f.name}", default, f.metadata.get("doc", "")))
    return rows
