"""Three appliances on one PostgreSQL store, in one process: each its own domain, file backend, exports
(the in-memory stand-in) and aiohttp API on its own loopback port; the fleet channel between them is
real HTTP. The template is built (stood in) on A only: B and C get it by replication.

What a fleet must do, each shown here: replicate and verify a template version before placing on it;
place by capacity and say why the others were filtered out; an appliance takes the creates placed on
it from the store; disable and down stop placement; a write on another appliance's server is forwarded
to it (or refused, 503, while it is down); a move hands a server over with its volumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from domain.store import TemplateVersion
from tests.integration.test_api_stack import INITRD, KERNEL, PORTALS, TEMPLATE_SIZE, Stack, open_stack, uuid_n
from tests.integration.test_cli_client import cello
from tests.pgserver import PgServer, fresh_database, pg_server
from web import fleetauth, fleetseal
from web.peers import HttpChannel

__all__ = ["pg_server"]  # the session fixture, used by name

SECRET = "fleet-secret-0123456789abcdef"
CAPACITY_GB = {"a": 40, "b": 80, "c": 120}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sections(name: str, url: str, port: int, capacity_gb: int) -> dict[str, str]:
    return {
        "store": f'url = "{url}"',
        "fleet": (f'name = "{name}"\napi_url = "http://127.0.0.1:{port}"\ncapacity_gb = {capacity_gb}\n'
                  f'secret = "{SECRET}"\nheartbeat_s = 0.2\ndown_after_s = 1.5\npoll_s = 0.1\n'
                  f'labels = {{ zone = "{"east" if name != "c" else "west"}" }}'),
    }


@contextlib.asynccontextmanager
async def fleet_of_three(tmp: Path, pg: PgServer) -> AsyncIterator[dict[str, Stack]]:
    _, url = fresh_database(pg)
    stacks: dict[str, Stack] = {}
    async with contextlib.AsyncExitStack() as exits:
        for i, name in enumerate(CAPACITY_GB):
            port = _free_port()
            stacks[name] = await exits.enter_async_context(open_stack(
                tmp / name, exports="memory", portal=PORTALS[i], port=port, template=(name == "a"),
                admin_token="fleet-admin-token-0123456789",
                sections=_sections(name, url, port, CAPACITY_GB[name])))
        await stacks["a"].add_user("alice", max_volumes=64, max_data_gb=4096)
        yield stacks


async def _until(what: str, check: Any, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def _appliances(stack: Stack) -> dict[str, dict[str, Any]]:
    status, body = await stack.req("GET", "/api/v1/appliances")
    assert status == 200, body
    return {a["name"]: a for a in body}


async def _replicated(a: Stack) -> dict[str, dict[str, Any]]:
    async def every_one_holds() -> dict[str, dict[str, Any]] | None:
        view = await _appliances(a)
        return view if all("tiny@v1" in v["templates"] for v in view.values()) and len(view) == 3 else None
    got: dict[str, dict[str, Any]] = await _until("tiny@v1 replicated to b and c", every_one_holds, 60)
    return got


async def test_a_fleet_replicates_places_forwards_and_moves(tmp_path: Path, pg_server: PgServer) -> None:
    async with fleet_of_three(tmp_path, pg_server) as fleet:
        a, b, c = fleet["a"], fleet["b"], fleet["c"]
        view = await _replicated(a)
        assert {v["state"] for v in view.values()} == {"up"}
        assert view["b"]["capacity_bytes"] == 80 << 30
        # the copies are real and verified: B's template file has A's content (the checksum matched)
        assert await b.backend.template_checksum("tiny", "v1") == await a.backend.template_checksum("tiny", "v1")
        assert (b.files_root / "templates/tiny/v1/vmlinuz").read_bytes() == b"K" * 300_000

        # a newer version built on A travels as an increment from the one B holds
        bases: list[str | None] = []
        receive = b.backend.receive_template

        async def noting_base(os_name: str, version: str, chunks: Any, *, base: str | None = None) -> str:
            bases.append(base)
            return await receive(os_name, version, chunks, base=base)
        b.backend.receive_template = noting_base  # type: ignore[method-assign]
        await asyncio.to_thread(_scribble, a.backend.path("tiny-template"))  # the build's change: one block
        await a.backend.snapshot_template("tiny", "v2")
        for rel in (KERNEL.replace("v1", "v2"), INITRD.replace("v1", "v2")):
            (a.files_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (a.files_root / rel).write_bytes(b"2" * 1000)
        await a.store.call(a.store.sync.add_template_version, TemplateVersion(
            "tiny", "v2", "tiny", TEMPLATE_SIZE, KERNEL.replace("v1", "v2"), INITRD.replace("v1", "v2"), time.time()))
        await _until("tiny@v2 on b", lambda: _holds(a, "b", "tiny@v2"), 30)
        assert bases == ["v1"]
        assert await b.backend.template_checksum("tiny", "v2") == await a.backend.template_checksum("tiny", "v2")
        assert await b.backend.template_checksum("tiny", "v2") != await b.backend.template_checksum("tiny", "v1")
        await _until("tiny@v2 on c", lambda: _holds(a, "c", "tiny@v2"), 30)

        # deleted through C: C destroys its snapshot at once, A and B theirs at their next heartbeat
        status, body = await c.req("DELETE", "/api/v1/templates/tiny/versions/v2")
        assert status == 204, body
        for stack in (a, b, c):
            await _until(f"tiny@v2 gone from {stack.domain.fleet.name}",
                         lambda s=stack: _snapshot_gone(s, "tiny-template@v2"), 10)  # type: ignore[misc]
        await _until("the marks gone", lambda: _no_copies(a, "tiny", "v2"), 10)
        assert "tiny-template@v1" in await b.backend.snapshots()  # the other version stays

        # six servers with 10 GiB of data each, all asked of A: spread by free capacity
        placed: dict[str, str] = {}
        for n in range(6):
            status, body = await a.create(uuid_n(n), data_volumes=[{"size_gb": 10}])
            assert status == 202, body
            placed[body["uuid"]] = body["placement"]["chosen"]
            assert body["appliance"] == body["placement"]["chosen"]
        counts = {name: list(placed.values()).count(name) for name in "abc"}
        assert counts["c"] >= counts["b"] >= counts["a"] and counts["c"] > counts["a"], counts
        # each one is made by its own appliance, taken from the store, and exported there only
        for uuid, where in placed.items():
            server = await fleet[where].wait_state(uuid, within=30)
            assert server["state"] == "available", server
            iqn = fleet[where].servers.iqn(uuid)
            for name, stack in fleet.items():
                exported = iqn in (await stack.driver.actual()).targets
                assert exported == (name == where), (uuid, name, where)
            # only the owner answers the node
            for name, stack in fleet.items():
                await stack.policy.settled()
                assert (stack.policy.boot_spec(uuid=uuid, mac=None) is not None) == (name == where)

        # disabled: no placement there, and a request pinned there says why
        code, out, err = await cello(a, "appliance", "disable", "c", "--reason", "maintenance")
        assert code == 0 and "appliance c: disabled" in out, err
        code, out, err = await cello(a, "appliance", "list")
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert code == 0 and set(rows) == {"a", "b", "c"} and "disabled (maintenance)" in rows["c"], out
        status, body = await a.create(uuid_n(10), appliance="c")
        assert status == 409 and "maintenance" in body["detail"], body
        status, body = await a.create(uuid_n(11))
        assert status == 202 and body["placement"]["chosen"] != "c", body
        assert "maintenance" in body["placement"]["rejected"]["c"]
        await a.req("POST", "/api/v1/appliances/c/enable")

        # service switches are each appliance's own: A's DHCP off is not B's
        status, body = await a.req("PUT", "/api/v1/services/dhcp", json={"enabled": False})
        assert status == 200 and a.domain.services["dhcp"] is False, body
        await b.domain.services.load()  # what B reads at its next start
        assert b.domain.services["dhcp"] is True
        await a.req("PUT", "/api/v1/services/dhcp", json={"enabled": True})

        # a write on B's server asked of A is forwarded to B: B destroys its volumes
        deleted = on_b = next(u for u, w in placed.items() if w == "b")
        vols = [v["name"] for v in (await b.req("GET", f"/api/v1/servers/{on_b}"))[1]["volumes"]]
        status, body = await a.req("DELETE", f"/api/v1/servers/{on_b}")
        assert status == 204, body
        assert not {v.name for v in await b.backend.list()} & set(vols)

        # a move from B to C (the node is off: no session): C holds its volumes and exports it
        on_b = next((u for u, w in placed.items() if w == "b" and u != deleted), None)
        if on_b is None:
            status, body = await a.create(uuid_n(12), appliance="b", data_volumes=[{"size_gb": 1}])
            assert status == 202, body
            on_b = body["uuid"]
            await b.wait_state(on_b)
        assert on_b is not None
        vols = [v["name"] for v in (await b.req("GET", f"/api/v1/servers/{on_b}"))[1]["volumes"]]
        code, out, err = await cello(a, "server", "move", on_b, "--to", "c", "--json")
        assert code == 0, err
        body = json.loads(out)
        assert body["appliance"] == "c" and body["state"] == "available", body
        assert set(vols) <= {v.name for v in await c.backend.list()}
        assert not set(vols) & {v.name for v in await b.backend.list()}
        await _until("c exports the moved server",
                     lambda: _has_target(c, on_b))
        assert c.servers.iqn(on_b) not in (await b.driver.actual()).targets

        # a move cut short by a restart of its owner: the next start's reconcile keeps the server there
        status, body = await a.create(uuid_n(17), appliance="b")
        assert status == 202, body
        await b.wait_state(uuid_n(17))
        await b.store.call(b.store.sync.set_moving_to, uuid_n(17), "c")
        await b.store.call(b.store.sync.set_server_state, uuid_n(17), "moving", "moving to c")
        report = await b.domain.reconcile()
        assert f"server {uuid_n(17)}: interrupted move undone, still here" in report.repaired, report
        status, body = await b.req("GET", f"/api/v1/servers/{uuid_n(17)}")
        assert body["state"] == "available" and body["appliance"] == "b", body
        assert await _has_target(b, uuid_n(17))

        # a create placed on B while B restarts: its reconcile leaves it alone, its poll takes it
        await b.domain.fleet.stop()
        status, body = await a.create(uuid_n(16), appliance="b")
        assert status == 202, body
        await b.domain.reconcile()
        status, body = await b.req("GET", f"/api/v1/servers/{uuid_n(16)}")
        assert body["state"] == "creating" and body["reason"].startswith("placed on b"), body
        await b.domain.fleet.start()
        assert (await b.wait_state(uuid_n(16)))["state"] == "available"

        # B goes quiet: shown down, no placement there, writes on its servers refused (503), reads served
        status, body = await a.create(uuid_n(15), appliance="b")
        assert status == 202, body
        stays = body["uuid"]
        await b.wait_state(stays)
        await b.domain.fleet.stop()
        await _until("b shown down", lambda: _state_is(a, "b", "down"))
        status, text = await a.req("GET", "/metrics", who=None)
        assert status == 200
        assert 'cello_fleet_appliance_up{appliance="b"} 0' in text
        assert 'cello_fleet_appliance_up{appliance="c"} 1' in text
        assert 'cello_fleet_appliance_bytes{appliance="c",kind="capacity"} 128849018880' in text
        status, body = await a.create(uuid_n(13), appliance="b")
        assert status == 409 and "down" in body["detail"], body
        status, body = await a.create(uuid_n(14))
        assert status == 202 and body["placement"]["chosen"] != "b", body
        status, body = await a.req("DELETE", f"/api/v1/servers/{stays}")
        assert status == 503 and "down" in body["detail"], body
        status, body = await a.req("GET", f"/api/v1/servers/{stays}")
        assert status == 200 and body["appliance"] == "b" and body["state"] == "available", body
        assert await _has_target(b, stays)  # its node keeps its root disk


def _scribble(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"v2" * 2048)


async def _no_copies(stack: Stack, template: str, version: str) -> bool:
    return not await stack.store.call(stack.store.sync.template_copies, template, version)


async def _snapshot_gone(stack: Stack, snapshot: str) -> bool:
    return snapshot not in await stack.backend.snapshots()


async def _holds(stack: Stack, name: str, version: str) -> bool:
    return version in (await _appliances(stack))[name]["templates"]


async def _has_target(stack: Stack, uuid: str) -> bool:
    return stack.servers.iqn(uuid) in (await stack.driver.actual()).targets


async def _state_is(stack: Stack, name: str, state: str) -> bool:
    return (await _appliances(stack))[name]["state"] == state


async def test_the_fleet_channel_refuses_strangers(tmp_path: Path, pg_server: PgServer) -> None:
    async with fleet_of_three(tmp_path, pg_server) as fleet:
        a = fleet["a"]
        path = "/fleet/v1/templates/tiny/v1/stream"
        status, _ = await a.req("GET", path, who=None)
        assert status == 401
        status, _ = await a.req("GET", path)  # the admin token is not the fleet's secret
        assert status == 401
        status, body = await a.req("GET", path, who=None, headers={"Authorization": f"Bearer {SECRET}"})
        assert status == 401, body  # nor is the secret itself: it never travels
        now = time.time()
        for wrong in (fleetauth.sign("another-secret-0123456789", "GET", path, now),  # another fleet's
                      fleetauth.sign(SECRET, "GET", "/fleet/v1/templates/tiny/v2/stream", now),  # another path
                      fleetauth.sign(SECRET, "GET", path, now - 600)):  # an old capture
            status, body = await a.req("GET", path, who=None, headers={"Authorization": wrong})
            assert status == 401, body
        async with a.client.get(path, headers={"Authorization": fleetauth.sign(SECRET, "GET", path, now)}) as resp:
            assert resp.status == 200 and resp.content_type == "application/octet-stream"
            assert len(await resp.read()) > 0
        # what travels is sealed: a version's bytes are not on the wire, and open only with the secret and
        # for the request they answer
        def secrets_on_disk() -> None:
            with open(a.backend.path("tiny-template"), "r+b") as f:
                f.seek(1 << 20)
                f.write(os.urandom(256 << 10))
        await asyncio.to_thread(secrets_on_disk)
        await a.backend.snapshot_template("tiny", "v2")
        await a.store.call(a.store.sync.add_template_version, TemplateVersion(
            "tiny", "v2", "tiny", TEMPLATE_SIZE, KERNEL, INITRD, time.time()))
        path = "/fleet/v1/templates/tiny/v2/stream"
        signed = fleetauth.sign(SECRET, "GET", path, now)
        async with a.client.get(path, headers={"Authorization": signed}) as resp:
            assert resp.status == 200
            wire = await resp.read()
        plain = b"".join([chunk async for chunk in a.backend.send_template("tiny", "v2")])
        assert len(plain) > 4096 and wire.startswith(fleetseal.MAGIC)
        assert not any(plain[at:at + 64] in wire for at in range(0, len(plain) - 64, len(plain) // 50))

        async def opened(secret: str, auth: str) -> bytes:
            async def raw() -> AsyncIterator[bytes]:
                yield wire
            return b"".join([chunk async for chunk in fleetseal.unseal(raw(), secret, auth)])
        assert await opened(SECRET, signed) == plain
        with pytest.raises(fleetseal.SealError):
            await opened("another-secret-0123456789", signed)
        with pytest.raises(fleetseal.SealError):
            await opened(SECRET, fleetauth.sign(SECRET, "GET", path, now - 1))
        # a volume that is not moving is not served, whoever asks
        vpath = "/fleet/v1/volumes/tiny-template/stream"
        status, body = await a.req("GET", vpath, who=None,
                                   headers={"Authorization": fleetauth.sign(SECRET, "GET", vpath, now)})
        assert status == 409, body


async def test_a_renamed_appliance_keeps_its_own_servers_on_its_sqlite_store(tmp_path: Path) -> None:
    """SQLite is one appliance's own store: started again under another name (a renamed host), it still
    exports and answers every server there — none becomes a stranger's, no target goes away."""
    token = "renamed-admin-token-0123456789"
    async with open_stack(tmp_path, exports="memory", admin_token=token, sections={"fleet": 'name = "old-host"'}) as s:
        await s.add_user("alice")
        status, body = await s.create(uuid_n(1))
        assert status == 202, body
        await s.wait_state(uuid_n(1))
    async with open_stack(tmp_path, exports="memory", template=False, admin_token=token,
                          sections={"fleet": 'name = "new-host"'}) as s:
        await s.domain.reconcile()
        server = await s.servers.get(uuid_n(1))
        assert server.appliance == "new-host"
        assert await _has_target(s, uuid_n(1))
        await s.policy.settled()
        assert s.policy.boot_spec(uuid=uuid_n(1), mac=None) is not None
        assert [v.row.name for v in await s.domain.fleet.view()] == ["new-host"]


