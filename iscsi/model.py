"""Volumes and exports: the contract between the provisioner and the storage/export drivers."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class StorageError(Exception):
    """A volume or export operation failed; the message is fit for an operator."""


class NameError_(StorageError):
    """A name that would reach a command line or config file failed validation."""


class InUseError(StorageError):
    """Refused: the volume has clones or is still exported."""


@dataclass(frozen=True)
class VolumeInfo:
    name: str  # e.g. "tiny-OS-<uuid>" (without pool)
    size: int  # bytes (logical)
    used: int  # bytes really allocated
    origin: str | None  # "tiny-template@v1" for clones
    path: str  # block device or image file that an export driver serves


@dataclass(frozen=True)
class PoolCapacity:
    total: int
    used: int
    free: int


class VolumeBackend(Protocol):
    """One interface for the `zfs` and `file` backends. Every method validates names first."""

    name: str

    async def create_template(self, os_name: str, size: int) -> VolumeInfo: ...
    async def snapshot_template(self, os_name: str, version: str) -> None: ...
    async def destroy_snapshot(self, os_name: str, version: str) -> None: ...
    async def clone_os(self, os_name: str, version: str, server_uuid: str, generation: int = 1) -> VolumeInfo:
        """Clone `<os>-template@<version>` as the server's OS volume of that generation
        (`names.os_volume`): an upgrade clones the next generation and keeps the old one."""
        ...
    async def create_data(self, os_name: str, server_uuid: str, index: int, size: int) -> VolumeInfo: ...
    async def destroy(self, volume: str, *, exported: Callable[[str], bool] | None = None) -> None:
        """A missing volume is a no-op. An OS volume's own snapshots go with it."""
        ...
    async def list(self) -> list[VolumeInfo]: ...  # volumes only, never snapshots
    async def snapshots(self) -> builtins.list[str]: ...  # template snapshots only: "tiny-template@v1"

    # -- snapshots of an OS volume (`<volume>@<snap>`, names.volume_snapshot) -------------------
    async def snapshot_volume(self, volume: str, snap: str) -> None:
        """Snapshot an OS volume; StorageError if that snapshot exists already."""
        ...
    async def volume_snapshots(self, volume: str) -> builtins.list[str]:
        """The volume's snapshot names (without "volume@"), oldest first; [] for a missing volume."""
        ...
    async def destroy_volume_snapshot(self, volume: str, snap: str) -> None:
        """A missing snapshot is a no-op."""
        ...
    async def restore_volume_snapshot(self, volume: str, snap: str) -> None:
        """The volume's content becomes the snapshot's (the caller has unexported it first). Refused with
        InUseError naming them when newer snapshots exist (`zfs rollback -r` would destroy them)."""
        ...
    async def copy_volume(self, src: str, dst: str) -> VolumeInfo:
        """dst gets src's bytes (sparse). dst is created with src's size if missing, else must exist with
        the same size (StorageError otherwise). Captures a server's OS volume into a template volume."""
        ...
    async def capacity(self) -> PoolCapacity: ...
    def path(self, volume: str) -> str: ...

    # -- streams to and from another appliance (template replication, moving a server) -------------
    # Transport-agnostic: a sender is an async iterator of bytes (chunks of at most 1 MiB plus a frame
    # header), a receiver consumes one. Only two backends of the same kind understand each other.
    def send_template(self, os_name: str, version: str, *, base: str | None = None) -> AsyncIterator[bytes]:
        """`<os>-template@<version>` as a stream; with `base` (an older version the receiver holds:
        for zfs the newest it holds) the difference from it (`zfs send -i`; file: a delta of the
        pieces that differ). Errors (a missing snapshot, `zfs send` failing) raise StorageError from
        the iterator; closing it early stops and reaps whatever reads for it."""
        ...
    async def receive_template(self, os_name: str, version: str, chunks: AsyncIterator[bytes], *,
                               base: str | None = None) -> str:
        """Make `<os>-template@<version>` here (the template volume too where none is here) from a
        `send_template` stream with the same `base`; return its checksum (`template_checksum`'s form).
        On any failure (cut or corrupt stream, wrong snapshot, checksum mismatch, zfs recv error, an
        existing snapshot: never overwritten) nothing of it is left and StorageError is raised."""
        ...
    async def template_checksum(self, os_name: str, version: str) -> str:
        """What sender and receiver compare to call a copy verified: zfs "zfs-guid:<n>" (the snapshot's
        guid, which send/recv carries over), file "sha256:<hex>" of the logical content."""
        ...
    def send_volume(self, volume: str, *, origin: tuple[str, str] | None = None) -> AsyncIterator[bytes]:
        """A server's OS or data volume (its node is off); with `origin=(os, version)` of an OS clone
        whose template version the receiver holds, only what differs from that snapshot (zfs: of a
        snapshot `<volume>@cello:move` taken first, which stays until the volume is destroyed)."""
        ...
    async def receive_volume(self, volume: str, chunks: AsyncIterator[bytes], *,
                             origin: tuple[str, str] | None = None) -> str:
        """Make the volume here from a `send_volume` stream with the same `origin` (it becomes a clone
        of that snapshot: `VolumeInfo.origin`); return its checksum (`volume_checksum`'s form, checked
        against the stream already). A volume of that name here is refused (StorageError naming it);
        on any failure nothing of it is left."""
        ...
    async def volume_checksum(self, volume: str) -> str:
        """zfs: the guid of what `send_volume` last sent; file: the sha256 of the content now."""
        ...
    def status(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class TargetAuth:
    chap_user: str | None = None
    chap_secret: str | None = field(default=None, repr=False)  # 12..16 chars
    # mutual CHAP: the name and secret the target answers the initiator's challenge with
    chap_mutual_user: str | None = None
    chap_mutual_secret: str | None = field(default=None, repr=False)
    initiator_names: tuple[str, ...] = ()
    initiator_portals: tuple[str, ...] = ()  # "10.77.0.0/24" or an address


@dataclass(frozen=True)
class LunSpec:
    volume: str  # volume name
    path: str
    index: int  # 0 = OS volume, 1.. data volumes; stable for the volume's life
    size: int
    serial: str  # stable
    device_id: str  # stable


@dataclass(frozen=True)
class TargetSpec:
    iqn: str
    luns: tuple[LunSpec, ...]
    auth: TargetAuth = field(default_factory=TargetAuth)


@dataclass(frozen=True)
class ExportState:
    """What is really exported: target IQN -> {volume name: LUN number the driver used}."""

    targets: Mapping[str, Mapping[str, int]]
    available: bool = True
    detail: str = ""


@dataclass(frozen=True)
class Session:
    """An initiator logged in to a target: what a destructive action names when it refuses."""

    initiator: str
    address: str  # the initiator's IP address as the target saw it

    def __str__(self) -> str:
        return f"{self.initiator} from {self.address}"


class ExportDriver(Protocol):
    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None:
        """Cello stops: the exports and every node's session stay (the data plane outlives Cello)."""
        ...
    async def teardown(self, iqn_prefix: str | None = None) -> int:
        """An operator's explicit act: remove the exports (of this IQN prefix); returns how many went."""
        ...
    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        """Make the real exports equal the desired ones (whole state, idempotent); return what is there."""
        ...
    async def actual(self) -> ExportState: ...
    def lun_number(self, index: int) -> int:
        """The LUN number this driver gives a volume of this index (ctld: index, tgt: index + 1)."""
        ...
    async def sessions(self, iqn: str) -> list[Session]:
        """Who is logged in to the target now (tgt: its I_T nexus list; ctld: `ctladm islist`)."""
        ...


@runtime_checkable
class SessionCensus(Protocol):
    """An export driver that lists every target's sessions in one read (for /metrics: one read per
    scrape, however many targets)."""

    async def all_sessions(self) -> dict[str, list[Session]]:
        """Target IQN -> the initiators logged in to it now (targets without a session may be left out)."""
        ...


@runtime_checkable
class LimitedDriver(Protocol):
    """An export driver whose target layer holds a fixed number of targets and LUNs (ctld: CTL's
    `kern.cam.ctl.max_ports` and `max_luns`), so a create can be refused before it fails at apply."""

    def refusal(self, targets: int, luns: int) -> str | None:
        """Why `targets` targets with `luns` LUNs in all would not fit (naming the limit), or None."""
        ...

    def limits(self) -> LimitsReport: ...


class LimitsReport(Protocol):
    def as_json(self) -> Mapping[str, int | None]: ...
