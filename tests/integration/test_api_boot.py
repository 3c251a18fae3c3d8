"""HTTP boot (iPXE scripts from the real renderer, kernel/initrd with sendfile), events, metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from bootfiles.render import render_ipxe
from tests.integration.test_api_stack import INITRD, KERNEL, Stack, api_stack, needs_tgt, uuid_n
from tests.tools import require
from web.app import routes
from web.openapi import openapi_path

__all__ = ["api_stack"]
pytestmark = needs_tgt


async def booted_server(s: Stack, n: int = 20) -> str:
    uuid = uuid_n(n)
    # its node's address is the test client's: a script with a root disk goes only there
    status, _ = await s.create(uuid, macs=["52:54:00:77:00:20"], profile="ipxe", address="127.0.0.1")
    assert status == 202
    assert (await s.wait_state(uuid))["state"] == "available"
    await s.policy.settled()
    return uuid


def http_events(s: Stack) -> list[dict[str, object]]:
    return [dict(e.data) for e in s.events.recent() if e.kind == "http"]


async def test_ipxe_script_is_the_rendered_spec(api_stack: Stack) -> None:
    s = api_stack
    uuid = await booted_server(s)
    async with s.client.get(f"/boot/{uuid}.ipxe") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    spec = s.policy.boot_spec(uuid=uuid, mac=None)
    assert spec is not None and text == render_ipxe(spec)
    # the LUN tgt really used (1, hex) and the portal of this area
    assert f"sanhook --drive 0x80 iscsi:127.0.0.1::13270:1:iqn.2026-11.io.cello:{uuid}" in text
    assert f"/boot/files/{KERNEL}" in text
    # a broken SMBIOS UUID falls back to the MAC
    async with s.client.get("/boot/00000000-0000-0000-0000-000000000000.ipxe?mac=52:54:00:77:00:20") as resp:
        assert resp.status == 200 and await resp.text() == text
    async with s.client.get(f"/boot/{uuid_n(99)}.ipxe") as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    events = http_events(s)
    assert events[0] == {"server": uuid, "client": "127.0.0.1", "file": f"{uuid}.ipxe", "bytes": len(text),
                         "status": 200}
    assert events[-1]["status"] == 404 and events[-1]["server"] is None
    await s.req("PUT", "/api/v1/services/http-boot", json={"enabled": False})
    async with s.client.get(f"/boot/{uuid}.ipxe") as resp:
        assert resp.status == 503 and (await resp.json())["error"] == "service_disabled"
    async with s.client.get(f"/boot/files/{KERNEL}") as resp:
        assert resp.status == 503
    assert http_events(s)[-1]["status"] == 503


async def test_boot_files_sendfile_ranges_and_events(api_stack: Stack) -> None:
    s = api_stack
    uuid = await booted_server(s, 21)
    async with s.client.get(f"/boot/{uuid}.ipxe") as resp:
        assert resp.status == 200
    async with s.client.get(f"/boot/files/{KERNEL}") as resp:
        assert resp.status == 200 and await resp.read() == (s.files_root / KERNEL).read_bytes()
    async with s.client.get(f"/boot/files/{INITRD}", headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206 and await resp.read() == b"I" * 100
    async with s.client.head(f"/boot/files/{INITRD}") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "123457"
    fetches = http_events(s)[1:]
    assert [(e["file"], e["bytes"], e["status"], e["server"]) for e in fetches] == [
        (KERNEL, 300_000, 200, uuid), (INITRD, 100, 206, uuid), (INITRD, 0, 200, uuid)]
    _status, text = await s.req("GET", "/metrics", None)
    assert "cello_http_boot_bytes_total " + str(300_000 + 100 + len(render_ipxe(s.policy.boot_spec(
        uuid=uuid, mac=None)))) in text  # type: ignore[arg-type]


async def test_loader_files_for_uefi_http_boot(api_stack: Stack) -> None:
    require("curl", packages="curl")
    # The proxyDHCP offers UEFI HTTP-boot clients <http_base>/boot/files/ipxe.efi; Debian's file is a
    # packaged link into /boot, which is followed for loader folders but never served by name.
    async with api_stack.client.get("/boot/files/ipxe.efi") as resp:
        assert resp.status == 200
        assert await resp.read() == await asyncio.to_thread(Path("/usr/lib/ipxe/ipxe.efi").read_bytes)
    for name in ("vmlinuz", "../../boot/ipxe.efi", "config-6.1.0-57-amd64"):
        async with api_stack.client.get(f"/boot/files/{name}") as resp:
            assert resp.status == 404, name


async def test_path_traversal_refused(api_stack: Stack) -> None:
    s = api_stack
    secret = s.root / "secret.txt"
    secret.write_text("top secret")
    (s.files_root / "templates" / "link").symlink_to(secret)
    (s.files_root / "templates" / "inside").symlink_to(s.files_root / KERNEL)
    base = f"http://127.0.0.1:{s.client.port}"
    for path in ("/boot/files/../secret.txt", "/boot/files/templates/../../secret.txt",
                 "/boot/files/%2e%2e/secret.txt", "/boot/files/templates/%2e%2e/%2e%2e/secret.txt",
                 "/boot/files/templates/link", "/boot/files//etc/passwd", "/boot/files/%2fetc%2fpasswd",
                 "/boot/files/templates/tiny/v1/vmlinuz%00", "/boot/files/templates", "/boot/files/templates/"):
        proc = await asyncio.to_thread(subprocess.run, ["curl", "-s", "--path-as-is", "-o", "/dev/null",
                                                        "-w", "%{http_code}", base + path],
                                       capture_output=True, text=True, timeout=10)
        assert proc.stdout in ("404", "400"), (path, proc.stdout)
    async with s.client.get("/boot/files/templates/inside") as resp:
        assert resp.status == 200  # a symlink that stays inside the root is fine


async def test_event_stream_follows_workflow_and_replays(api_stack: Stack) -> None:
    s = api_stack
    async with s.client.get("/api/v1/events", headers=s.auth("alice"), timeout=None) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        uuid = uuid_n(22)
        await s.create(uuid)
        seen: list[dict[str, object]] = []
        async with asyncio.timeout(20):
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1].get("step") == "done":
                        break
    steps = [e["step"] for e in seen if e["kind"] == "workflow"]
    assert steps == ["recorded", "volume", "export", "done"]
    assert all(e["server"] == uuid for e in seen)  # alice sees no global (export) events
    first = seen[0]["id"]
    async with s.client.get(f"/api/v1/events?since={first}&follow=false", headers=s.auth()) as resp:
        text = await resp.text()
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids and ids[0] == int(str(first)) + 1 and "event: export" in text
    status, stored = await s.req("GET", f"/api/v1/servers/{uuid}/events", "alice")
    assert status == 200 and [e["step"] for e in stored if e["kind"] == "workflow"][-1] == "done"


async def test_event_stream_ends_at_shutdown(api_stack: Stack) -> None:
    s = api_stack
    resp = await s.client.get("/api/v1/events", headers=s.auth())
    assert resp.status == 200
    await resp.content.readline()
    started = asyncio.get_running_loop().time()
    await s.client.close()  # the server's shutdown must not wait for the stream's handler
    assert asyncio.get_running_loop().time() - started < 3
    resp.close()


async def test_metrics_text_format(api_stack: Stack) -> None:
    s = api_stack
    await booted_server(s, 23)
    await s.req("GET", "/api/v1/nothing")
    status, text = await s.req("GET", "/metrics", None)
    assert status == 200
    async with s.client.get("/metrics") as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'cello_servers{state="available"} 1' in text
    assert 'cello_volumes{kind="os",state="available"} 1' in text
    assert 'cello_events_total{kind="workflow"} 4' in text
    assert 'cello_http_requests_total{route="/api/v1/servers",method="POST",status="202"} 1' in text
    assert 'route="unmatched",method="GET",status="404"' in text
    assert f"cello_export_applies_total {s.domain.exports.applies}" in text and s.domain.exports.applies >= 1
    assert 'cello_pool_bytes{pool="file",kind="free"}' in text
    for line in text.splitlines():  # every sample line is NAME{labels} VALUE
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value)
            assert name_labels.startswith("cello_")


async def test_openapi_document_is_true_to_the_router(api_stack: Stack) -> None:
    s = api_stack
    status, doc = await s.req("GET", "/api/v1/openapi.json", None)
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = set()
    for resource in s.client.app.router.resources():  # type: ignore[union-attr]
        for route in resource:
            served.add((route.method, openapi_path(resource.canonical)))
    assert served == documented
    assert len(served) == len(routes())
    for path, ops in doc["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(path.replace("}", "{").split("{")[1::2])
