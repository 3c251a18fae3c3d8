"""The composition root: builds every service from config, starts them together, stops them together.

Everything binds first; if one bind fails, the ones already bound are released and the error names the
address and the reason. After start, the first fatal error of any service stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from appliance.config import Config, split_host_port, tls_listen
from appliance.host import StateDirBusy, first_ipv4, host_label, lock_state_dir, raise_open_file_limit
from appliance.version import VERSION
from bootfiles.spec import EventSink
from domain import bootcache
from domain.core import Domain, build_domain
from domain.errors import StoreError, StoreUnreachable
from domain.fleet import FleetSettings
from domain.store import AsyncStore, open_store
from iscsi.model import ExportDriver, StorageError, VolumeBackend
from udpio.udp import BindError, bind_error_text
from web.peers import HttpChannel
from web.tls import ServerCertificate, TlsError, server_certificate, server_context

if TYPE_CHECKING:
    from web.deps import ServiceCounters

log = logging.getLogger("cello")

STORE_RETRY_FIRST_S = 1.0  # a start without its store tries again after this, doubling up to the most
STORE_RETRY_MAX_S = 30.0


class StartError(RuntimeError):
    """A service could not start; the message names what and why, in one line."""


class FatalError(RuntimeError):
    """A running service failed for good, so the appliance stopped; the message names the service."""


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def explain_bind_error(what: str, host: str, port: int, e: OSError) -> StartError:
    """`<what>: cannot listen on HOST:PORT: <reason>`, in the words every service uses (udpio.udp)."""
    return StartError(f"{what}: {bind_error_text(host, port, e)}")


def make_driver(config: Config, on_fatal: Callable[[BaseException], None] | None = None) -> ExportDriver:
    """The export driver the config names (`cello serve`, and `cello teardown`)."""
    from iscsi.exports import choose_driver

    cfg = config.iscsi
    return choose_driver(
        cfg.driver,  # type: ignore[arg-type]
        cfg.portals,
        ctl_conf=Path(cfg.ctld_conf),
        tgt_control_port=cfg.tgt_control_port,
        tgt_manage_daemon=cfg.tgt_manage_daemon,
        state_dir=config.appliance.state_dir,
        on_fatal=on_fatal,
    )


@dataclass
class Health:
    state: str  # running | disabled | off | unavailable | failed
    detail: str = ""


@dataclass
class ServiceSlot:
    name: str
    service: Service | None
    describe: str = ""
    health: Health = field(default_factory=lambda: Health("off"))


class Appliance:
    """Everything `cello serve` runs, built from one config; the tests and benchmarks build theirs here too.

    `Appliance.build(config, backend=…, driver=…)` is the one place the parts are wired: a test or a
    benchmark that needs a backend or a driver of its own passes it, and gets the same domain and web
    app that `cello serve` runs.
    """

    def __init__(self, config: Config, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = config.appliance.state_dir
        self.files_root = self.state_dir / "boot"
        self.advertise = config.appliance.advertise or first_ipv4()
        self.domain: Domain | None = None
        self.slots: list[ServiceSlot] = []
        self.admin_token_printed: str | None = None
        self._stopped = asyncio.Event()
        self._fatal: BaseException | None = None
        self._lock_fd: int | None = None
        self._closed = False  # the domain's store, once stopped, stays closed
        self.wait_for_store = False
        self.store_down = ""  # why the store could not be reached at start ('' = it could, or is back)
        self._store_task: asyncio.Task[None] | None = None
        self._cached: bootcache.CachedIndex | None = None  # the index started on, while the store is away
        self.tls_listen = tls_listen(config.api)  # '' = no HTTPS listener
        self.tls: ServerCertificate | None = None  # its certificate, once built

    # --- building --------------------------------------------------------------------------------

    def _make_backend(self) -> VolumeBackend:
        cfg = self.config.storage
        if cfg.backend == "zfs":
            from iscsi.zfs_backend import ZfsBackend

            return ZfsBackend(cfg.pool, kind=cfg.kind)  # type: ignore[arg-type]
        from iscsi.file_backend import FileBackend

        directory = Path(cfg.path) if cfg.path else self.state_dir / "volumes"
        directory.mkdir(parents=True, exist_ok=True)
        return FileBackend(directory)

    def _make_driver(self) -> ExportDriver:
        return make_driver(self.config, on_fatal=self._fatal_for("export"))

    def portal(self) -> tuple[str, int]:
        host, port = split_host_port(self.config.iscsi.portals[0])
        return (self.advertise if host in ("0.0.0.0", "::") else host), port

    def http_base(self) -> str:
        return self._base("http", self.config.api.listen)

    def tls_base(self) -> str:
        """The HTTPS listener's URL; '' without one."""
        return self._base("https", self.tls_listen) if self.tls_listen else ""

    def _base(self, scheme: str, listen: str) -> str:
        host, port = split_host_port(listen)
        host = self.advertise if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") else host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def fleet_settings(self) -> FleetSettings:
        cfg = self.config.fleet
        return FleetSettings(
            name=cfg.name or host_label(), api_url=cfg.api_url or self.tls_base() or self.http_base(),
            advertise=self.advertise,
            labels=dict(cfg.labels or {}), capacity_bytes=cfg.capacity_gb << 30, secret=cfg.secret,
            heartbeat_s=cfg.heartbeat_s, down_after_s=cfg.down_after_s, poll_s=cfg.poll_s,
            os_reserve_bytes=cfg.os_reserve_gb << 30, sole=not self.config.store.url,
            answers_unknown=self.config.dhcp.unknown != "ignore", version=VERSION,
            tls_fingerprint=self.tls.fingerprint if self.tls else "")

    def _certificate(self) -> ServerCertificate:
        """The HTTPS listener's certificate: the operator's, or this appliance's self-signed one (made the
        first time; a few milliseconds, before anything listens)."""
        cfg = self.config.api
        host, _ = split_host_port(self.tls_listen)
        names = [self.advertise, *([host] if host not in ("0.0.0.0", "::") else []), host_label(), "localhost",
                 "127.0.0.1"]
        try:
            return server_certificate(cfg.tls_cert, cfg.tls_key, self.state_dir / "tls", names)
        except TlsError as e:
            raise StartError(f"api: {e}") from None

    @classmethod
    def build(cls, config: Config, *, config_path: Path | None = None, backend: VolumeBackend | None = None,
              driver: ExportDriver | None = None, template_builds: bool = True,
              wait_for_store: bool = False) -> Appliance:
        """The appliance with every part made (nothing bound or started yet: that is `start`).
        `wait_for_store` (`cello serve`): a PostgreSQL store out of reach does not stop the start, which
        then answers nodes from the cached boot index until the database is back."""
        appliance = cls(config, config_path=config_path)
        appliance.wait_for_store = wait_for_store
        appliance._build(backend, driver, template_builds)
        return appliance

    def _build(self, backend: VolumeBackend | None, driver: ExportDriver | None, template_builds: bool) -> None:
        # two per TFTP transfer, plus the store, sockets of the other services and API clients
        raise_open_file_limit(2 * self.config.tftp.max_transfers + 512)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.files_root.mkdir(parents=True, exist_ok=True)
        from images.build import validate_source

        driver = driver or self._make_driver()
        self.tls = self._certificate() if self.tls_listen else None
        shared = bool(self.config.store.url)  # a PostgreSQL store: the boot index is cached on disk too
        self.domain = build_domain(
            AsyncStore(open_store(self.config.store.url, self.state_dir / "cello.db", may_wait=self.wait_for_store)),
            backend or self._make_backend(), driver,
            iqn_prefix=self.config.iscsi.iqn_prefix, profiles=self.config.boot.profiles,
            default_profile=self.config.boot.default_profile, portal=self.portal(), http_base=self.http_base(),
            unknown=self.config.dhcp.unknown, unknown_template=self.config.dhcp.unknown_template,
            chap=self.config.iscsi.chap,  # type: ignore[arg-type]
            builder=self._build_template if template_builds else None,
            source_check=validate_source if template_builds else None,
            power_for=_bmc_of, copy_boot_files=self._copy_boot_files, scrub=_scrub,
            adopt_rule=self.config.dhcp.adopt, fleet=self.fleet_settings(),
            channel=HttpChannel(self.files_root, self.config.fleet.secret) if self.config.fleet.secret else None,
            boot_cache=self.state_dir / bootcache.FILE_NAME if shared else None)
        self.slots = [
            ServiceSlot("export", driver, f"iSCSI export via {driver.name}"),
            ServiceSlot("tftp", self._make_tftp() if self.config.tftp.enabled else None, self.config.tftp.listen),
            ServiceSlot("dhcp", self._make_dhcp() if self.config.dhcp.enabled else None,
                        f"{self.config.dhcp.listen}:{self.config.dhcp.port}+{self.config.dhcp.pxe_port}"),
            ServiceSlot("dns", self._make_dns() if self.config.dns.enabled else None, self.config.dns.listen),
            ServiceSlot("api", _WebService(self), self.config.api.listen + (
                f" and {self.tls_listen} (TLS)" if self.tls_listen else "")),
        ]

    async def _copy_boot_files(self, source: Any, template: str, version: str) -> tuple[str, str]:
        """A captured version boots the kernel and initrd of the version its root came from."""
        def copy() -> tuple[str, str]:
            out = []
            for rel in (source.kernel, source.initrd):
                dst = Path("templates") / template / version / Path(rel).name
                (self.files_root / dst).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.files_root / rel, self.files_root / dst)
                out.append(str(dst))
            return out[0], out[1]

        return await asyncio.to_thread(copy)

    @property
    def built(self) -> Domain:
        assert self.domain is not None, "Appliance.build() first"
        return self.domain

    def web_app(self, **deps: Any) -> web.Application:
        """The API and HTTP boot app on this appliance's domain; `deps` override WebDeps fields (tests)."""
        from web.app import WebDeps, create_app

        fields: dict[str, Any] = {"files_root": self.files_root, "health": self.health, "version": VERSION,
                                  "loader_roots": self.loader_roots(), "collect": self.collect,
                                  "tls_url": self.tls_base(), **deps}
        return create_app(WebDeps(domain=self.built, **fields))

    def collect(self) -> ServiceCounters:
        """The DHCP and TFTP counters for /metrics (web.deps.ServiceCounters), from the services built."""
        from bootfiles.tftp_server import TftpServer
        from dhcp.proxy import ProxyDHCP
        from web.deps import ServiceCounters

        services = {slot.name: slot.service for slot in self.slots}
        dhcp, tftp = services.get("dhcp"), services.get("tftp")
        return ServiceCounters(dhcp=dhcp.stats if isinstance(dhcp, ProxyDHCP) else None,
                               tftp=tftp.stats if isinstance(tftp, TftpServer) else None,
                               tftp_active=tftp.active_transfers if isinstance(tftp, TftpServer) else 0)

    async def _build_template(self, name: str, version: str, source: str,
                              progress: Callable[[str], None]) -> Any:
        from domain.store import TemplateVersion
        from images.build import build_template

        built = await build_template(self.built.backend, name, version, source, self.files_root,
                                     self.state_dir / "build", progress)
        # The provisioner stores a TemplateVersion row, not the build's own record.
        return TemplateVersion(template=built.os_name, version=built.version, source=built.source,
                               size=built.size, kernel=built.kernel, initrd=built.initrd, created_at=time.time())

    def _enabled(self, service: str) -> Callable[[], bool]:
        return lambda: self.domain is not None and self.domain.services.get(service, True)

    def _event_sink(self) -> EventSink:
        bus = self.built.events

        def sink(kind: str, data: Mapping[str, object]) -> None:
            bus.publish(kind, data)

        return sink

    def loader_roots(self) -> list[Path]:
        from bootfiles.tree import default_static_roots

        return [Path(r) for r in self.config.tftp.roots] or default_static_roots()

    def _make_tftp(self) -> Service:
        from bootfiles.tftp_server import TftpServer
        from bootfiles.tree import BootTree

        cfg = self.config.tftp
        tree = BootTree(self.loader_roots(), self.files_root, self.built.policy)
        host, port = split_host_port(cfg.listen)
        return TftpServer(host, port, tree, blksize_max=cfg.blksize_max, windowsize_max=cfg.windowsize_max,
                          max_transfers=cfg.max_transfers, engine=cfg.engine,
                          events=self._event_sink(),
                          enabled=self._enabled("tftp"), on_fatal=self._fatal_for("tftp"))

    def _make_dhcp(self) -> Service:
        import sys

        from dhcp.process import ProcessProxyDHCP
        from dhcp.proxy import GIL_SWITCH_INTERVAL, ProxyDHCP

        cfg = self.config.dhcp
        policy = self.built.policy
        options: dict[str, Any] = {"listen": cfg.listen, "port": cfg.port, "pxe_port": cfg.pxe_port,
                                   "interface": cfg.interface, "events": self._event_sink(),
                                   "enabled": self._enabled("dhcp")}
        if cfg.responder == "process":
            proxy = ProcessProxyDHCP(policy, self.advertise, mirror=policy.snapshot, **options)
            policy.listeners.append(proxy.mirror_changed)  # the boot index swapped
            self.built.events.observers.append(
                lambda event: proxy.mirror_changed() if event.kind == "service" else None)  # a switch flipped
            return proxy
        if cfg.responder == "thread":
            # The responder answers on threads of its own; this bounds how long they wait for the GIL
            # while TFTP, HTTP and the API keep the loop busy (dhcp/proxy.py says what it was measured at).
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        return ProxyDHCP(policy, self.advertise, own_thread=cfg.responder == "thread", **options)

    def _make_dns(self) -> Service:
        from dnsd.server import DnsResponder

        host, port = split_host_port(self.config.dns.listen)
        return DnsResponder(self.built.policy.names, self.config.dns.zone, listen=host, port=port,
                            on_fatal=self._fatal_for("dns"))

    # --- running ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind everything; on the first failure undo what was bound and raise StartError."""
        domain = self.built
        if self._lock_fd is None:
            try:
                self._lock_fd = lock_state_dir(self.state_dir)
            except StateDirBusy as e:
                raise StartError(str(e)) from None
        try:
            await self._start_domain()
        except BaseException:
            self._closed = True
            with contextlib.suppress(Exception):
                await domain.stop()
            self._unlock()
            raise
        started: list[ServiceSlot] = []
        try:
            for slot in self.slots:
                if slot.service is None:
                    slot.health = Health("off", "disabled in config")
                    continue
                await _start_one(slot)
                started.append(slot)
                slot.health = Health("running", slot.describe)
                log.info("%s: listening on %s", slot.name, slot.describe) if slot.name != "export" else \
                    log.info("export: %s", slot.describe)
        except BaseException:
            for slot in reversed(started):
                with contextlib.suppress(Exception):
                    await slot.service.stop()  # type: ignore[union-attr]
            self._closed = True
            await domain.stop()
            self._unlock()
            raise
        if self.store_down:
            await self._export_cached()
            self._store_task = asyncio.get_running_loop().create_task(self._until_the_store_is_back(),
                                                                      name="cello-store-wait")
        else:
            await self._with_the_store()
        # The boot index and everything loaded so far live for the process: moving them out of the
        # collector's generations keeps full collections from stalling DHCP replies in a boot storm.
        gc.collect()
        gc.freeze()

    async def _start_domain(self) -> None:
        """The domain started on its store; or, that store out of reach and `wait_for_store`, its boot
        policy and service switches from the cache (StartError where there is none)."""
        domain = self.built
        try:
            await domain.start()
            return
        except StoreUnreachable as e:
            if not self.wait_for_store:
                raise StartError(str(e)) from None
            why = str(e)
        try:
            cached = await domain.policy.load_cached()
        except ValueError as e:
            raise StartError(f"{why}; and {e}") from None
        if cached is None:
            raise StartError(f"{why}; and no boot index is cached in {self.state_dir} yet (the first start that "
                             "reaches the database keeps one), so there is nothing to answer the nodes with")
        domain.services.assume(cached.services)
        await domain.start_offline()
        self.store_down = why
        self._cached = cached
        mine = sum(1 for spec in domain.policy.index.by_uuid.values() if spec.root is not None)
        log.warning("store: %s. Starting on the boot index cached at %s (%d bootable server(s), as of %s): no "
                    "export is changed or removed without the store (a target daemon that holds none gets the "
                    "cached ones), and API calls that need the store answer 503 until it is back", why,
                    domain.policy.cache_path, mine,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cached.written_at)))

    async def _export_cached(self) -> None:
        """The store out of reach and the target daemon empty (its host restarted): the exports from the
        cache; a failure is said and the start goes on (the store's reconcile exports them later)."""
        if self._cached is None:
            return
        try:
            count = await self.built.export_cached(self._cached)
        except StorageError as e:
            log.warning("export: the target daemon holds no target and the cached ones could not be exported: %s", e)
            return
        if count:
            log.warning("export: the target daemon held no target (a host restart?): exported %d target(s) as the "
                        "cached boot index has them", count)

    async def _with_the_store(self) -> None:
        """What a start does once the store answers: the admin token, the reconcile, the index re-read."""
        domain = self.built
        await self._ensure_admin_token()
        report = await domain.reconcile()
        for line in report.problems:
            log.warning("reconcile: %s", line)
        await domain.policy.refresh()

    async def _until_the_store_is_back(self) -> None:
        domain = self.built
        delay = STORE_RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await domain.store.call(domain.store.sync.ping)
                await domain.start()  # each part starts once, whatever an earlier try got through
                await self._with_the_store()
            except StoreError as e:
                self.store_down = str(e)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                log.info("store: %s (trying again in %.0f s)", e, delay)
                continue
            except Exception as e:  # a reconcile that failed for another reason: tried again, never given up
                self.store_down = f"reachable, but the rest of the start failed: {e}"
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                log.exception("store: reachable, but the rest of the start failed (trying again in %.0f s)", delay)
                continue
            self.store_down = ""
            self._cached = None
            log.warning("store: reachable again; reconciled and serving its boot index")
            return

    async def _ensure_admin_token(self) -> None:
        # Only once everything is bound: a failed start must not consume the one-time token.
        token = await self.built.users.ensure_admin_token(self.config.api.admin_token)
        if token is not None:
            self.admin_token_printed = token
            # Printed once, on first start: only its hash is stored.
            log.warning("admin token (shown once): %s", token)

    def health(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        domain = self.domain
        switches: Mapping[str, bool] = domain.services if domain is not None else {}
        for slot in self.slots:
            state = slot.health.state
            if state == "running" and not switches.get(slot.name, True):
                state = "disabled"  # switched off at run time; its sockets stay bound
            out[slot.name] = {"state": state, "detail": slot.health.detail}
            if slot.name == "api":
                out["http-boot"] = {"state": "disabled" if not switches.get("http-boot", True) else state,
                                    "detail": "/boot on the API listener"}
        if domain is None:
            return out
        last = domain.exports.last_state
        if domain.driver.name == "none":
            # Known from the start, before the first apply has reported it.
            out["export"] = {"state": "unavailable", "detail": str(getattr(domain.driver, "reason", "no driver"))}
        elif last is not None and not last.available and out["export"]["state"] == "running":
            out["export"] = {"state": "unavailable", "detail": last.detail}
        out["storage"] = {"state": "running", "detail": domain.backend.name}
        if self.config.store.url:
            out["store"] = ({"state": "unavailable", "detail": f"{self.store_down}; answering nodes from the "
                             "cached boot index"} if self.store_down else {"state": "running", "detail": "PostgreSQL"})
        return out

    async def stop(self) -> None:
        """Idempotent; stops the services in reverse order of start."""
        if self._store_task is not None:
            task, self._store_task = self._store_task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in reversed(self.slots):
            if slot.service is not None and slot.health.state in ("running", "failed"):
                try:
                    await asyncio.wait_for(slot.service.stop(), timeout=4)
                except Exception as e:
                    log.warning("%s: stop: %s", slot.name, e)
                slot.health = Health("off", "stopped")
        if self.domain is not None and not self._closed:
            self._closed = True
            await self.domain.stop()
        self._unlock()
        self._stopped.set()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    def _fatal_for(self, name: str) -> Callable[[BaseException], None]:
        return lambda error: self.fail(name, error)

    def fail(self, name: str, error: BaseException) -> None:
        """A service's fatal error: everything stops, and `wait()` raises FatalError naming it."""
        for slot in self.slots:
            if slot.name == name:
                slot.health = Health("failed", str(error))
        if self._fatal is None:  # the first one is the cause; later ones are its consequences
            log.error("fatal: %s: %s", name, error)
            self._fatal = FatalError(f"{name}: {error}")
        self._stopped.set()

    async def reload(self) -> None:
        """SIGHUP: re-read boot profiles; transfers in flight keep going."""
        from appliance.config import ConfigError, load_config

        try:
            fresh = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused: %s", e)
            return
        domain = self.built
        domain.policy.profiles = dict(fresh.boot.profiles)
        domain.servers.profiles = tuple(fresh.boot.profiles)
        await domain.policy.refresh()
        log.info("reloaded boot profiles: %s", ", ".join(sorted(fresh.boot.profiles)))

    async def wait(self) -> None:
        await self._stopped.wait()
        if self._fatal is not None:
            raise self._fatal


def _bmc_of(server: Any) -> Any:
    """The node's BMC from its record (bmc/: Redfish or IPMI), or None when it has none."""
    if not server.bmc_url:
        return None
    import bmc

    return bmc.controller(server.bmc_url, server.bmc_user, server.bmc_password)


async def _scrub(image: str, template: str, version: str, source: str) -> list[str]:
    """A captured root: the node's identity out, the new version's stamp in (images/scrub.py)."""
    from images.scrub import scrub_identity, stamp_template

    changed = await scrub_identity(image)
    await stamp_template(image, template, version, source)
    return changed


async def _start_one(slot: ServiceSlot) -> None:
    assert slot.service is not None
    try:
        await slot.service.start()
    except StartError:
        raise
    except BindError as e:  # names the address that failed (DHCP binds two ports, say which)
        raise StartError(f"{slot.name}: {e}") from None
    except OSError as e:
        host, _, port = slot.describe.partition("+")[0].rpartition(":")
        raise explain_bind_error(slot.name, host or "?", int(port) if port.isdigit() else 0, e) from None
    except (RuntimeError, StorageError) as e:  # e.g. a tgtd control port that another tgtd serves
        raise StartError(f"{slot.name}: {e}") from None


class _WebService:
    """The aiohttp app served with AppRunner/TCPSite inside the loop we own."""

    def __init__(self, appliance: Appliance) -> None:
        self.appliance = appliance
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        a = self.appliance
        context = await self._tls_context(a.tls) if a.tls else None
        app = a.web_app()
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        listen = [(a.config.api.listen, None)] + ([(a.tls_listen, context)] if context else [])
        for address, ssl_context in listen:
            host, port = split_host_port(address)
            try:
                await web.TCPSite(self.runner, host, port, ssl_context=ssl_context).start()
            except OSError as e:
                await self.runner.cleanup()
                self.runner = None
                raise explain_bind_error("api", host, port, e) from None

    async def _tls_context(self, found: ServerCertificate) -> ssl.SSLContext:
        """The listener's context on the certificate the build found, said at every start with its
        fingerprint: what a client pins or checks."""
        try:
            context = await asyncio.to_thread(server_context, found.cert, found.key)
        except TlsError as e:  # changed on disk since the build
            raise StartError(f"api: {e}") from None
        log.info("api: TLS on %s with %s%s, SHA-256 fingerprint %s", self.appliance.tls_listen,
                 found.cert, " (self-signed, made now)" if found.made else "", found.fingerprint)
        return context

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


async def serve(config: Config, config_path: Path | None = None) -> None:
    """`cello serve`: build (inside the loop that runs it), start, run until a signal or a fatal error."""
    try:
        appliance = Appliance.build(config, config_path=config_path, wait_for_store=True)
    except StoreError as e:  # a store newer than this Cello, a bad URL: one line
        raise StartError(str(e)) from None
    await run_until_signalled(appliance)


async def run_until_signalled(appliance: Appliance, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
    import signal

    loop = asyncio.get_running_loop()
    # Handlers before start: the API answers before start() returns, and a SIGHUP or SIGTERM in that
    # window must not kill the process with the default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, appliance._stopped.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(appliance.reload()))
    try:
        await appliance.start()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        raise
    if on_ready is not None:
        await on_ready()
    try:
        await appliance.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await asyncio.wait_for(appliance.stop(), timeout=5)
