""""Why didn't it boot?": the last step of the boot path a node reached, and what is wrong, in plain words.

`diagnose(facts)` is pure: it reads a `BootFacts` snapshot of what the appliance saw and holds — the
server's record, its template version, its root volume, the export, the service switches, the node's
boot events (DHCP offers, TFTP and HTTP fetches, refusals) and its iSCSI sessions — and says, step by
step along the boot path, how far the latest boot attempt got:

    dhcp (an offer or ack sent) → loader → config → kernel → initrd → iscsi (a session: logged in)

then names the first thing that explains the missing step. Problems of the record come first (they
stop every boot, whatever the node does): not available, template version deleted, root disk gone,
export unavailable. `gather_facts` builds the snapshot from the domain (on the store's thread, and
one `sessions()` call of the export driver).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from domain.bindings import ipv4_of
from domain.errors import NotFound
from domain.store import ServerRow, Store, TemplateVersion, VolumeRow
from iscsi.tgt import TgtDriver

if TYPE_CHECKING:
    from domain.core import Domain

STEPS = ("dhcp", "loader", "config", "kernel", "initrd", "iscsi")
STEP_TEXT = {
    "dhcp": "DHCP offer sent",
    "loader": "loader fetched",
    "config": "boot config fetched",
    "kernel": "kernel fetched",
    "initrd": "initrd fetched",
    "iscsi": "logged in to its iSCSI root disk",
}
# A node that fetched its initrd this recently and holds no session yet is still logging in (the initramfs
# brings its link up first; after switch_root its iscsid logs in again).
LOGIN_GRACE = 20.0  # seconds
LOG_TAIL = 64 * 1024  # bytes of the target's log read for refused logins
# Events further apart than this belong to different boot attempts; the latest attempt is diagnosed.
BOOT_GAP = 300.0  # seconds


@dataclass(frozen=True)
class BootFacts:
    """What the appliance saw of one server's node, and what it holds for it."""

    server: str
    state: str
    reason: str
    template: str
    version: str
    profile_loader: str  # "pxelinux" | "ipxe"
    version_present: bool  # the template version is still in the store
    kernel: str  # the template version's files ("" when the version is gone)
    initrd: str
    root_volume: str  # the OS volume's name ("" = the store has none)
    root_state: str  # its record's state ("" = none)
    root_on_backend: bool | None  # the backend still has the volume (None = not known)
    target: str  # the server's target IQN
    exported: bool | None  # the target is in the last applied export state (None: nothing applied yet)
    export_available: bool  # the export driver is there and working
    export_detail: str
    services: Mapping[str, bool]
    macs: tuple[str, ...]
    configured_address: str  # "" = none
    bound_address: str  # the address its DHCP last named (the binding), "" = none known now
    sessions: tuple[str, ...]  # who is logged in to its target now
    events: tuple[Mapping[str, Any], ...]  # its boot events (dhcp, tftp, http, denied), any order
    chap: bool
    login_refusals: tuple[str, ...] = ()  # the export driver's log lines refusing this node's initiator
    now: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Step:
    step: str
    seen: bool
    at: float | None = None
    detail: str = ""

    def as_json(self) -> dict[str, object]:
        return {"step": self.step, "text": STEP_TEXT[self.step], "seen": self.seen, "at": self.at,
                "detail": self.detail}


@dataclass(frozen=True)
class Diagnosis:
    server: str
    reached: str | None  # the last step of the latest attempt ("iscsi" = booted); None = nothing seen
    problem: str | None  # a short code; None = nothing wrong seen
    summary: str  # one plain sentence
    hints: tuple[str, ...]
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_json(self) -> dict[str, object]:
        return {"server": self.server, "ok": self.ok, "reached": self.reached,
                "reached_text": STEP_TEXT[self.reached] if self.reached else "nothing seen",
                "problem": self.problem, "summary": self.summary, "hints": list(self.hints),
                "steps": [s.as_json() for s in self.steps]}


