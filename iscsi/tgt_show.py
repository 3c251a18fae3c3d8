"""The text `tgtadm --lld iscsi --op show --mode target` prints, parsed (pure): targets, their LUNs
(LUN 0, tgt's controller, left out), CHAP accounts by direction, ACL entries, NOP settings and the
logged-in initiators (I_T nexus)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class TgtShowError(ValueError):
    """`tgtadm --op show` output that does not follow tgt's format; `offset` is the line number."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (line {offset})")
        self.offset = offset


@dataclass
class TgtLun:
    lun: int
    path: str | None
    serial: str = ""
    scsi_id: str = ""


@dataclass
class TgtTarget:
    tid: int
    iqn: str
    luns: dict[int, TgtLun] = field(default_factory=dict)  # LUN 0 (controller) excluded
    accounts: list[str] = field(default_factory=list)  # incoming: the initiators' CHAP names
    outgoing: list[str] = field(default_factory=list)  # the target's own name (mutual CHAP)
    acl: list[str] = field(default_factory=list)  # addresses/networks, initiator names, or "ALL"
    nop_interval: int | None = None
    nop_count: int | None = None
    nexus: dict[str, list[str]] = field(default_factory=dict)  # I_T nexus id -> [initiator, first address]


_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$")
_LUN_RE = re.compile(r"^LUN: (\d+)$")


def parse_show(text: str) -> dict[int, TgtTarget]:
    """Parse `tgtadm --lld iscsi --op show --mode target` (indentation-structured text)."""
    targets: dict[int, TgtTarget] = {}
    cur: TgtTarget | None = None
    section = ""
    lun: TgtLun | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        if indent == 0:
            m = _TARGET_RE.match(line)
            if m is None:
                raise TgtShowError(f"expected 'Target N: IQN', got {line!r}", lineno)
            cur = TgtTarget(int(m[1]), m[2])
            targets[cur.tid] = cur
            section, lun = "", None
            continue
        if cur is None:
            raise TgtShowError("indented line before any target", lineno)
        if indent == 4:
            section, lun = line.rstrip(":"), None
            continue
        if section == "System information":
            key, _, value = line.partition(":")
            if key == "Nop interval" and value.strip().isdigit():
                cur.nop_interval = int(value)
            elif key == "Nop count" and value.strip().isdigit():
                cur.nop_count = int(value)
        elif section == "LUN information":
            if indent == 8:
                m = _LUN_RE.match(line)
                if m is None:
                    raise TgtShowError(f"expected 'LUN: N', got {line!r}", lineno)
                lun = TgtLun(int(m[1]), None)
                if lun.lun != 0:
                    cur.luns[lun.lun] = lun
            elif lun is not None:
                key, _, value = line.partition(": ")
                if key == "Backing store path":
                    lun.path = None if value.strip() in ("", "None") else value.strip()
                elif key == "SCSI SN":
                    lun.serial = value.strip()
                elif key == "SCSI ID":
                    lun.scsi_id = value.strip()
        elif section == "Account information":
            user, _, flag = line.partition(" ")
            (cur.outgoing if flag.strip() == "(outgoing)" else cur.accounts).append(user)
        elif section == "ACL information":
            cur.acl.append(line)
        elif section == "I_T nexus information":
            key, _, value = line.partition(": ")
            if key == "I_T nexus":
                cur.nexus[value.strip()] = ["", ""]
            elif cur.nexus and key == "Initiator":
                last = cur.nexus[next(reversed(cur.nexus))]
                last[0] = value.split(" alias:")[0].strip()
            elif cur.nexus and key == "IP Address" and not cur.nexus[next(reversed(cur.nexus))][1]:
                cur.nexus[next(reversed(cur.nexus))][1] = value.strip()
    return targets
