"""Retiring a rack: many DELETEs at once through the real app (SQLite, file backend, tgtd -C 64).

Concurrent deletes share export applies as creates do; every volume is gone from tgt, the backend
and the store afterwards; a delete that fails in the middle of a burst leaves its own server in
`error_deleting` with exactly the volumes not yet destroyed, and the others are not held up.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from iscsi.model import StorageError, VolumeBackend
from tests.integration.test_api_stack import PORTALS, TGT_CONTROL_PORTS, Stack, needs_tgt, open_stack, uuid_n

pytestmark = needs_tgt
N = 24


class FailingDestroy:
    """The real backend, except that destroying the named volume fails while armed."""

    def __init__(self, real: VolumeBackend, volume: str) -> None:
        self.real, self.volume, self.armed = real, volume, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def destroy(self, volume: str, **kw: Any) -> None:
        if self.armed and volume == self.volume:
            raise StorageError(f"injected destroy failure of {volume}")
        await self.real.destroy(volume, **kw)


async def create_available(s: Stack, uuids: list[str]) -> None:
    for i, uuid in enumerate(uuids):
        data = [{"size_gb": 1}] if i % 3 == 0 else []  # some servers have a data volume too
        status, body = await s.create(uuid, data_volumes=data)
        assert status == 202, body
    for uuid in uuids:
        assert (await s.wait_state(uuid, within=60))["state"] == "available"


async def delete_all(s: Stack, uuids: list[str]) -> list[tuple[int, Any]]:
    return await asyncio.gather(*(s.req("DELETE", f"/api/v1/servers/{u}") for u in uuids))


async def test_a_burst_of_deletes_shares_applies_and_leaves_nothing(tmp_path: Path) -> None:
    async with open_stack(tmp_path, control_port=TGT_CONTROL_PORTS[4], portal=PORTALS[4]) as s:
        await s.add_user("alice")
        uuids = [uuid_n(0x900 + i) for i in range(N)]
        await create_available(s, uuids)
        assert len((await s.driver.actual()).targets) == N
        before = s.domain.exports.applies

        results = await delete_all(s, uuids)

        assert [status for status, _ in results] == [204] * N, results
        # Each delete waits for an apply that starts after it marked its server `deleting`: the
        # first to arrive starts one, the rest wait together for the next.
        assert s.domain.exports.applies - before <= 3
        assert (await s.driver.actual()).targets == {}
        assert {v.name for v in await s.backend.list()} == {"tiny-template"}
        assert await s.store.call(s.store.sync.servers) == []
        assert await s.store.call(s.store.sync.usage, "alice") == (0, 0)
        await s.policy.settled()
        assert all(s.policy.boot_spec(uuid=u, mac=None) is None for u in uuids)
        await s.assert_clean()


async def test_a_delete_failing_mid_burst_keeps_what_it_did_not_destroy(tmp_path: Path) -> None:
    uuids = [uuid_n(0xA00 + i) for i in range(N)]
    victim = uuids[0]  # OS + one data volume; the data volume goes first
    backends: list[FailingDestroy] = []

    def wrap(b: VolumeBackend) -> VolumeBackend:
        backends.append(FailingDestroy(b, f"tiny-OS-{victim}"))
        return backends[0]

    async with open_stack(tmp_path, control_port=TGT_CONTROL_PORTS[4], portal=PORTALS[4],
                          wrap_backend=wrap) as s:
        await s.add_user("alice")
        await create_available(s, uuids)

        results = await delete_all(s, uuids)

        status, body = results[0]
        assert status == 500 and "injected destroy failure" in body["detail"], body
        assert [status for status, _ in results[1:]] == [204] * (N - 1)
        status, server = await s.req("GET", f"/api/v1/servers/{victim}")
        assert server["state"] == "error_deleting" and "injected destroy failure" in server["reason"]
        assert server["target"]["exported"] is False  # unexported before anything was destroyed
        assert [v["name"] for v in server["volumes"]] == [f"tiny-OS-{victim}"]  # its data volume went
        assert {v.name for v in await s.backend.list()} == {"tiny-template", f"tiny-OS-{victim}"}
        assert await s.store.call(s.store.sync.usage, "alice") == (1, 0)
        await s.policy.settled()
        assert s.policy.boot_spec(uuid=victim, mac=None) is None

        backends[0].armed = False
        status, _ = await s.req("DELETE", f"/api/v1/servers/{victim}")
        assert status == 204
        assert (await s.driver.actual()).targets == {}
        await s.assert_clean()


async def test_a_user_cannot_delete_another_users_server(tmp_path: Path) -> None:
    async with open_stack(tmp_path, control_port=TGT_CONTROL_PORTS[4], portal=PORTALS[4]) as s:
        await s.add_user("alice")
        await s.add_user("bob")
        mine, nobodys = uuid_n(0xB01), uuid_n(0xB02)
        await create_available(s, [mine])

        theirs = await s.req("DELETE", f"/api/v1/servers/{mine}", "bob")
        missing = await s.req("DELETE", f"/api/v1/servers/{nobodys}", "bob")
        # bob learns nothing: another user's server answers exactly as one that does not exist
        assert theirs[0] == missing[0] == 404
        assert theirs[1]["error"] == missing[1]["error"] == "not_found"
        assert theirs[1]["detail"].replace(mine, "U") == missing[1]["detail"].replace(nobodys, "U")
        status, server = await s.req("GET", f"/api/v1/servers/{mine}")
        assert server["state"] == "available" and server["target"]["exported"] is True
        assert list((await s.driver.actual()).targets) == [server["target"]["iqn"]]

        status, _ = await s.req("DELETE", f"/api/v1/servers/{mine.upper()}", "alice")
        assert status == 204
        await s.assert_clean()