async def test_a_fleet_over_https_pins_its_peers_and_sends_no_token_in_clear(tmp_path: Path,
                                                                             pg_server: PgServer) -> None:
    """A and B serve their API over HTTPS on self-signed certificates, C over plain HTTP. Each registers
    its certificate's fingerprint in the store, and the others pin it: replication and forwarding go over
    TLS with no CA file anywhere; A sends no token to C in clear; a peer whose certificate is not the one
    registered is refused."""
    _, url = fresh_database(pg_server)
    ports = {name: _free_port() for name in "abc"}
    stacks: dict[str, Stack] = {}
    async with contextlib.AsyncExitStack() as exits:
        for i, name in enumerate("abc"):
            sections = _sections(name, url, ports[name], CAPACITY_GB[name])
            if name != "c":
                sections["fleet"] = sections["fleet"].replace("http://", "https://")
                sections["api"] = f'tls_listen = "127.0.0.1:{ports[name]}"'
            stacks[name] = await exits.enter_async_context(open_stack(
                tmp_path / name, exports="memory", portal=PORTALS[i], port=ports[name], template=(name == "a"),
                admin_token="fleet-admin-token-0123456789", sections=sections))
        a, b, c = stacks["a"], stacks["b"], stacks["c"]
        await a.add_user("alice", max_volumes=64, max_data_gb=4096)
        view = await _replicated(a)  # B and C pulled A's version from https://127.0.0.1:<a>, pinned
        assert view["a"]["api_url"] == f"https://127.0.0.1:{ports['a']}" and view["c"]["api_url"].startswith("http:")
        for name in "ab":
            tls = stacks[name].appliance.tls
            assert tls is not None and tls.made and view[name]["tls_fingerprint"] == tls.fingerprint
        assert view["c"]["tls_fingerprint"] == ""
        assert (b.files_root / "templates/tiny/v1/vmlinuz").read_bytes() == b"K" * 300_000

        # a write on B's server asked of A travels to B over TLS
        status, body = await a.create(uuid_n(20), appliance="b")
        assert status == 202, body
        assert (await b.wait_state(uuid_n(20), within=30))["state"] == "available"
        status, body = await a.req("DELETE", f"/api/v1/servers/{uuid_n(20)}")
        assert status == 204, body
        # one on C, whose API is plain HTTP: A refuses to relay the caller's token there, and C keeps it
        status, body = await a.create(uuid_n(21), appliance="c")
        assert status == 202, body
        assert (await c.wait_state(uuid_n(21), within=30))["state"] == "available"
        status, body = await a.req("DELETE", f"/api/v1/servers/{uuid_n(21)}")
        assert status == 503 and "is plain HTTP" in body["detail"] and "in clear" in body["detail"], body
        assert (await c.req("GET", f"/api/v1/servers/{uuid_n(21)}"))[0] == 200
        status, body = await c.req("DELETE", f"/api/v1/servers/{uuid_n(21)}")  # asked of C itself
        assert status == 204, body

        # A's address answered by another certificate (B's, say: a host that took A's address) is refused
        row = await a.store.call(a.store.sync.appliance, "a")
        assert row is not None and row.tls_fingerprint
        channel = HttpChannel(tmp_path / "elsewhere", SECRET)
        impostor = dataclasses.replace(row, tls_fingerprint=view["b"]["tls_fingerprint"])
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            async for _ in channel.template_stream(impostor, "tiny", "v1", None):
                pass
        async for chunk in channel.template_stream(row, "tiny", "v1", None):  # the registered one opens
            assert chunk
            break
