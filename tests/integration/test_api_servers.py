"""Servers, volumes, templates, users, pools, services through the real app (SQLite, file backend, tgtd)."""

from __future__ import annotations

import asyncio

from tests.integration.test_api_stack import INITRD, KERNEL, Stack, api_stack, needs_tgt, uuid_n

__all__ = ["api_stack"]
pytestmark = needs_tgt


async def test_create_show_list_delete_server(api_stack: Stack) -> None:
    s = api_stack
    uuid = uuid_n(1)
    status, body = await s.create(uuid, macs=["52:54:00:77:00:10"], data_volumes=[{"size_gb": 2}])
    assert status == 202, body
    assert body["state"] == "creating" and body["user"] == "alice"
    assert [v["kind"] for v in body["volumes"]] == ["os", "data"]
    server = await s.wait_state(uuid)
    assert server["state"] == "available", server["reason"]
    target = server["target"]
    assert target["iqn"] == f"iqn.2026-11.io.cello:{uuid}" and target["portal"] == "127.0.0.1:13270"
    # tgt reserves LUN 0 for its controller: the OS volume is LUN 1, the data volume LUN 2.
    assert [(lun["index"], lun["lun"]) for lun in target["luns"]] == [(0, 1), (1, 2)]
    actual = await s.driver.actual()
    assert actual.targets[target["iqn"]] == {server["volumes"][0]["name"]: 1, server["volumes"][1]["name"]: 2}

    status, listed = await s.req("GET", "/api/v1/servers")
    assert status == 200 and [x["uuid"] for x in listed] == [uuid]
    status, mine = await s.req("GET", "/api/v1/servers", "alice")
    assert [x["uuid"] for x in mine] == [uuid]
    status, theirs = await s.req("GET", "/api/v1/servers", "bob")
    assert status == 200 and theirs == []
    status, vols = await s.req("GET", "/api/v1/volumes", "alice")
    assert sorted(v["name"] for v in vols) == sorted(v["name"] for v in server["volumes"])

    status, user = await s.req("GET", "/api/v1/users/alice", "alice")
    assert status == 200 and user["used_volumes"] == 2 and user["used_data_gb"] == 2

    status, _ = await s.req("DELETE", f"/api/v1/servers/{uuid}", "alice")
    assert status == 204
    status, body = await s.req("GET", f"/api/v1/servers/{uuid}")
    assert status == 404 and body["error"] == "not_found"
    assert (await s.driver.actual()).targets == {}
    await s.assert_clean()
    status, user = await s.req("GET", "/api/v1/users/alice")
    assert user["used_volumes"] == 0


async def test_duplicate_uuid_and_mac_conflict(api_stack: Stack) -> None:
    s = api_stack
    status, _ = await s.create(uuid_n(2), macs=["52:54:00:00:00:01"])
    assert status == 202
    status, body = await s.create(uuid_n(2), user="bob")
    assert status == 409 and body["error"] == "conflict" and uuid_n(2) in body["detail"]
    status, body = await s.create(uuid_n(3), macs=["52:54:00:00:00:01"])
    assert status == 409 and "MAC" in body["detail"]
    await s.wait_state(uuid_n(2))
    await s.assert_clean()


async def test_quota_exceeded_is_409_and_leaks_nothing(api_stack: Stack) -> None:
    s = api_stack
    await s.add_user("carol", max_volumes=2, max_data_gb=5)
    status, body = await s.create(uuid_n(4), user="carol", data_volumes=[{"size_gb": 6}])
    assert status == 409 and body["error"] == "quota_exceeded", body
    status, body = await s.create(uuid_n(4), user="carol", data_volumes=[{"size_gb": 1}, {"size_gb": 1}])
    assert status == 409 and body["error"] == "quota_exceeded"
    status, body = await s.create(uuid_n(4), user="carol", data_volumes=[{"size_gb": 5}])
    assert status == 202
    await s.wait_state(uuid_n(4))
    status, body = await s.req("POST", f"/api/v1/servers/{uuid_n(4)}/volumes", "carol", json={"size_gb": 1})
    assert status == 409 and body["error"] == "quota_exceeded"
    status, body = await s.req("PUT", "/api/v1/users/carol/quota", json={"max_volumes": 3, "max_data_gb": 6})
    assert status == 200 and body["max_volumes"] == 3
    status, vol = await s.req("POST", f"/api/v1/servers/{uuid_n(4)}/volumes", "carol", json={"size_gb": 1})
    assert status == 201, vol
    assert vol["index"] == 2 and vol["lun"] == 3 and vol["state"] == "available"
    status, _ = await s.req("DELETE", f"/api/v1/servers/{uuid_n(4)}/volumes/{vol['name']}", "carol")
    assert status == 204
    status, vols = await s.req("GET", f"/api/v1/servers/{uuid_n(4)}/volumes", "carol")
    assert [v["index"] for v in vols] == [0, 1]
    status, body = await s.req("DELETE", f"/api/v1/servers/{uuid_n(4)}/volumes/{vols[0]['name']}", "carol")
    assert status == 422 and "OS volume" in body["detail"]
    await s.assert_clean()


