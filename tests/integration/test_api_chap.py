"""Per-server CHAP through the real app and a real tgtd: a node's disk opens only with its own secret.

libiscsi's iscsi-inq is the initiator: with the node's initiator name and no CHAP, a wrong secret, another
server's secret, the right one; and with mutual CHAP, the target's own secret checked by the initiator.
"""

from __future__ import annotations

import json
from pathlib import Path

from bootfiles.render import render_ipxe
from domain.store import ServerRow
from tests.integration.test_api_stack import PORTALS, Stack, needs_tgt, open_stack, uuid_n
from tests.integration.test_tgt_export import run

pytestmark = needs_tgt
PORTAL = PORTALS[0]


async def inq(stack: Stack, uuid: str, auth: str = "", query: str = "") -> tuple[int, str]:
    initiator = stack.servers.initiator(uuid)
    return await run("iscsi-inq", "-i", initiator, f"iscsi://{auth}{PORTAL}/{stack.servers.iqn(uuid)}/1{query}")


async def made(stack: Stack, uuid: str) -> tuple[dict[str, object], ServerRow]:
    status, body = await stack.create(uuid, macs=[f"52:54:00:77:01:{uuid[-2:]}"])
    assert status == 202, body
    server = await stack.wait_state(uuid)
    assert server["state"] == "available", server["reason"]
    row = await stack.store.call(stack.store.sync.server, uuid)
    assert row is not None
    return server, row


async def test_each_server_gets_its_own_secret_and_only_it_opens_the_disk(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as s:
        await s.add_user("alice")
        one, row1 = await made(s, uuid_n(1))
        _, row2 = await made(s, uuid_n(2))
        assert row1.chap_user == f"node-{uuid_n(1)}" and len(row1.chap_secret) == 16
        assert row1.chap_secret != row2.chap_secret  # random per server

        rc, out = await inq(s, uuid_n(1))
        assert rc != 0, out  # the predictable initiator name alone opens nothing
        rc, out = await inq(s, uuid_n(1), f"{row1.chap_user}%wrong-secret-123@")
        assert rc != 0, out
        rc, out = await inq(s, uuid_n(1), f"{row2.chap_user}%{row2.chap_secret}@")
        assert rc != 0, out  # another node's account is not bound to this target
        rc, out = await inq(s, uuid_n(1), f"{row1.chap_user}%{row1.chap_secret}@")
        assert rc == 0 and "DIRECT_ACCESS" in out, out

        # The API names the account, never the secret: not to the owner, not to an admin.
        assert one["target"]["chap"] == "on" and one["target"]["chap_user"] == row1.chap_user  # type: ignore[index]
        for who in ("alice", "admin"):
            for path in ("/api/v1/servers", f"/api/v1/servers/{uuid_n(1)}"):
                status, body = await s.req("GET", path, who)
                assert status == 200 and row1.chap_secret not in json.dumps(body)

        # The node's own boot config carries what it needs to log in.
        await s.policy.settled()
        spec = s.policy.boot_spec(uuid=uuid_n(1), mac=None)
        assert spec is not None and spec.root is not None
        assert (spec.root.chap_user, spec.root.chap_secret) == (row1.chap_user, row1.chap_secret)
        assert f"set password {row1.chap_secret}" in render_ipxe(spec)


async def test_mutual_chap_the_target_proves_itself(tmp_path: Path) -> None:
    async with open_stack(tmp_path, chap="mutual") as s:
        await s.add_user("alice")
        server, row = await made(s, uuid_n(3))
        assert server["target"]["chap"] == "mutual"  # type: ignore[index]
        assert row.chap_mutual_user == f"target-{uuid_n(3)}" and row.chap_mutual_secret not in ("", row.chap_secret)
        auth = f"{row.chap_user}%{row.chap_secret}@"
        rc, out = await inq(s, uuid_n(3), auth, f"?target_user={row.chap_mutual_user}"
                                                f"&target_password={row.chap_mutual_secret}")
        assert rc == 0 and "DIRECT_ACCESS" in out, out
        # an impostor target (one that does not know the mutual secret) is refused by the initiator
        rc, out = await inq(s, uuid_n(3), auth, f"?target_user={row.chap_mutual_user}&target_password=not-the-one1")
        assert rc != 0 and "Invalid CHAP_R" in out, out
        spec = s.policy.boot_spec(uuid=uuid_n(3), mac=None)
        assert spec is not None and f"set reverse-password {row.chap_mutual_secret}" in render_ipxe(spec)


async def test_chap_off_keeps_the_initiator_acl(tmp_path: Path) -> None:
    async with open_stack(tmp_path, chap="off") as s:
        await s.add_user("alice")
        server, row = await made(s, uuid_n(4))
        assert server["target"]["chap"] == "off" and row.chap_secret == ""  # type: ignore[index]
        rc, out = await inq(s, uuid_n(4))
        assert rc == 0, out
        rc, out = await run("iscsi-inq", "-i", "iqn.2026-11.io.cello:someone-else",
                            f"iscsi://{PORTAL}/{s.servers.iqn(uuid_n(4))}/1")
        assert rc != 0, out


