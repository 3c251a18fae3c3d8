"""What the store says should be exported: one target per server, its LUNs and its CHAP account.

`desired_targets` is what the export manager applies; it needs only the store and the backend's paths,
so the composition root builds the export manager before the boot policy and the workflows that both
use it (no cycle between them).
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

from domain.states import EXPORTED, VolumeState
from domain.store import AsyncStore, ServerRow, VolumeRow
from iscsi.model import LunSpec, TargetAuth, TargetSpec, VolumeBackend

ChapMode = Literal["on", "mutual", "off"]
# 16 letters and digits (~95 bits): inside every whitelist a secret meets on its way (ctld's 12..16
# chars, tgt's accounts, dracut's netroot, pxelinux and iPXE command lines).
_SECRET_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 16


def new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def chap_for(uuid: str, mode: ChapMode) -> dict[str, str]:
    """The CHAP fields of a new server's record: a random secret per server (and one for the target)."""
    if mode == "off":
        return {}
    out = {"chap_user": f"node-{uuid}", "chap_secret": new_secret()}
    if mode == "mutual":
        out |= {"chap_mutual_user": f"target-{uuid}", "chap_mutual_secret": new_secret()}
    return out


def target_auth(server: ServerRow, initiator: str) -> TargetAuth:
    """The target's ACL: the server's CHAP account when it has one, and its node's initiator name."""
    if not server.chap_secret:
        return TargetAuth(initiator_names=(initiator,))
    return TargetAuth(chap_user=server.chap_user, chap_secret=server.chap_secret,
                      chap_mutual_user=server.chap_mutual_user or None,
                      chap_mutual_secret=server.chap_mutual_secret or None, initiator_names=(initiator,))


def server_serial(volume: str) -> str:
    # Stable for the volume's whole life: derived from its name, never from its position.
    return hashlib.sha256(volume.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Naming:
    """The IQNs of a server's target and of its node."""

    iqn_prefix: str

    def iqn(self, uuid: str) -> str:
        return f"{self.iqn_prefix}:{uuid}"

    def initiator(self, uuid: str) -> str:
        return f"{self.iqn_prefix}:node-{uuid}"


async def desired_targets(store: AsyncStore, backend: VolumeBackend, names: Naming,
                          appliance: str) -> list[TargetSpec]:
    """The targets of the servers on `appliance` (this one: a fleet's others export theirs)."""
    servers, volumes = await store.call(_snapshot, store.sync, appliance)
    return targets_of(servers, volumes, backend, names)


def targets_of(servers: list[ServerRow], volumes: list[VolumeRow], backend: VolumeBackend,
               names: Naming) -> list[TargetSpec]:
    """The targets of these servers (those in an exported state, with their available volumes)."""
    by_server: dict[str, list[VolumeRow]] = {}
    for v in volumes:
        # a restore point (kind 'prev') and a root still being made (idx < 0) are never exported
        if v.state == VolumeState.AVAILABLE and v.kind in ("os", "data") and v.idx >= 0:
            by_server.setdefault(v.server, []).append(v)
    targets = []
    for s in servers:
        if s.state not in EXPORTED:
            continue
        luns = tuple(
            LunSpec(volume=v.name, path=backend.path(v.name), index=v.idx, size=v.size,
                    serial=v.serial, device_id=f"cello-{v.serial}")
            for v in by_server.get(s.uuid, [])
        )
        if luns:
            targets.append(TargetSpec(iqn=names.iqn(s.uuid), luns=luns, auth=target_auth(s, names.initiator(s.uuid))))
    return targets


def _snapshot(store: Any, appliance: str) -> tuple[list[ServerRow], list[VolumeRow]]:
    return store.servers(appliance=appliance), store.volumes()
