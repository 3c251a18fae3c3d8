"""Linux tgt export driver: a supervised `tgtd` (or the system's) driven with `tgtadm`.

`apply()` diffs the real state (`tgtadm --op show --mode target`, parsed) against the desired one and
runs only the difference, then reads tgtd again; back-to-back applies start from the previous one's
closing read (see `TgtDriver.apply`). LUN 0 is tgt's controller, so a volume of index i is LUN i + 1.
A restarted tgtd has no targets: the supervisor re-applies the last desired state.

(About 500 lines, one idea: turning the desired targets into the fewest tgtadm commands. The daemon's
life is iscsi/tgtd.py, the show parser iscsi/tgt_show.py.) The appliance's own tgtd outlives Cello:
`stop()` leaves it and every session running, the next `start()` adopts it and the first apply changes
only what differs; `teardown()` removes it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iscsi import names
from iscsi.model import ExportState, NameError_, Session, StorageError, TargetSpec
from iscsi.runner import CommandError, CommandResult, CommandRunner, default_runner
from iscsi.tgt_show import TgtShowError, TgtTarget, parse_show
from iscsi.tgtd import TgtdProcess

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/tgtd")
TGT_ID_LEN = 36  # tgt keeps the first 36 chars of scsi_sn and scsi_id (SCSI_SN_LEN, SCSI_ID_LEN)
DELETE_PARALLEL = 4  # tgtadm processes in flight while an apply deletes targets
# An apply this soon after the last one starts from that one's closing show (see TgtDriver.apply);
# later, it reads tgtd afresh, so a change made behind the driver is repaired by the next apply.
REUSE_SHOW_FOR = 2.0
SESSIONS_FRESH = 0.5  # seconds a read of who is logged in answers further session checks


def _is_address(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Known:
    """What an apply's closing show read: the start of the next apply's diff."""

    generation: int  # of the tgtd it was read from (TgtdProcess.generation)
    at: float  # loop time
    targets: dict[int, TgtTarget]


@dataclass(frozen=True)
class _Want:
    iqn: str
    luns: dict[int, tuple[str, str, str]]  # tgt LUN -> (path, serial, scsi_id)
    chap: tuple[str, str] | None
    acl: tuple[str, ...]
    mutual: tuple[str, str] | None = None


def _want(spec: TargetSpec) -> _Want:
    """One target, every name checked against its whitelist (NameError_ before any command)."""
    names.iqn(spec.iqn)
    luns: dict[int, tuple[str, str, str]] = {}
    for lun in spec.luns:
        names.volume(lun.volume)
        number = lun.index + 1
        if number in luns or not 0 <= lun.index <= names.MAX_LUN_INDEX:
            raise NameError_(f"target {spec.iqn!r}: LUN index {lun.index} invalid or used twice")
        luns[number] = (names.path(lun.path), names.serial(lun.serial), names.device_id(lun.device_id))
    a = spec.auth
    chap = None
    if a.chap_user is not None or a.chap_secret is not None:
        if a.chap_user is None or a.chap_secret is None:
            raise NameError_(f"target {spec.iqn!r}: CHAP needs both a user and a secret")
        chap = (names.chap_user(a.chap_user), names.chap_secret(a.chap_secret))
    mutual = None
    if a.chap_mutual_user is not None or a.chap_mutual_secret is not None:
        if chap is None or a.chap_mutual_user is None or a.chap_mutual_secret is None:
            raise NameError_(f"target {spec.iqn!r}: mutual CHAP needs CHAP and both a mutual user and secret")
        mutual = (names.chap_user(a.chap_mutual_user), names.chap_secret(a.chap_mutual_secret))
        if mutual[0] == chap[0] or mutual[1] == chap[1]:
            raise NameError_(f"target {spec.iqn!r}: mutual CHAP needs another user and secret than CHAP")
    portals = tuple(names.initiator_portal(p) for p in a.initiator_portals)
    # tgt admits an initiator that matches ANY ACL entry, address or name; ctld needs both to match.
    # With names given, only the names are bound: an address entry would open the target to every
    # initiator at that address, whatever its name.
    acl = tuple(names.iqn(n) for n in a.initiator_names) or portals
    return _Want(spec.iqn, luns, chap, acl or ("ALL",), mutual)


def _desired(targets: Sequence[TargetSpec],
             checked: Mapping[TargetSpec, _Want]) -> tuple[dict[str, _Want], dict[TargetSpec, _Want]]:
    """IQN -> what it should be, and every spec's check for the next call.

    `checked` holds the specs of the previous apply, already checked: TargetSpec is frozen, so an
    equal spec needs no second look, and a burst of applies over 1,000 unchanged targets costs a
    hash each instead of a dozen whitelist matches.
    """
    out: dict[str, _Want] = {}
    now: dict[TargetSpec, _Want] = {}
    secrets: dict[str, str] = {}
    for spec in targets:
        w = checked.get(spec) or _want(spec)
        now[spec] = w
        if spec.iqn in out:
            raise NameError_(f"target {spec.iqn!r} given twice")
        for account in (w.chap, w.mutual):
            if account is not None and secrets.setdefault(account[0], account[1]) != account[1]:
                raise NameError_(f"CHAP user {account[0]!r} has different secrets on two targets")
        out[spec.iqn] = w
    return out, now


class TgtDriver:
    name = "tgt"

    def __init__(
        self,
        control_port: int,
        portals: Sequence[str],
        *,
        manage_daemon: bool = True,
        runner: CommandRunner | None = None,
        nop_interval: int = 2,
        nop_count: int = 2,
        tgtd: str = "tgtd",
        tgtadm: str = "tgtadm",
        state_dir: Path,
        start_timeout: float = 10.0,
        restart_attempts: int = 5,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        if not 0 <= control_port < 65536:
            raise NameError_(f"invalid tgtd control port {control_port!r}")
        self.control_port = control_port
        self.portals = names.portals(portals)  # canonical; one given twice is refused
        if not self.portals:
            raise NameError_("at least one iSCSI portal is needed")
        self.manage_daemon = manage_daemon
        self._run = runner or default_runner()
        self.nop_interval = nop_interval
        self.nop_count = nop_count
        self._tgtd = tgtd
        self._tgtadm = tgtadm
        self.restart_attempts = restart_attempts
        self.on_fatal = on_fatal
        self._lock = asyncio.Lock()
        self.daemon = TgtdProcess(self.daemon_argv(), control_port, state_dir, self._answers,
                                  start_timeout=start_timeout)
        self.adopted = False  # this driver took over a tgtd an earlier Cello started
        self._session_show: asyncio.Task[dict[int, TgtTarget]] | None = None
        self._session_at = 0.0
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False
        self._desired: list[TargetSpec] | None = None
        self._tids: dict[str, int] = {}
        self._known: _Known | None = None  # what the closing show of the last apply read
        self._checked: dict[TargetSpec, _Want] = {}  # the last apply's specs, names checked
        self.restarts = 0
        self.commands = 0

    # -- daemon --------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return SOCKET_DIR / f"socket.{self.control_port}"

    def daemon_argv(self) -> list[str]:
        # tgtd keeps only the last `--iscsi portal=` option; several portals go comma-joined in one.
        return [self._tgtd, "-f", "-C", str(self.control_port),
                "--iscsi", ",".join(f"portal={p}" for p in self.portals)]

    def lun_number(self, index: int) -> int:
        return index + 1

    async def start(self) -> None:
        """Adopt the tgtd an earlier Cello left running (same state file), else start one of our own."""
        self._stopping = False
        if not self.manage_daemon:
            await self._adm("--op", "show", "--mode", "system")
            return
        if self.daemon.running:
            return
        if await self.daemon.adopt():
            self.adopted = True
            log.info("tgtd -C %s: adopted the running tgtd (pid %s); its targets and sessions stay as they are",
                     self.control_port, self.daemon.pid)
        else:
            await self._spawn()
        self._monitor = asyncio.create_task(self._supervise(), name=f"tgtd-{self.control_port}")

    async def _answers(self) -> bool:
        return (await self._adm("--op", "show", "--mode", "system", check=False)).returncode == 0

    async def _spawn(self) -> None:
        if await self._answers():
            # the socket answers before our tgtd could have bound it: another tgtd owns this port
            raise StorageError(f"tgtd -C {self.control_port}: control port already served by another "
                               f"tgtd ({self.socket_path}), not one this appliance's state dir names; "
                               f"stop it or configure another control port")
        await self.daemon.spawn()

    async def _supervise(self) -> None:
        backoff = 0.2
        failures = 0  # restarts failed in a row
        while not self._stopping:
            if failures == 0:
                rc = await self.daemon.wait()
                if self._stopping:
                    return
                log.warning("tgtd -C %s died (exit %s); restarting and re-applying the exports",
                            self.control_port, "unknown" if rc is None else rc)
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                log.warning("restarting tgtd -C %s failed (%d of %d): %s", self.control_port, failures,
                            self.restart_attempts, exc)
                if failures >= self.restart_attempts:
                    # No tgtd means no node can log in to its root disk: the export service is over.
                    error = StorageError(f"tgtd -C {self.control_port} died and could not be restarted "
                                         f"({failures} attempts): {exc}")
                    if self.on_fatal is not None:
                        self.on_fatal(error)
                    return
                backoff = min(backoff * 2, 5.0)
                continue
            self.restarts += 1
            backoff, failures = 0.2, 0
            if self._desired is not None:
                try:
                    await self.apply(self._desired)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # tgtd runs; the next apply (any change, or reconcile) brings the targets back
                    log.exception("re-applying the exports after restarting tgtd -C %s failed",
                                  self.control_port)

    async def _stop_watching(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None

    async def stop(self) -> None:
        """Cello stops; tgtd, its targets and every node's session keep running. Idempotent.

        The next start adopts this tgtd. Removing the exports is `teardown()`, an operator's act.
        """
        await self._stop_watching()
        if self.manage_daemon and self.daemon.running:
            log.info("tgtd -C %s (pid %s) keeps serving the exports", self.control_port, self.daemon.pid)
        self.daemon.release()

    async def teardown(self, iqn_prefix: str | None = None) -> int:
        """Remove the exports on purpose: force-delete the targets (every node loses its disk), then stop
        the appliance's own tgtd. `iqn_prefix` limits it to Cello's targets on a system tgtd, which
        keeps running. Returns how many targets went."""
        await self._stop_watching()
        if self.manage_daemon and not self.daemon.running and not await self.daemon.adopt():
            if await self._answers():
                raise StorageError(f"tgtd -C {self.control_port} is not one this appliance started "
                                   f"(no live tgtd in {self.daemon.record_path}); not touching it")
            await self.daemon.forget()
            return 0
        removed = 0
        with contextlib.suppress(StorageError):
            async with self._lock:
                for tid, t in sorted((await self._show()).items()):
                    if iqn_prefix is None or t.iqn.startswith(iqn_prefix + ":"):
                        await self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(tid),
                                        check=False)
                        removed += 1
                self._desired, self._known = None, None
                self._tids.clear()
        if self.manage_daemon:
            await self._adm("--op", "delete", "--mode", "system", check=False)
            try:
                await asyncio.wait_for(self.daemon.wait(), 5)
            except TimeoutError:
                await self.daemon.terminate()
            await self.daemon.forget()
        return removed

    # -- tgtadm --------------------------------------------------------------------------

    async def _adm(self, *args: str, check: bool = True) -> CommandResult:
        self.commands += 1
        return await self._run([self._tgtadm, "-C", str(self.control_port), "--lld", "iscsi", *args],
                               check=check)

    async def _show(self) -> dict[int, TgtTarget]:
        self.commands += 1
        res = await self._run([self._tgtadm, "-C", str(self.control_port), "--lld", "iscsi",
                               "--op", "show", "--mode", "target"])
        try:
            # ~40 lines a target: parsing 1,000 of them is too long a stall for the event loop
            return await asyncio.to_thread(parse_show, res.stdout)
        except TgtShowError as exc:
            raise StorageError(f"tgtadm show: {exc}") from None

    async def _accounts(self) -> set[str]:
        self.commands += 1
        res = await self._run([self._tgtadm, "-C", str(self.control_port), "--lld", "iscsi",
                               "--op", "show", "--mode", "account"])
        return {line.strip() for line in res.stdout.splitlines()[1:] if line.strip()}

    async def sessions(self, iqn: str) -> list[Session]:
        """The initiators logged in to this target now, from tgtd's I_T nexus list.

        Callers that ask together share one show (a burst of 1,000 deletes is one read of tgtd, not
        1,000); a reading is reused for SESSIONS_FRESH seconds at most.
        """
        for t in (await self._shared_show()).values():
            if t.iqn == iqn:
                return [Session(initiator, address) for initiator, address in t.nexus.values()]
        return []

    async def all_sessions(self) -> dict[str, list[Session]]:
        """Every target's sessions, from the same shared show as `sessions`."""
        return {t.iqn: [Session(initiator, address) for initiator, address in t.nexus.values()]
                for t in (await self._shared_show()).values()}

    async def _shared_show(self) -> dict[int, TgtTarget]:
        loop = asyncio.get_running_loop()
        task = self._session_show
        if task is None or (task.done() and loop.time() - self._session_at > SESSIONS_FRESH):
            self._session_at = loop.time()
            task = self._session_show = loop.create_task(self._show())
        return await asyncio.shield(task)

    async def actual(self) -> ExportState:
        shown = await self._show()
        return ExportState(_state(shown, self._names_by_lun()))

    def _names_by_lun(self) -> dict[tuple[str, int], str]:
        return {(t.iqn, lun.index + 1): lun.volume for t in self._desired or () for lun in t.luns}

    async def apply(self, targets: Sequence[TargetSpec]) -> ExportState:
        """Make tgtd's targets equal `targets`; returns what a show read after the last command.

        An apply that follows another within REUSE_SHOW_FOR seconds diffs against what that one's
        closing show read, if nothing else can have changed it: this driver's own tgtd, the same
        process, and that apply ran to its end. A show of 1,000 targets costs tens of ms (tgtd's and
        ours), and a burst of deletes is a run of applies back to back. Had someone changed tgtd
        behind the driver anyway, a command fails or the closing show differs from the desired
        targets and LUNs, and the apply runs again from what tgtd shows. The closing show is never
        skipped: it is how a caller learns that a removed LUN is really gone before it destroys the
        volume.
        """
        want, self._checked = _desired(targets, self._checked)
        async with self._lock:
            self._desired = list(targets)
            names_by_lun = self._names_by_lun()
            expected = {t.iqn: {lun.volume: lun.index + 1 for lun in t.luns} for t in targets}
            known = self._take_known()
            try:
                shown = await self._converge(want, known if known is not None else await self._show())
                real = _state(shown, names_by_lun)
                stale = known is not None and real != expected
            except CommandError as exc:
                if known is None:
                    raise
                log.info("tgtd -C %s: a command failed on the reused show (%s)", self.control_port, exc)
                shown, stale = await self._show(), True
            if stale:
                log.warning("tgtd -C %s was changed behind this driver; applying again from what it shows",
                            self.control_port)
                shown = await self._converge(want, shown)
                real = _state(shown, names_by_lun)
            state = ExportState(real, True, f"tgt: {len(shown)} targets on control port {self.control_port}")
            if self.manage_daemon:
                # the next apply changes this reading in place, so it must be no one else's
                self._known = _Known(self.daemon.generation, asyncio.get_running_loop().time(), shown)
        return state

    def _take_known(self) -> dict[int, TgtTarget] | None:
        """The last closing show, if an apply may start from it (see `apply`); taken, so used once."""
        known, self._known = self._known, None
        if (known is None or not self.manage_daemon  # a system tgtd is the host's too: always read it
                or known.generation != self.daemon.generation or not self.daemon.running
                or asyncio.get_running_loop().time() - known.at > REUSE_SHOW_FOR):
            return None
        return known.targets

    async def _converge(self, want: dict[str, _Want], have: dict[int, TgtTarget]) -> dict[int, TgtTarget]:
        """Run the commands that turn `have` (changed in place) into `want`; then show what is there."""
        # tgt never shows CHAP secrets, so the account list matters only where CHAP is in play.
        secrets = self.daemon.secrets  # CHAP user -> hash of the secret this driver set
        before = dict(secrets)
        chap = any(w.chap or w.mutual for w in want.values()) or bool(secrets)
        accounts = await self._accounts() if chap else set()
        by_iqn = {t.iqn: t for t in have.values()}
        gone = sorted((t for t in have.values() if t.iqn not in want), key=lambda t: t.tid)
        await self._delete_targets(gone)
        for t in gone:
            del have[t.tid]
            self._tids.pop(t.iqn, None)
        for iqn, w in sorted(want.items()):
            cur = by_iqn.get(iqn)
            if cur is None or cur.tid not in have:
                cur = await self._create(w, have)
            await self._sync(cur, w, accounts)
        # Accounts this driver made that no target wants any more.
        wanted_users = {a[0] for w in want.values() for a in (w.chap, w.mutual) if a}
        for user in sorted(set(secrets) - wanted_users):
            if user in accounts:
                await self._adm("--op", "delete", "--mode", "account", "--user", user, check=False)
            del secrets[user]
        if secrets != before and self.manage_daemon:
            await self.daemon.save()  # so that the Cello adopting this tgtd knows which accounts are right
        return await self._show()

    async def _delete_targets(self, gone: Sequence[TgtTarget]) -> None:
        """`--force`: the server is going, so its node's session goes too (else tgt refuses the delete).

        tgtd runs one management request at a time, but starting the next tgtadm while tgtd works on
        the previous one hides the process start; every delete is tried, then the first failure raised.
        """
        sem = asyncio.Semaphore(DELETE_PARALLEL)

        async def delete(t: TgtTarget) -> None:
            async with sem:
                await self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(t.tid))

        results = await asyncio.gather(*(delete(t) for t in gone), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _create(self, w: _Want, have: dict[int, TgtTarget]) -> TgtTarget:
        tid = self._tids.get(w.iqn)
        if tid is None or tid in have:
            used = set(have) | {t for i, t in self._tids.items() if i != w.iqn}
            tid = next(n for n in range(1, len(used) + 2) if n not in used)
        await self._adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", w.iqn)
        self._tids[w.iqn] = tid
        for key, value in (("nop_interval", self.nop_interval), ("nop_count", self.nop_count)):
            await self._adm("--op", "update", "--mode", "target", "--tid", str(tid), "-n", key, "-v", str(value))
        cur = TgtTarget(tid, w.iqn, nop_interval=self.nop_interval, nop_count=self.nop_count)
        have[tid] = cur
        return cur

    async def _sync(self, cur: TgtTarget, w: _Want, accounts: set[str]) -> None:
        tid = str(cur.tid)
        self._tids[w.iqn] = cur.tid
        for key, value, now in (("nop_interval", self.nop_interval, cur.nop_interval),
                                ("nop_count", self.nop_count, cur.nop_count)):
            if now != value:
                await self._adm("--op", "update", "--mode", "target", "--tid", tid, "-n", key, "-v", str(value))
        for number, old in sorted(cur.luns.items()):
            if number not in w.luns or w.luns[number][0] != old.path:
                await self._adm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", str(number))
                del cur.luns[number]
        for number, (path, serial, scsi_id) in sorted(w.luns.items()):
            lun = cur.luns.get(number)
            if lun is None:
                await self._adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", str(number),
                                "-b", path)
            if lun is None or lun.serial != serial[:TGT_ID_LEN] or lun.scsi_id != scsi_id[:TGT_ID_LEN]:
                await self._adm("--op", "update", "--mode", "logicalunit", "--tid", tid, "--lun", str(number),
                                "--params", f"scsi_sn={serial},scsi_id={scsi_id}")
        for entry in cur.acl:
            if entry not in w.acl:
                flag = "-I" if entry == "ALL" or _is_address(entry) else "-Q"
                await self._adm("--op", "unbind", "--mode", "target", "--tid", tid, flag, entry)
        for entry in w.acl:
            if entry not in cur.acl:
                flag = "-I" if entry == "ALL" or _is_address(entry) else "-Q"
                await self._adm("--op", "bind", "--mode", "target", "--tid", tid, flag, entry)
        await self._sync_account(cur, w.chap, accounts, outgoing=False)
        await self._sync_account(cur, w.mutual, accounts, outgoing=True)

    async def _sync_account(self, cur: TgtTarget, want: tuple[str, str] | None, accounts: set[str], *,
                            outgoing: bool) -> None:
        """Bind the one account `want` names to the target (incoming: the node's CHAP; outgoing: the
        target's own name for mutual CHAP), and unbind every other one of that direction."""
        tid = str(cur.tid)
        direction = ["--outgoing"] if outgoing else []
        bound = cur.outgoing if outgoing else cur.accounts
        for user in list(bound):
            if want is None or user != want[0]:
                await self._adm("--op", "unbind", "--mode", "account", "--tid", tid, "--user", user, *direction)
                bound.remove(user)
        if want is None:
            return
        user, secret = want
        if self.daemon.secrets.get(user) != _secret_hash(user, secret):
            # tgt never shows a secret: an account not made (with this secret) by us is remade.
            if user in accounts:
                await self._adm("--op", "delete", "--mode", "account", "--user", user)
                accounts.discard(user)
            await self._adm("--op", "new", "--mode", "account", "--user", user, "--password", secret)
            accounts.add(user)
            self.daemon.secrets[user] = _secret_hash(user, secret)
            if user in bound:
                bound.remove(user)
        if user not in accounts:
            await self._adm("--op", "new", "--mode", "account", "--user", user, "--password", secret)
            accounts.add(user)
        if user not in bound:
            try:
                await self._adm("--op", "bind", "--mode", "account", "--tid", tid, "--user", user, *direction)
            except CommandError:
                # deleting an account unbinds it everywhere in some tgt versions, not in others
                shown = (await self._show()).get(cur.tid, cur)
                if user not in (shown.outgoing if outgoing else shown.accounts):
                    raise
            bound.append(user)


def _secret_hash(user: str, secret: str) -> str:
    return hashlib.sha256(f"{user}\0{secret}".encode()).hexdigest()


def _state(shown: dict[int, TgtTarget], names_by_lun: dict[tuple[str, int], str]) -> dict[str, dict[str, int]]:
    """IQN -> {volume: LUN}. Volumes are named from the desired state, else by their backing file."""
    out: dict[str, dict[str, int]] = {}
    for t in shown.values():
        luns = out.setdefault(t.iqn, {})
        for number, lun in t.luns.items():
            name = names_by_lun.get((t.iqn, number))
            if name is None and lun.path:
                stem = Path(lun.path).name
                name = Path(lun.path).parent.name if stem == "disk.img" else stem.removesuffix(".img")
            luns[name or f"lun{number}"] = number
    return out
