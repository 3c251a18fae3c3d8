"""The first record of a `zfs send` stream (DRR_BEGIN), read before `zfs recv` gets the stream: which
snapshot it carries (`toname`, `toguid`), from which one (`fromguid`, 0 for a full stream) and whether
it is a clone's. A pure codec.

Layout (OpenZFS include/sys/zfs_ioctl.h `dmu_replay_record`, in the sender's byte order, told by the
magic): drr_type u32 (0 = BEGIN), drr_payloadlen u32, then drr_begin: drr_magic u64 0x2F5BACBAC,
drr_versioninfo u64, drr_creation_time u64, drr_type u32, drr_flags u32, drr_toguid u64,
drr_fromguid u64, drr_toname[MAXNAMELEN 256]: 312 bytes. zfs-fuse (pool version 23) writes the same.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iscsi.model import StorageError

DRR_BEGIN = 0
DMU_BACKUP_MAGIC = 0x2F5BACBAC
DRR_FLAG_CLONE = 0x1  # a clone's stream, incremental from its origin: received as a clone of it
BEGIN_SIZE = 312
_BODY = "IIQQQIIQQ256s"


class ZfsStreamError(StorageError, ValueError):
    """Not the start of a zfs send stream; `offset` is the byte where that showed."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"zfs stream: {message} at byte {offset}")
        self.offset = offset


@dataclass(frozen=True)
class SendBegin:
    toname: str  # the sender's "pool/dataset@snap"
    toguid: int
    fromguid: int  # 0: a full stream
    flags: int

    @property
    def snapshot(self) -> str:
        """The sender's dataset@snap without its pool or parent datasets."""
        return self.toname.rpartition("/")[2]

    @property
    def clone(self) -> bool:
        return bool(self.flags & DRR_FLAG_CLONE)


def parse_begin(data: bytes) -> SendBegin:
    if len(data) < BEGIN_SIZE:
        raise ZfsStreamError(f"truncated: {len(data)} of the first record's {BEGIN_SIZE} bytes", len(data))
    for order in "<>":
        rtype, _, magic, _, _, _, flags, toguid, fromguid, raw = struct.unpack_from(order + _BODY, data)
        if magic == DMU_BACKUP_MAGIC:
            break
    else:
        raise ZfsStreamError("not a zfs send stream (bad magic)", 8)
    if rtype != DRR_BEGIN:
        raise ZfsStreamError(f"first record is of type {rtype}, not BEGIN", 0)
    name = raw.split(b"\0", 1)[0]
    try:
        toname = name.decode("ascii")
    except UnicodeDecodeError:
        raise ZfsStreamError("snapshot name is not ASCII", 56) from None
    if "@" not in toname:
        raise ZfsStreamError(f"{toname!r} is not a snapshot name", 56)
    return SendBegin(toname, toguid, fromguid, flags)