async def test_templates_and_version_in_use(api_stack: Stack) -> None:
    s = api_stack
    status, templates = await s.req("GET", "/api/v1/templates", "alice")
    assert status == 200 and templates[0]["name"] == "tiny" and templates[0]["versions"][0]["clones"] == 0
    await s.create(uuid_n(5))
    await s.wait_state(uuid_n(5))
    status, body = await s.req("GET", "/api/v1/templates/tiny")
    assert body["versions"][0]["clones"] == 1
    status, body = await s.req("DELETE", "/api/v1/templates/tiny/versions/v1")
    assert status == 409 and body["error"] == "in_use"
    status, body = await s.req("DELETE", "/api/v1/templates/tiny/versions/v1", "alice")
    assert status == 403
    status, body = await s.req("DELETE", "/api/v1/templates/tiny/versions/v9")
    assert status == 404
    await s.req("DELETE", f"/api/v1/servers/{uuid_n(5)}")
    status, _ = await s.req("DELETE", "/api/v1/templates/tiny/versions/v1")
    assert status == 204
    status, body = await s.req("GET", "/api/v1/templates/tiny")
    assert status == 404
    status, body = await s.create(uuid_n(6))
    assert status == 422 and "template" in body["detail"]


async def test_template_build_runs_the_builder(api_stack: Stack) -> None:
    s = api_stack
    from domain.store import TemplateVersion

    async def builder(name: str, version: str, source: str, progress: object) -> TemplateVersion:
        assert callable(progress)
        progress("making the volume")
        await s.backend.create_template(name, 1 << 20)
        await s.backend.snapshot_template(name, version)
        progress("snapshot taken")
        return TemplateVersion(name, version, source, 1 << 20, KERNEL, INITRD, 0.0)

    s.use_builder(builder)  # as the appliance wires it: the host is checked before any work
    status, job = await s.req("POST", "/api/v1/templates/mini/builds", json={"source": "tiny"})
    assert status == 202 and job["state"] == "running"
    status, body = await s.req("POST", "/api/v1/templates/mini/builds", "alice", json={"source": "tiny"})
    assert status == 403
    status, body = await s.req("POST", "/api/v1/templates/mini2/builds", json={"source": "floppy"})
    assert status == 422 and "unknown template source" in body["detail"]
    status, body = await s.req("POST", "/api/v1/templates/mini3/builds", json={"source": "tar:/nonexistent.tar"})
    assert status == 422 and "/nonexistent.tar" in body["detail"], body
    assert "mini3" not in {b.template for b in s.domain.templates.builds.values()}
    for _ in range(200):
        status, job = await s.req("GET", f"/api/v1/templates/builds/{job['id']}")
        if job["state"] != "running":
            break
        await asyncio.sleep(0.02)
    assert job["state"] == "done" and job["version"] == "v1"
    assert job["progress"][-1] == "built mini@v1"
    status, body = await s.req("GET", "/api/v1/templates/mini")
    assert [v["version"] for v in body["versions"]] == ["v1"]


async def test_users_pools_services_health_reconcile(api_stack: Stack) -> None:
    s = api_stack
    status, users = await s.req("GET", "/api/v1/users")
    assert [u["name"] for u in users] == ["alice", "bob"]
    status, body = await s.req("POST", "/api/v1/users", json={"name": "alice"})
    assert status == 409
    status, body = await s.req("POST", "/api/v1/users", json={"name": "Bad Name"})
    assert status == 422
    status, pools = await s.req("GET", "/api/v1/pools")
    assert status == 200 and pools[0]["name"] == "file" and pools[0]["total"] >= pools[0]["free"] > 0
    status, services = await s.req("GET", "/api/v1/services", "alice")
    assert {x["name"]: x["enabled"] for x in services} == {"dhcp": True, "tftp": True, "http-boot": True,
                                                           "export": True}
    status, body = await s.req("PUT", "/api/v1/services/dhcp", "alice", json={"enabled": False})
    assert status == 403
    status, body = await s.req("PUT", "/api/v1/services/dhcp", json={"enabled": False})
    assert status == 200 and body == {"name": "dhcp", "enabled": False, "state": "disabled", "detail": ""}
    assert s.domain.services["dhcp"] is False
    assert (await s.store.call(s.store.sync.services, s.domain.services.appliance))["dhcp"] is False
    status, body = await s.req("PUT", "/api/v1/services/gopher", json={"enabled": False})
    assert status == 404
    status, body = await s.req("PUT", "/api/v1/services/export", json={"enabled": "no"})
    assert status == 422
    status, health = await s.req("GET", "/api/v1/health", None)
    assert status == 200 and health["status"] == "ok" and health["services"]["export"]["state"] == "running"
    s.health_report["export"] = {"state": "failed", "detail": "tgtd died"}
    status, health = await s.req("GET", "/api/v1/health", None)
    assert health["status"] == "degraded"
    status, report = await s.req("POST", "/api/v1/reconcile")
    assert status == 200 and report["problems"] == []
    status, _ = await s.req("POST", "/api/v1/reconcile", "alice")
    assert status == 403
    status, body = await s.req("DELETE", "/api/v1/users/bob")
    assert status == 204
    status, body = await s.req("GET", "/api/v1/servers", "bob")
    assert status == 401  # its tokens went with it


async def test_export_service_disabled_refuses_changes(api_stack: Stack) -> None:
    s = api_stack
    await s.req("PUT", "/api/v1/services/export", json={"enabled": False})
    status, body = await s.create(uuid_n(7))
    assert status == 409 and body["error"] == "service_disabled"
    await s.assert_clean()