# --- classifying the node's events --------------------------------------------------------------


def _file_kind(file: str, facts: BootFacts) -> str:
    """Which step a fetched file stands for."""
    name = file.split("?", 1)[0]
    if "pxelinux.cfg/" in name or name.endswith(".ipxe") or name.endswith("grub.cfg"):
        return "config"
    if facts.kernel and name.endswith(facts.kernel):
        return "kernel"
    if facts.initrd and name.endswith(facts.initrd):
        return "initrd"
    return "loader"


def _ok(event: Mapping[str, Any]) -> bool:
    if event.get("kind") == "tftp":
        return event.get("outcome") == "ok"
    if event.get("kind") == "http":
        return event.get("status") in (200, 206)
    return event.get("kind") == "dhcp"


def latest_attempt(events: Iterable[Mapping[str, Any]], gap: float = BOOT_GAP) -> list[Mapping[str, Any]]:
    """The events of the latest boot attempt, oldest first: the last run of events no more than
    `gap` seconds apart."""
    ordered = sorted(events, key=lambda e: float(e.get("at", 0.0)))
    start = 0
    for i in range(1, len(ordered)):
        if float(ordered[i]["at"]) - float(ordered[i - 1]["at"]) > gap:
            start = i
    return ordered[start:]


def _steps(facts: BootFacts, attempt: Sequence[Mapping[str, Any]]) -> dict[str, Step]:
    seen: dict[str, Step] = {}
    for e in attempt:
        kind = e.get("kind")
        at = float(e.get("at", 0.0))
        if kind == "dhcp":
            seen["dhcp"] = Step("dhcp", True, at, f"{e.get('reply', 'offer')} of {e.get('file', '?')} "
                                                  f"to {e.get('mac', '?')}")
        elif kind in ("tftp", "http") and _ok(e):
            step = _file_kind(str(e.get("file", "")), facts)
            seen[step] = Step(step, True, at, f"{e.get('file')} over {kind} by {e.get('client', '?')}")
    if facts.sessions:
        seen["iscsi"] = Step("iscsi", True, facts.now, "; ".join(facts.sessions))
    return seen


def _when(at: float | None, now: float) -> str:
    if at is None:
        return ""
    ago = max(0.0, now - at)
    if ago < 120:
        return f"{ago:.0f} s ago"
    if ago < 7200:
        return f"{ago / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


# --- the diagnosis ------------------------------------------------------------------------------


