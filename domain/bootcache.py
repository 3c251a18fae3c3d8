"""The boot index as this appliance last read it from a shared (PostgreSQL) store, kept on its own disk,
so that `cello serve` started while the database is out of reach still answers its nodes: DHCP, TFTP
and HTTP boot from this copy, and the exports stay as the target daemon holds them (an empty daemon,
after a host restart, gets the cached ones: domain.core `export_cached`), until the store is back and
the index is read from it again.

The file is `<state_dir>/boot-index.json`, mode 0600, written whole (a temporary file renamed over it)
after each refresh that changed it. It holds what a node's boot needs — the server records (with their
CHAP secrets: the boot configs carry them), their volumes, the template versions — and the service
switches. BMC passwords are left out: nothing in a boot needs them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from domain.store import ServerRow, TemplateVersion, VolumeRow

FILE_NAME = "boot-index.json"  # in the state dir
FORMAT = 1
_Row = TypeVar("_Row", ServerRow, VolumeRow, TemplateVersion)


@dataclass(frozen=True)
class CachedIndex:
    servers: list[ServerRow]
    volumes: list[VolumeRow]
    versions: list[TemplateVersion]
    services: dict[str, bool]
    written_at: float  # unix time of the refresh it is a copy of


def encode(servers: list[ServerRow], volumes: list[VolumeRow], versions: list[TemplateVersion],
           services: dict[str, bool]) -> bytes:
    """Pure: the file's bytes, but for its time stamp (so that an unchanged index is not written again)."""
    return json.dumps({
        "format": FORMAT,
        "servers": [dataclasses.asdict(dataclasses.replace(s, bmc_password="")) for s in servers],
        "volumes": [dataclasses.asdict(v) for v in volumes],
        "versions": [dataclasses.asdict(v) for v in versions],
        "services": services,
    }, sort_keys=True).encode()


def write(path: Path, body: bytes, now: float | None = None) -> None:
    """Blocking (run it off the loop): the file replaced whole, never half-written, mode 0600."""
    data = json.loads(body)
    data["written_at"] = time.time() if now is None else now
    part = path.with_name(f".{path.name}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def read(path: Path) -> CachedIndex | None:
    """Blocking: the cached index, or None where there is none; ValueError for a file that is not one."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a cached boot index ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cached boot index of format {FORMAT}")
    try:
        return CachedIndex(
            servers=[_row(ServerRow, s) for s in data["servers"]],
            volumes=[_row(VolumeRow, v) for v in data["volumes"]],
            versions=[_row(TemplateVersion, v) for v in data["versions"]],
            services={str(k): bool(v) for k, v in data["services"].items()},
            written_at=float(data["written_at"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: a damaged cached boot index ({e})") from None


def _row(cls: type[_Row], raw: dict[str, Any]) -> _Row:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in raw.items() if k in names}  # a field a later Cello added is dropped
    if cls is ServerRow:
        values["macs"] = tuple(values.get("macs", ()))
    return cls(**values)
