"""The real API stack for the web tests: the appliance built by `Appliance.build` (SQLite store, `file`
backend, a supervised `tgtd`), its domain and its aiohttp app behind aiohttp's test server on loopback.

Other test_api_* modules import `api_stack` (a fixture) and the helpers from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from appliance.app import Appliance
from appliance.config import Config, load_config
from domain.bootpolicy import ApplianceBootPolicy
from domain.core import Domain
from domain.events import EventBus
from domain.exports import ChapMode, desired_targets
from domain.servers import ServerWorkflows
from domain.store import AsyncStore, TemplateVersion
from domain.templates import SourceCheck, TemplateBuilder, TemplateWorkflows
from images.build import validate_source
from iscsi.file_backend import FileBackend
from iscsi.model import ExportDriver, VolumeBackend
from iscsi.tgt import TgtDriver
from tests.export_standin import InMemoryExports
from web.tls import server_context

IQN_PREFIX = "iqn.2026-11.io.cello"
TEMPLATE_SIZE = 64 << 20
KERNEL = "templates/tiny/v1/vmlinuz"
INITRD = "templates/tiny/v1/initrd.img"
# This area's tgtd control ports and iSCSI portals (unique to the web tests).
TGT_CONTROL_PORTS = (60, 61, 62, 63, 64)
PORTALS = tuple(f"127.0.0.1:{p}" for p in range(13270, 13280))

needs_tgt = pytest.mark.usefixtures("tgt_installed")  # fails, naming the fix, where tgt is missing


def uuid_n(n: int) -> str:
    return f"3f1c2b4e-0000-4000-8000-{n:012x}"


@dataclass
class Stack:
    root: Path
    appliance: Appliance  # built by Appliance.build, as `cello serve` builds its own
    client: TestClient  # type: ignore[type-arg]
    files_root: Path
    admin_token: str
    tokens: dict[str, str] = field(default_factory=dict)  # user -> token
    health_report: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def domain(self) -> Domain:
        return self.appliance.built

    @property
    def store(self) -> AsyncStore:
        return self.domain.store

    @property
    def events(self) -> EventBus:
        return self.domain.events

    @property
    def backend(self) -> VolumeBackend:
        return self.domain.backend

    @property
    def driver(self) -> ExportDriver:
        return self.domain.driver

    @property
    def policy(self) -> ApplianceBootPolicy:
        return self.domain.policy

    @property
    def servers(self) -> ServerWorkflows:
        return self.domain.servers

    def use_builder(self, builder: TemplateBuilder, source_check: SourceCheck | None = validate_source) -> None:
        """Template builds through a stand-in builder (the real one makes file systems: test_template_build);
        sources are checked on the host as the appliance checks them, unless the test says otherwise."""
        d = self.domain
        d.templates = TemplateWorkflows(d.store, d.backend, d.events, d.tasks, builder=builder,
                                        source_check=source_check, destroy=d.servers.destroy,
                                        on_change=d.policy.changed, appliance=d.servers.appliance)

    def auth(self, who: str = "admin") -> dict[str, str]:
        token = self.admin_token if who == "admin" else self.tokens[who]
        return {"Authorization": f"Bearer {token}"}

    async def req(self, method: str, path: str, who: str | None = "admin", **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers.update(self.auth(who))
        async with self.client.request(method, path, headers=headers, **kw) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def create(self, uuid: str, user: str | None = None, who: str = "admin", **body: Any) -> tuple[int, Any]:
        payload = {"uuid": uuid, "template": "tiny", **body}
        if user is not None or who == "admin":
            payload["user"] = user or "alice"
        return await self.req("POST", "/api/v1/servers", who, json=payload)

    async def wait_state(self, uuid: str, states: tuple[str, ...] = ("available", "error"),
                         within: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            status, body = await self.req("GET", f"/api/v1/servers/{uuid}")
            assert status == 200, body
            if body["state"] in states:
                return body  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, f"server {uuid} still {body['state']}"
            await asyncio.sleep(0.02)

    async def add_user(self, name: str, max_volumes: int = 32, max_data_gb: int = 1024) -> str:
        status, body = await self.req("POST", "/api/v1/users", json={
            "name": name, "max_volumes": max_volumes, "max_data_gb": max_data_gb})
        assert status == 201, body
        status, body = await self.req("POST", f"/api/v1/users/{name}/tokens")
        assert status == 201, body
        self.tokens[name] = body["token"]
        return str(body["token"])

    async def assert_clean(self) -> None:
        """No orphan volume, no stale export, no leaked quota; a reconcile finds nothing to say."""
        sync = self.store.sync
        volumes = {v.name for v in await self.store.call(sync.volumes)}
        real = {v.name for v in await self.backend.list()} - {"tiny-template"}
        assert real == volumes, f"backend {sorted(real)} vs store {sorted(volumes)}"
        desired = {t.iqn for t in await desired_targets(self.store, self.backend, self.servers.naming,
                                                        self.servers.appliance)}
        actual = await self.driver.actual()
        assert set(actual.targets) == desired
        for user in await self.store.call(sync.users):
            n, data = await self.store.call(sync.usage, user.name)
            mine = [v for v in await self.store.call(sync.volumes)
                    if (s := await self.store.call(sync.server, v.server)) is not None and s.owner == user.name]
            assert n == len(mine) and data == sum(v.size for v in mine if v.kind == "data")
        report = await self.domain.reconcile()
        assert report.problems == [], report.problems


async def add_template(store: AsyncStore, backend: VolumeBackend, files_root: Path) -> None:
    await backend.create_template("tiny", TEMPLATE_SIZE)
    await backend.snapshot_template("tiny", "v1")
    await store.call(store.sync.add_template_version,
                     TemplateVersion("tiny", "v1", "tiny", TEMPLATE_SIZE, KERNEL, INITRD, time.time()))
    (files_root / KERNEL).parent.mkdir(parents=True, exist_ok=True)
    (files_root / KERNEL).write_bytes(b"K" * 300_000)
    (files_root / INITRD).write_bytes(b"I" * 123_457)


def stack_config(tmp: Path, portal: str, chap: ChapMode = "on", **sections: str) -> Config:
    """The config a test stack is built from: its own state dir and portal, nothing bound by default. Its
    API is a loopback one (the test server's own port), so no HTTPS unless `sections` asks for it."""
    sections = {"api": 'listen = "127.0.0.1:8080"', **sections}
    text = (f'[appliance]\nstate_dir = "{tmp}"\nadvertise = "127.0.0.1"\n'
            f'[iscsi]\ndriver = "tgt"\nportals = ["{portal}"]\nchap = "{chap}"\n'
            '[boot]\ndefault_profile = "ipxe"\n' + "".join(f"[{k}]\n{v}\n" for k, v in sections.items()))
    path = tmp / "cello.toml"
    path.write_text(text)
    return load_config(path)


@contextlib.asynccontextmanager
async def open_stack(
    tmp: Path,
    *,
    control_port: int = TGT_CONTROL_PORTS[0],
    portal: str = PORTALS[0],
    wrap_backend: Callable[[VolumeBackend], VolumeBackend] = lambda b: b,
    wrap_driver: Callable[[ExportDriver], ExportDriver] = lambda d: d,
    client_max_size: int = 1 << 20,
    chap: ChapMode = "on",
    exports: Literal["tgt", "memory"] = "tgt",
    sections: dict[str, str] | None = None,
    port: int | None = None,
    template: bool = True,
    admin_token: str = "",
) -> AsyncIterator[Stack]:
    """The stack on a real tgtd, or with `exports="memory"` on the in-memory stand-in (no tgtd, no
    root): for the tests where tgtd adds nothing. With `api.tls_listen` in `sections` the test server
    speaks HTTPS on the appliance's own certificate (and its client pins it)."""
    files_root = tmp / "boot"
    files_root.mkdir(parents=True, exist_ok=True)
    real_backend = FileBackend(tmp / "volumes")
    real_driver: ExportDriver = (TgtDriver(control_port, [portal], state_dir=tmp / "state") if exports == "tgt"
                                 else InMemoryExports())
    await real_driver.start()
    appliance = Appliance.build(stack_config(tmp, portal, chap, **(sections or {})),
                                backend=wrap_backend(real_backend), driver=wrap_driver(real_driver))
    domain = appliance.built
    if template:
        await add_template(domain.store, real_backend, files_root)
    await domain.start()
    # a configured token (a fleet's stacks share one store: only the first would get a generated one)
    admin = admin_token or await domain.users.ensure_admin_token("")
    if admin_token:
        await domain.users.ensure_admin_token(admin_token)
    assert admin is not None
    health: dict[str, dict[str, str]] = {"export": {"state": "running", "detail": "tgt"},
                                         "api": {"state": "running", "detail": "test"}}
    app = appliance.web_app(health=lambda: health, version="test", client_max_size=client_max_size,
                            sse_heartbeat=0.5, loader_roots=[Path("/usr/lib/ipxe")])
    if appliance.tls is None:
        client = TestClient(TestServer(app, host="127.0.0.1", port=port))
    else:
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server(ssl=server_context(appliance.tls.cert, appliance.tls.key))  # client's: a no-op
        pin = aiohttp.Fingerprint(bytes.fromhex(appliance.tls.fingerprint.replace(":", "")))
        client = TestClient(server, connector=aiohttp.TCPConnector(ssl=pin))
    await client.start_server()
    stack = Stack(tmp, appliance, client, files_root, admin, health_report=health)
    try:
        yield stack
    finally:
        await client.close()
        await domain.stop()
        await real_driver.teardown()


@pytest.fixture
async def api_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        await stack.add_user("alice")
        await stack.add_user("bob")
        yield stack


@pytest.fixture
async def api_stack_in_memory(tmp_path: Path) -> AsyncIterator[Stack]:
    """The in-process tier: the same app and domain, exports in memory (tests/export_standin.py)."""
    async with open_stack(tmp_path, exports="memory") as stack:
        await stack.add_user("alice")
        await stack.add_user("bob")
        yield stack