def diagnose(facts: BootFacts) -> Diagnosis:
    attempt = latest_attempt(facts.events)
    seen = _steps(facts, attempt)
    reached = next((s for s in reversed(STEPS) if s in seen), None)
    steps = tuple(seen.get(s, Step(s, False)) for s in STEPS)

    def out(problem: str | None, summary: str, *hints: str) -> Diagnosis:
        return Diagnosis(facts.server, reached, problem, summary, tuple(hints), steps)

    # 1. The record: what stops every boot whatever the node does.
    if facts.state != "available":
        if facts.state in ("creating", "exporting"):
            return out("not_ready", f"the server is still being made ({facts.state}): it boots nothing until "
                                    "it is available", "wait for the create workflow (cello server show)")
        return out("not_available", f"the server is {facts.state}" + (f": {facts.reason}" if facts.reason else "")
                   + "; it boots nothing until it is available",
                   "its reason says what failed; delete and create it again, or reconcile")
    if not facts.version_present:
        return out("template_version_deleted",
                   f"its template version {facts.template}@{facts.version} was deleted: there is no kernel "
                   "and initrd to boot, so the appliance does not answer its node",
                   f"move it to a version that exists: cello server upgrade {facts.server} --to {facts.template}")
    if not facts.root_volume or facts.root_state != "available" or facts.root_on_backend is False:
        what = (f"its root disk {facts.root_volume} is gone from the storage backend"
                if facts.root_volume and facts.root_on_backend is False
                else f"its root disk record is {facts.root_state or 'missing'}")
        return out("root_disk_missing", what + ": the node has nothing to log in to",
                   "cello reconcile says what it can repair; a lost volume means a new server (or a rebuild)")
    if not facts.export_available:
        return out("export_unavailable", f"the iSCSI export is unavailable ({facts.export_detail or 'no detail'}): "
                                         "no node can log in to its root disk",
                   "see `cello service list` and the appliance log (tgtd / ctld)")
    if facts.exported is False:
        return out("not_exported", f"its target {facts.target} is not exported now",
                   "cello reconcile re-applies the exports")

    # 2. The boot path, from the node's latest attempt.
    services = facts.services
    if reached == "iscsi":
        return out(None, f"the node is logged in to its root disk ({'; '.join(facts.sessions)}): it booted")
    if "dhcp" not in seen:
        if not services.get("dhcp", True):
            return out("dhcp_disabled", "the dhcp service is disabled: the appliance answers no node",
                       "cello service enable dhcp")
        hints = ["is the node on this LAN (or behind a relay that forwards to the appliance), powered on and "
                 "set to boot from the network?",
                 "does the appliance's proxyDHCP see the LAN's broadcasts (dhcp.interface, a firewall on UDP 67)?"]
        if not facts.macs:
            hints.append("the record names no MAC: a board with a broken SMBIOS UUID is found only by its MAC")
        return out("no_dhcp", "no DHCP request of the node was seen", *hints)
    loader_refusals = [e for e in attempt if e.get("kind") == "tftp" and e.get("outcome") == "disabled"]
    denied = [e for e in attempt if e.get("kind") == "denied"]
    after = seen[reached or "dhcp"].at
    if reached == "dhcp":
        if denied:  # a config asked for straight away (iPXE's script), from an address not the node's
            return _denied(out, denied[-1], facts)
        if not services.get("tftp", True) or loader_refusals:
            return out("tftp_disabled", "a DHCP offer was sent, but the tftp service is disabled: the node's "
                                        "loader request gets no answer", "cello service enable tftp")
        fetches = any(e.get("kind") in ("tftp", "http") for e in attempt)  # failed ones: it had an address
        acked = any(e.get("reply") == "ack" for e in attempt if e.get("kind") == "dhcp")
        if not facts.bound_address and not acked and not fetches:
            return out("no_site_dhcp",
                       f"the proxyDHCP offered a boot file ({_when(after, facts.now)}), but the node never took "
                       "an address: no DHCP request to a site DHCP server was seen, and a PXE client boots only "
                       "once a DHCP server gives it an address",
                       "does the site's DHCP server answer on this LAN (is it running, is its pool full, does it "
                       "serve this MAC)?",
                       "the appliance hands out no addresses: it is a proxyDHCP, beside the site's server")
        return out("no_tftp", f"a DHCP offer was sent and the node took an address ({facts.bound_address or 'seen'})"
                              ", but it fetched no loader over TFTP",
                   "is the next-server right (appliance.advertise: the address the node can reach)?",
                   "does a firewall drop TFTP (UDP 69 and the transfer's high ports) between the node and the "
                   "appliance?")
    if reached == "loader":
        if denied:
            return _denied(out, denied[-1], facts)
        if facts.profile_loader == "ipxe" and not services.get("http-boot", True):
            return out("http_boot_disabled", "the loader (iPXE) was fetched, but the http-boot service is disabled: "
                                             "its script request gets no answer", "cello service enable http-boot")
        if not services.get("tftp", True):
            return out("tftp_disabled", "the loader was fetched, but the tftp service is now disabled: its config "
                                        "request gets no answer", "cello service enable tftp")
        return out("no_config", "the node fetched its loader but asked for no boot config",
                   "iPXE: does it reach the HTTP address in its DHCP answer (api.listen, appliance.advertise)?",
                   "pxelinux: look at the node's console; its config requests are pxelinux.cfg/<uuid>, 01-<mac>")
    if denied and (after is None or float(denied[-1].get("at", 0)) >= after):
        return _denied(out, denied[-1], facts)
    if reached == "config":
        return out("no_kernel", f"the node fetched its boot config but not the kernel {facts.kernel}",
                   "is the kernel file still in the boot files root?", "look at the node's console")
    if reached == "kernel":
        return out("no_initrd", f"the node fetched the kernel but not the initrd {facts.initrd}",
                   "is the initrd file still in the boot files root?", "look at the node's console")
    # Kernel and initrd fetched, and no session on the target.
    if facts.login_refusals:
        return out("login_refused",
                   f"the node fetched its kernel and initrd ({_when(after, facts.now)}), but the target refused its "
                   f"iSCSI login: {facts.login_refusals[-1]}",
                   "a wrong CHAP secret: the node must boot the config served now (its secret changes with an "
                   "upgrade), not an old copy" if facts.chap else "the initiator name must be the server's "
                   "(<iqn_prefix>:node-<uuid>)")
    if after is not None and facts.now - after < LOGIN_GRACE:
        return out("logging_in", f"the node fetched its kernel and initrd {_when(after, facts.now)} and holds no "
                                 "iSCSI session yet: its initramfs is logging in", "ask again in a moment")
    hints = ["look at the node's console: the initramfs says why its iSCSI login failed",
             "the export driver's log says whether it refused a login (tgtd's log in the state dir)"]
    if facts.chap:
        hints.insert(0, "a login with a wrong CHAP secret is refused: the node must boot the config served now "
                        "(its secret changes with an upgrade), not an old copy")
    return out("no_iscsi_login",
               f"the node fetched its kernel and initrd ({_when(after, facts.now)}) but holds no iSCSI session on "
               f"{facts.target}: its login was refused (CHAP or the initiator name) or never reached the portal",
               *hints)


