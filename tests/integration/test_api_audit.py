"""Read-only tokens (scope 'read') and the audit log of API writes, on the real app (in-process tier)."""

from __future__ import annotations

import json

import pytest

from domain.store import Store
from tests.integration.test_api_stack import Stack, api_stack_in_memory, uuid_n

__all__ = ["api_stack_in_memory"]

BMC_PASSWORD = "hunter2-bmc-Secret"


async def _read_token(stack: Stack, user: str | None) -> str:
    path = "/api/v1/admin/tokens" if user is None else f"/api/v1/users/{user}/tokens"
    status, body = await stack.req("POST", path, json={"scope": "read"})
    assert status == 201, body
    assert body["scope"] == "read" and body["user"] == user
    name = f"{user or 'admin'}-read"
    stack.tokens[name] = body["token"]
    return name


async def test_a_users_read_token_sees_its_servers_and_may_change_nothing(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, body = await s.create(uuid_n(1), who="alice")
    assert status == 202, body
    await s.wait_state(uuid_n(1))
    reader = await _read_token(s, "alice")

    status, servers = await s.req("GET", "/api/v1/servers", reader)
    assert status == 200 and [x["uuid"] for x in servers] == [uuid_n(1)]
    status, _ = await s.req("GET", f"/api/v1/servers/{uuid_n(1)}", reader)
    assert status == 200
    status, _ = await s.req("GET", "/api/v1/users/alice", reader)
    assert status == 200
    # what the owner may not see, its read token may not either
    status, _ = await s.req("GET", "/api/v1/users", reader)
    assert status == 403

    for method, path, body in (("POST", "/api/v1/servers", {"uuid": uuid_n(2), "template": "tiny"}),
                               ("DELETE", f"/api/v1/servers/{uuid_n(1)}", None),
                               ("PUT", f"/api/v1/servers/{uuid_n(1)}/labels", {"labels": {"rack": "1"}}),
                               ("POST", f"/api/v1/servers/{uuid_n(1)}/snapshots", {"name": "s1"})):
        status, answer = await s.req(method, path, reader, json=body)
        assert status == 403, (method, path, answer)
        assert answer == {"error": "forbidden", "detail": "read-only token"}
    status, server = await s.req("GET", f"/api/v1/servers/{uuid_n(1)}")
    assert status == 200 and server["state"] == "available"
    assert await s.store.call(s.store.sync.server, uuid_n(2)) is None

    # the owner's full token still writes
    status, _ = await s.req("PUT", f"/api/v1/servers/{uuid_n(1)}/labels", "alice", json={"labels": {"rack": "1"}})
    assert status == 200


async def test_an_admin_read_token_sees_everything_and_changes_nothing(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    reader = await _read_token(s, None)
    for path in ("/api/v1/users", "/api/v1/pools", "/api/v1/services", "/api/v1/servers", "/api/v1/audit"):
        status, body = await s.req("GET", path, reader)
        assert status == 200, (path, body)
    for method, path, body in (("POST", "/api/v1/users", {"name": "carol"}),
                               ("PUT", "/api/v1/services/tftp", {"enabled": False}),
                               ("POST", "/api/v1/admin/tokens", {}),
                               ("POST", "/api/v1/users/alice/tokens", {}),
                               ("POST", "/api/v1/reconcile", None)):
        status, answer = await s.req(method, path, reader, json=body)
        assert (status, answer["detail"]) == (403, "read-only token"), (method, path, answer)
    assert await s.store.call(s.store.sync.user, "carol") is None
    assert s.domain.services.get("tftp", True) is True


async def test_a_token_says_whose_it_is_and_its_scope(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    await _read_token(s, None)
    await _read_token(s, "alice")
    for who, answer in (("admin", {"user": None, "admin": True, "scope": "full"}),
                        ("admin-read", {"user": None, "admin": True, "scope": "read"}),
                        ("alice", {"user": "alice", "admin": False, "scope": "full"}),
                        ("alice-read", {"user": "alice", "admin": False, "scope": "read"})):
        assert await s.req("GET", "/api/v1/token", who) == (200, answer), who
    status, _ = await s.req("GET", "/api/v1/token", None)
    assert status == 401


async def test_token_scope_is_checked_and_full_is_the_default(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, body = await s.req("POST", "/api/v1/users/alice/tokens", json={"scope": "write-all"})
    assert status == 422 and "scope" in body["detail"]
    status, body = await s.req("POST", "/api/v1/users/alice/tokens", json={"scope": "read", "admin": True})
    assert status == 422
    status, body = await s.req("POST", "/api/v1/admin/tokens")
    assert status == 201 and body["scope"] == "full" and body["user"] is None
    s.tokens["admin2"] = body["token"]
    status, _ = await s.req("POST", "/api/v1/users", "admin2", json={"name": "carol"})
    assert status == 201
    status, _ = await s.req("POST", "/api/v1/admin/tokens", "alice", json={"scope": "read"})
    assert status == 403  # a user token makes no admin token, read or not


async def test_every_write_is_audited_with_who_and_status_and_no_secret(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, body = await s.req("GET", "/api/v1/audit?limit=1000")
    assert status == 200
    first = body[-1]["id"] if body else 0
    status, _ = await s.create(uuid_n(3), who="alice")
    assert status == 202
    await s.wait_state(uuid_n(3))
    status, _ = await s.req("PUT", f"/api/v1/servers/{uuid_n(3)}/bmc",
                            json={"url": "redfish://127.0.0.1:8000/1", "user": "root", "password": BMC_PASSWORD})
    assert status == 200
    status, _ = await s.req("POST", "/api/v1/users", json={"name": "Not A Name!"})
    assert status == 422
    status, _ = await s.req("DELETE", f"/api/v1/servers/{uuid_n(3)}", None)
    assert status == 401
    reader = await _read_token(s, "bob")
    status, _ = await s.req("POST", "/api/v1/servers", reader, json={"uuid": uuid_n(4), "template": "tiny"})
    assert status == 403
    status, _ = await s.req("GET", "/api/v1/servers", "alice")  # a read: not audited
    assert status == 200

    status, entries = await s.req("GET", f"/api/v1/audit?since={first}")
    assert status == 200, entries
    seen = [(e["who"], e["method"], e["path"], e["status"]) for e in entries]
    assert seen == [
        ("alice", "POST", "/api/v1/servers", 202),
        ("admin", "PUT", f"/api/v1/servers/{uuid_n(3)}/bmc", 200),
        ("admin", "POST", "/api/v1/users", 422),
        ("-", "DELETE", f"/api/v1/servers/{uuid_n(3)}", 401),
        ("admin", "POST", "/api/v1/users/bob/tokens", 201),
        ("bob", "POST", "/api/v1/servers", 403),
    ]
    assert [e["detail"] for e in entries] == ["create_server", "set_bmc", "create_user invalid",
                                              "delete_server unauthorized", "create_token",
                                              "create_server forbidden"]
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids) and all(e["at"] > 0 for e in entries)
    stored = await s.store.call(s.store.sync.audit, None, 1000)
    assert not any(BMC_PASSWORD in str(row) or s.tokens["bob-read"] in str(row) for row in stored)

    status, newest = await s.req("GET", "/api/v1/audit?limit=2")
    assert [e["id"] for e in newest] == ids[-2:]
    status, page = await s.req("GET", f"/api/v1/audit?since={ids[1]}&limit=2")
    assert [e["id"] for e in page] == ids[2:4]
    for bad in ("since=-1", "limit=0", "limit=1001", "since=x"):
        status, _ = await s.req("GET", f"/api/v1/audit?{bad}")
        assert status == 422, bad
    status, _ = await s.req("GET", "/api/v1/audit", "alice")
    assert status == 403


async def test_audit_rows_reach_the_store_in_a_batch(api_stack_in_memory: Stack) -> None:
    s = api_stack_in_memory
    status, _ = await s.req("PUT", "/api/v1/services/tftp", json={"enabled": False})
    assert status == 200
    await s.domain.audit.flush()
    rows = await s.store.call(s.store.sync.audit, None, 5)
    assert rows[-1][2:6] == ("admin", "PUT", "/api/v1/services/tftp", 200)


def test_the_audit_table_stays_bounded(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(f"{tmp_path}/cello.db")
    monkeypatch.setattr(Store, "AUDIT_KEEP", 50)
    for batch in range(4):
        store.add_audit([(float(i), "admin", "POST", f"/api/v1/x/{batch}/{i}", 201, "") for i in range(30)])
    rows = store.audit(None, 1000)
    assert len(rows) == 50 and rows[-1][4] == "/api/v1/x/3/29" and rows[0][0] == 120 - 50 + 1
    store.close()


async def test_cello_audit_and_token_create(api_stack_in_memory: Stack) -> None:
    from tests.integration.test_cli_client import cello

    s = api_stack_in_memory
    code, out, err = await cello(s, "token", "create", "--user", "alice", "--read")
    assert code == 0, err
    assert out.startswith("read token for alice (shown once): cello_")
    s.tokens["alice-cli"] = out.rsplit(" ", 1)[1].strip()
    code, out, err = await cello(s, "server", "create", uuid_n(9), "--template", "tiny", who="alice-cli")
    assert code == 1 and "forbidden: read-only token" in err
    code, out, err = await cello(s, "audit", "--limit", "2")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["ID", "WHEN", "(UTC)", "WHO", "METHOD"]
    assert [r.split()[3:7] for r in rows] == [["admin", "POST", "/api/v1/users/alice/tokens", "201"],
                                              ["alice", "POST", "/api/v1/servers", "403"]]
    code, out, err = await cello(s, "audit", "--json", "--since", "0", "--limit", "1000")
    entries = json.loads(out)
    assert code == 0 and entries[-1]["detail"] == "create_server forbidden"
    code, out, err = await cello(s, "audit", who="alice")
    assert code == 1 and "forbidden" in err
