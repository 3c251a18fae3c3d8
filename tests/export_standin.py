"""An export driver that keeps its targets in memory: the in-process API tier's stand-in for tgtd.

For the API tests where tgtd adds nothing (input errors, authorization, users and quotas): it checks
every name as the real drivers do (iscsi.names, so a hostile name is refused the same way), numbers LUNs
as tgt does (index + 1), and reports exactly what it was given. The tgt driver itself is tested against
a real tgtd (tests/integration/test_tgt_*.py), and the API tests that are about exports use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from iscsi import names
from iscsi.model import ExportState, Session, TargetSpec


class InMemoryExports:
    name = "memory"

    def __init__(self) -> None:
        self.targets: dict[str, dict[str, int]] = {}
        self.applies = 0
        self.logged_in: dict[str, list[Session]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def teardown(self, iqn_prefix: str | None = None) -> int:
        gone = [iqn for iqn in self.targets if iqn_prefix is None or iqn.startswith(iqn_prefix + ":")]
        for iqn in gone:
            del self.targets[iqn]
        return len(gone)

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        wanted: dict[str, dict[str, int]] = {}
        for spec in targets:
            names.iqn(spec.iqn)
            wanted[spec.iqn] = {names.volume(lun.volume): self.lun_number(lun.index) for lun in spec.luns}
        self.applies += 1
        self.targets = wanted
        return await self.actual()

    async def actual(self) -> ExportState:
        return ExportState({iqn: dict(luns) for iqn, luns in self.targets.items()}, True, "in memory")

    def lun_number(self, index: int) -> int:
        return index + 1

    async def sessions(self, iqn: str) -> list[Session]:
        """Who a test says is logged in (`logged_in[iqn]`): there is no real initiator here."""
        return list(self.logged_in.get(iqn, ()))