def _denied(out: Callable[..., Diagnosis], event: Mapping[str, Any], facts: BootFacts) -> Diagnosis:
    client = str(event.get("client", "?"))
    where = facts.bound_address or facts.configured_address
    because = (f"its DHCP last put the node at {where}" if where
               else "no DHCP of the node was seen recently and the server has no configured address")
    return out("config_denied",
               f"the boot config ({event.get('file', '?')}) was refused to {client} over {event.get('via', '?')}: "
               f"it carries the node's CHAP secret and goes only to the node's address, and {because}",
               "a node behind a relay or NAT: give the server its address (hostname/address in its record)",
               "a reboot of the node re-learns its address from its DHCP")


def login_refusals(log_text: str, initiator: str) -> tuple[str, ...]:
    """Pure: the last lines of the target's log that say it refused this initiator (tgtd writes
    `CHAP initiator auth.: authentication of <initiator> failed (wrong secret!?)`)."""
    words = ("fail", "refus", "reject", "denied")
    hits = [line.strip() for line in log_text.splitlines()
            if initiator in line and any(w in line.lower() for w in words)]
    return tuple(hits[-3:])


def _target_log(driver: object) -> str:
    """Blocking (run in a thread): the tail of the export driver's own log, where it keeps one (the
    supervised tgtd's); "" otherwise."""
    if not isinstance(driver, TgtDriver) or not driver.manage_daemon:
        return ""
    try:
        with open(driver.daemon.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# --- the snapshot ---------------------------------------------------------------------------------


def node_events(own: Iterable[Mapping[str, Any]], unattributed: Iterable[Mapping[str, Any]], server: str,
                addresses: Iterable[str]) -> list[Mapping[str, Any]]:
    """The server's own events, plus the fetches that named no server (a loader fetch does not: the
    TFTP tree knows the node only from its config fetch) made from one of the node's addresses."""
    kinds = ("dhcp", "tftp", "http", "denied")
    ips = {a for a in addresses if a}
    out = [e for e in own if e.get("kind") in kinds]
    seen_ids = {e.get("id") for e in out}
    for e in unattributed:
        if e.get("kind") not in ("tftp", "http") or e.get("server") not in (None, server) or e.get("id") in seen_ids:
            continue
        client = ipv4_of(str(e.get("client", "")).rsplit(":", 1)[0] if e.get("kind") == "tftp"
                         else str(e.get("client", "")))
        if client is not None and client in ips:
            out.append(e)
    return out


def read_record(store: Store, uuid: str) -> tuple[ServerRow | None, list[VolumeRow], TemplateVersion | None,
                                                     list[dict[str, object]], list[dict[str, object]]]:
    """On the store's thread: the server, its volumes, its template version, its events and the latest
    events of every node (where the fetches that named no server are)."""
    server = store.server(uuid)
    if server is None:
        return None, [], None, [], []
    versions = [v for v in store.template_versions(server.template) if v.version == server.version]
    return (server, store.volumes(uuid), versions[0] if versions else None, store.events(uuid, 500),
            store.events(None, 2000))


async def gather_facts(domain: Domain, uuid: str, may_act_for: Callable[[str], bool] = lambda owner: True) -> BootFacts:
    """The snapshot `diagnose` reads, for one server (NotFound for a missing one or another user's)."""
    uuid = uuid.lower()
    await domain.events.flush()  # the boot events of the last half second too
    server, volumes, version, own, recent = await domain.store.call(read_record, domain.store.sync, uuid)
    if server is None or not may_act_for(server.owner):
        raise NotFound(f"no server {uuid}")
    root = next((v for v in volumes if v.kind == "os" and v.idx == 0), None)
    on_backend: bool | None = None
    if root is not None:
        try:
            on_backend = root.name in {v.name for v in await domain.backend.list()}
        except Exception:  # a backend that cannot list says nothing here; the record still does
            on_backend = None
    iqn = domain.servers.iqn(uuid)
    last = domain.exports.last_state
    driver = domain.driver
    try:
        sessions = tuple(str(s) for s in await driver.sessions(iqn))
    except Exception:
        sessions = ()
    policy = domain.policy
    bound = policy.bindings.address_of_uuid(uuid) or next(
        (a for m in server.macs if (a := policy.bindings.address_of_mac(m)) is not None), None)
    configured = ipv4_of(server.address) if server.address else None
    # Where the node was: its binding, its configured address, and the clients of its own fetches and acks.
    addresses = {a for a in (bound, configured) if a}
    for e in own:
        client = str(e.get("client", ""))
        if e.get("kind") == "tftp":
            client = client.rsplit(":", 1)[0]
        if e.get("kind") in ("tftp", "http") or (e.get("kind") == "dhcp" and e.get("reply") == "ack"):
            if (ip := ipv4_of(client)) is not None and ip != "0.0.0.0":
                addresses.add(ip)
    profile = policy.profiles.get(server.profile)
    refusals = () if sessions else login_refusals(await asyncio.to_thread(_target_log, driver),
                                                  domain.servers.initiator(uuid))
    return BootFacts(
        server=uuid, state=server.state, reason=server.reason, template=server.template, version=server.version,
        profile_loader=profile.loader if profile is not None else "pxelinux", version_present=version is not None,
        kernel=version.kernel if version is not None else "", initrd=version.initrd if version is not None else "",
        root_volume=root.name if root is not None else "", root_state=root.state if root is not None else "",
        root_on_backend=on_backend, target=iqn, exported=None if last is None else iqn in last.targets,
        export_available=driver.name != "none" and (last is None or last.available),
        export_detail=last.detail if last is not None else "",
        services=dict(domain.services), macs=server.macs, configured_address=configured or "",
        bound_address=bound or "", sessions=sessions, events=tuple(node_events(own, recent, uuid, addresses)),
        chap=bool(server.chap_secret), login_refusals=refusals)
