"""Shared builders for the iscsi unit tests (holds no tests itself; named test_* to stay in the iscsi test files)."""

from __future__ import annotations

from iscsi.model import LunSpec, TargetAuth, TargetSpec

PREFIX = "iqn.2026-11.io.cello"
U1 = "3f1c2b4e-9d8a-4c6b-8e2f-1a2b3c4d5e6f"
U2 = "0a1b2c3d-4e5f-4a6b-9c8d-7e6f5a4b3c2d"


def lun(volume: str, index: int, path: str | None = None, size: int = 1 << 30) -> LunSpec:
    return LunSpec(volume, path or f"/dev/zvol/tank/{volume}", index, size,
                   serial=f"CEL{abs(hash(volume)) % 10**12:012d}"[:16], device_id=f"cello-{volume[-12:]}")


def stable_lun(volume: str, index: int, serial: str, path: str | None = None) -> LunSpec:
    return LunSpec(volume, path or f"/dev/zvol/tank/{volume}", index, 1 << 30, serial, f"cello:{serial}")


def sample_targets() -> list[TargetSpec]:
    return [
        TargetSpec(
            f"{PREFIX}:{U1}",
            (
                stable_lun(f"tiny-OS-{U1}", 0, "CEL000000000001"),
                stable_lun(f"tiny-DATA-{U1}", 1, "CEL000000000002"),
                stable_lun(f"tiny-DATA-{U1}-3", 3, "CEL000000000004"),
            ),
            TargetAuth(chap_user="node1", chap_secret="s3cret-secret1",
                       initiator_names=(f"{PREFIX}:node-{U1}",), initiator_portals=("10.77.0.0/24",)),
        ),
        TargetSpec(f"{PREFIX}:{U2}", (stable_lun(f"debian.12-OS-{U2}", 0, "CEL000000000010"),)),
    ]
