"""The tiny template really boots: qemu (TCG) → Cello's initramfs → DHCP (dnsmasq) → iSCSI login (tgtd)
→ the node's own clone as root → `cello-root-ok <uuid>` on the serial console.

Also: CHAP + the OS LUN behind a data LUN, a failed login's report, the iBFT path (iPXE `sanhook`, no
ISCSI_* keys), and the `debian` template booting with Debian's own initramfs (minutes: debootstrap).

Topology, all inside network namespace `imgt-boot` (removed afterwards):
    imbr0 10.79.0.1/24  — dnsmasq as the site DHCP (+ TFTP for iPXE), tgtd portal 10.79.0.1:3260
    imtap0 on imbr0     — the VM's NIC (e1000)
Logs (serial, dnsmasq, tgtd) are kept in the pytest tmp folder and printed on failure.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from images.build import TemplateBuild, build_template
from images.rootfs import host_debian_mirror
from images.sources import DEFAULT_DEBIAN_SUITE, TemplateSourceError
from iscsi.model import VolumeBackend
from tests.integration.test_template_build import debugfs_cat, debugfs_write, make_backend

pytestmark = pytest.mark.system

# Per process: two runs of this suite at once (a developer's and CI's) must not share a namespace or tgtd.
NS = f"imgt-boot-{os.getpid()}"
BRIDGE, TAP = "imbr0", "imtap0"
HOST_IP = "10.79.0.1"
TGT_CONTROL_PORTS = range(50, 55)  # this area's tgtd control ports; the first free one is used
IQN_PREFIX = "iqn.2026-11.io.cello"
UUID_A = "7d3a1f52-9c0e-4b8a-a2f1-0000000000a1"
UUID_B = "7d3a1f52-9c0e-4b8a-a2f1-0000000000b2"
BOOT_TIMEOUT = 90.0  # TCG: ~20 s here; bounded so a broken initramfs cannot hang CI
DEBIAN_BOOT_TIMEOUT = 180.0  # systemd under TCG


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check, timeout=30)


def _ns(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _sh("ip", "netns", "exec", NS, *argv, check=check)


def _require_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the system tier runs as root (network namespaces, tgtd)")
    for tool in ("qemu-system-x86_64", "tgtd", "tgtadm", "dnsmasq", "ip", "debugfs"):
        assert shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"), f"{tool} is not installed"


@pytest.fixture
def netns() -> Iterator[None]:
    _require_tools()
    _sh("ip", "netns", "del", NS, check=False)
    _sh("ip", "netns", "add", NS)
    try:
        _ns("ip", "link", "set", "lo", "up")
        _ns("ip", "link", "add", BRIDGE, "type", "bridge")
        _ns("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        _ns("ip", "link", "set", BRIDGE, "up")
        _ns("ip", "tuntap", "add", "dev", TAP, "mode", "tap")
        _ns("ip", "link", "set", TAP, "master", BRIDGE)
        _ns("ip", "link", "set", TAP, "up")
        yield
    finally:
        _sh("ip", "netns", "del", NS, check=False)


@dataclass
class Daemons:
    logs: Path
    procs: list[subprocess.Popen[bytes]]
    tgt_port: int

    def tgtadm(self, *args: str) -> str:
        return _sh("tgtadm", "-C", str(self.tgt_port), "--lld", "iscsi", *args).stdout


def _tgtd_port_held(port: int) -> bool:
    """Whether a running tgtd holds this control port (tgtd keeps a lockf lock on socket.N.lock)."""
    path = Path(f"/var/run/tgtd/socket.{port}.lock")
    if not path.exists():
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1)
        return False
    finally:
        os.close(fd)


def _start_tgtd(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """tgtd in the namespace on the first control port of this area that no other tgtd holds."""
    for port in TGT_CONTROL_PORTS:
        if _tgtd_port_held(port):
            continue
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", NS, "tgtd", "-f", "-C", str(port),
                                     "--iscsi", f"portal={HOST_IP}:3260"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            show = _sh("tgtadm", "-C", str(port), "--op", "show", "--mode", "target", check=False)
            if show.returncode == 0:
                time.sleep(0.3)
                if proc.poll() is None:  # still alive: it holds the port's lock, so tgtadm talked to it
                    return proc, port
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"no free tgtd control port in {list(TGT_CONTROL_PORTS)}: " + _read(log))


@pytest.fixture
def daemons(netns: None, tmp_path: Path) -> Iterator[Daemons]:
    logs = tmp_path / "logs"
    logs.mkdir()
    tftp_root = tmp_path / "files"  # the boot tree the `built` fixture fills (for the iPXE/iBFT test)
    tftp_root.mkdir(exist_ok=True)
    conf = logs / "dnsmasq.conf"
    conf.write_text(
        "port=0\n"
        f"interface={BRIDGE}\nbind-interfaces\nno-resolv\nno-hosts\n"
        f"enable-tftp\ntftp-root={tftp_root}\n"
        "dhcp-range=10.79.0.100,10.79.0.150,255.255.255.0,1h\n"
        f"dhcp-leasefile={logs}/dnsmasq.leases\nlog-dhcp\nlog-facility={logs}/dnsmasq.log\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    with open(logs / "tgtd.log", "wb") as tgt_log:
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", NS, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground",
             f"--pid-file={logs}/dnsmasq.pid", "--user=root"], stdout=tgt_log, stderr=subprocess.STDOUT))
    tgtd, port = _start_tgtd(logs / "tgtd.log")
    procs.append(tgtd)
    d = Daemons(logs, procs, port)
    try:
        yield d
    finally:
        _sh("tgtadm", "-C", str(port), "--lld", "iscsi", "--op", "delete", "--force",
            "--mode", "target", "--tid", "1", check=False)
        _sh("tgtadm", "-C", str(port), "--op", "delete", "--mode", "system", check=False)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kernel_cmdline(uuid: str, lun: int, chap: tuple[str, str] | None = None) -> str:
    """The command line the boot config renderer gives nodes (the key names are fixed)."""
    iqn = f"{IQN_PREFIX}:{uuid}"
    initiator = f"{IQN_PREFIX}:node-{uuid}"
    auth = f"ISCSI_USERNAME={chap[0]} ISCSI_PASSWORD={chap[1]} " if chap else ""
    return (
        f"console=ttyS0 ISCSI_INITIATOR={initiator} ISCSI_TARGET_NAME={iqn} ISCSI_TARGET_IP={HOST_IP} "
        f"ISCSI_TARGET_PORT=3260 ISCSI_TARGET_GROUP=1 {auth}netroot=iscsi:{HOST_IP}::3260:{lun}:{iqn} "
        f"rd.iscsi.initiator={initiator} cello.server={uuid} cello.lun={lun} cello.poweroff panic=-1"
    )


async def boot_until_marker(
    kernel: Path, initrd: Path, uuid: str, serial: Path, *, bound: float = BOOT_TIMEOUT, memory: int = 512,
    lun: int = 1, chap: tuple[str, str] | None = None, cmdline: str | None = None,
) -> tuple[bool, float]:
    """Run the VM until it powers off (or the bound passes); True when the marker was printed."""
    append = kernel_cmdline(uuid, lun, chap) if cmdline is None else cmdline
    argv = [
        "ip", "netns", "exec", NS, "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-nodefaults",
        "-display", "none", "-no-reboot", "-serial", f"file:{serial}", "-uuid", uuid,
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
        "-device", "e1000,netdev=n0,mac=52:54:00:79:00:10",
    ]  # fmt: skip
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(proc.wait(), bound)
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = await asyncio.to_thread(_read, serial)
    return f"cello-root-ok {uuid}" in text, time.monotonic() - start


@dataclass(frozen=True)
class Built:
    backend: VolumeBackend
    build: TemplateBuild
    files: Path


@pytest.fixture
async def built(tmp_path: Path) -> Built:
    files = tmp_path / "files"
    backend = make_backend(tmp_path / "volumes")
    build = await build_template(backend, "tiny", None, "tiny", files, tmp_path / "work", lambda _: None)
    return Built(backend, build, files)


def export_lun1(daemons: Daemons, uuid: str, image: str, *, luns: dict[int, str] | None = None) -> None:
    """Target <prefix>:<uuid> (tid 1) with `image` as LUN 1, or with the given {lun: image} map."""
    daemons.tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", f"{IQN_PREFIX}:{uuid}")
    for lun, path in sorted((luns or {1: image}).items()):
        daemons.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", str(lun), "-b", path)
    daemons.tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
    for name in ("nop_interval", "nop_count"):
        daemons.tgtadm("--op", "update", "--mode", "target", "--tid", "1", "-n", name, "-v", "2")


def boot_failure(uuid: str, took: float, daemons: Daemons, serial: Path) -> str:
    return (
        f"no 'cello-root-ok {uuid}' after {took:.0f} s; logs kept in {daemons.logs}\n--- serial (tail)\n"
        + _read(serial)[-4000:] + "\n--- dnsmasq\n" + _read(daemons.logs / "dnsmasq.log")[-1500:]
        + "\n--- tgtd\n" + _read(daemons.logs / "tgtd.log")[-1500:]
    )


async def test_tiny_template_boots_from_its_iscsi_clone(daemons: Daemons, built: Built) -> None:
    backend, build, files = built.backend, built.build, built.files
    clone_a = await backend.clone_os("tiny", build.version, UUID_A)
    clone_b = await backend.clone_os("tiny", build.version, UUID_B)
    export_lun1(daemons, UUID_A, clone_a.path)

    serial = daemons.logs / "serial.log"
    ok, took = await boot_until_marker(files / build.kernel, files / build.initrd, UUID_A, serial)
    text = _read(serial)
    assert ok, boot_failure(UUID_A, took, daemons, serial)
    assert "cello-initramfs-failed" not in text
    assert "cello-initramfs: address 10.79.0." in text  # the address came from the site DHCP (dnsmasq)
    print(f"tiny boot to marker: {took:.1f} s")

    # The node wrote into its own clone; the template and the other node's clone never saw it.
    assert debugfs_cat(clone_a.path, "/cello-booted") == f"uuid={UUID_A}\nboots=1\n"
    assert debugfs_cat(backend.path("tiny-template"), "/cello-booted") == ""
    assert debugfs_cat(clone_b.path, "/cello-booted") == ""
    # Sparse stays sparse: the booted 100G clone holds only what the node wrote (no inode-table zeroing).
    (booted,) = [v for v in await backend.list() if v.name == f"tiny-OS-{UUID_A}"]
    assert booted.size == 100 * 1024**3 and booted.used < 64 * 1024 * 1024, booted


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(missing)"


async def test_tiny_boot_with_chap_picks_the_os_lun_among_data_luns(
    daemons: Daemons, built: Built, tmp_path: Path
) -> None:
    """CHAP from ISCSI_USERNAME/PASSWORD; the OS is LUN 2 behind a blank data LUN 1, so only the
    cello.lun selection finds it; the boot counter goes on from what the clone already holds."""
    backend, build, files = built.backend, built.build, built.files
    clone = await backend.clone_os("tiny", build.version, UUID_B)
    data = await backend.create_data("tiny", UUID_B, 1, 16 * 1024 * 1024)
    seed = tmp_path / "seed"
    seed.write_text(f"uuid={UUID_B}\nboots=4\n")
    debugfs_write(clone.path, seed, "/cello-booted")
    export_lun1(daemons, UUID_B, clone.path, luns={1: data.path, 2: clone.path})
    user, secret = "node-b", "s3cret-chap-42"
    daemons.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", secret)
    daemons.tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", user)

    serial = daemons.logs / "serial-chap.log"
    ok, took = await boot_until_marker(files / build.kernel, files / build.initrd, UUID_B, serial, lun=2,
                                       chap=(user, secret))
    assert ok, boot_failure(UUID_B, took, daemons, serial)
    # The kernel names the disks in the order they attach, which varies; the initramfs must pick
    # the device the kernel reports at SCSI LUN 2, whatever its name.
    console = _read(serial)
    chosen = re.search(r"root disk /dev/(sd[a-z]+) \(LUN 2\)", console)
    assert chosen is not None, console[-2000:]
    assert re.search(rf"sd \d+:\d+:\d+:2: \[{chosen.group(1)}\]", console), console[-2000:]
    assert debugfs_cat(clone.path, "/cello-booted") == f"uuid={UUID_B}\nboots=5\n"
    with open(data.path, "rb") as f:  # noqa: ASYNC230
        assert f.read(1024 * 1024) == bytes(1024 * 1024)  # the data LUN was not touched


async def test_tiny_initramfs_reports_a_failed_login(daemons: Daemons, built: Built) -> None:
    """Wrong CHAP secret: the initramfs says why (`cello-initramfs-failed ...`) and powers off."""
    backend, build, files = built.backend, built.build, built.files
    clone = await backend.clone_os("tiny", build.version, UUID_B)
    export_lun1(daemons, UUID_B, clone.path)
    daemons.tgtadm("--op", "new", "--mode", "account", "--user", "node-b", "--password", "right-secret-1")
    daemons.tgtadm("--op", "bind", "--mode", "account", "--tid", "1", "--user", "node-b")

    serial = daemons.logs / "serial-fail.log"
    ok, took = await boot_until_marker(files / build.kernel, files / build.initrd, UUID_B, serial,
                                       chap=("node-b", "wrong-secret-2"))
    text = _read(serial)
    assert not ok
    assert "cello-initramfs-failed iscsi-login" in text, text[-3000:]
    assert took < BOOT_TIMEOUT  # it powered off by itself (cello.poweroff) rather than hanging


def ipxe_lkrn() -> Path:
    path = Path("/usr/lib/ipxe/ipxe.lkrn")
    assert path.exists(), "the ipxe package is not installed"
    return path


async def test_tiny_initramfs_logs_in_from_the_ibft_of_ipxe_sanhook(
    daemons: Daemons, built: Built, tmp_path: Path
) -> None:
    """No ISCSI_* keys on the command line: iPXE's `sanhook` leaves an iBFT, `iscsistart -b` uses it."""
    lkrn = ipxe_lkrn()
    backend, build = built.backend, built.build
    clone = await backend.clone_os("tiny", build.version, UUID_A)
    export_lun1(daemons, UUID_A, clone.path)
    iqn = f"{IQN_PREFIX}:{UUID_A}"
    script = tmp_path / "boot.ipxe"
    script.write_text(
        "#!ipxe\n"
        "dhcp\n"
        f"set initiator-iqn {IQN_PREFIX}:node-{UUID_A}\n"
        f"sanhook --drive 0x80 iscsi:{HOST_IP}::3260:1:{iqn}\n"
        f"kernel tftp://{HOST_IP}/{build.kernel} console=ttyS0 cello.server={UUID_A} cello.lun=1 "
        "cello.poweroff panic=-1\n"
        f"initrd tftp://{HOST_IP}/{build.initrd}\n"
        "boot\n"
    )
    serial = daemons.logs / "serial-ibft.log"
    ok, took = await boot_until_marker(lkrn, script, UUID_A, serial, cmdline="", bound=120)
    assert ok, boot_failure(UUID_A, took, daemons, serial)
    assert "cello-initramfs: iSCSI login from the iBFT" in _read(serial)
    assert debugfs_cat(clone.path, "/cello-booted") == f"uuid={UUID_A}\nboots=1\n"


def debian_archive_reachable() -> tuple[bool, str]:
    """Whether this host's Debian archive answers within a few seconds (the debian source needs it)."""
    try:
        mirror = host_debian_mirror()
    except TemplateSourceError as exc:
        return False, str(exc)
    url = f"{mirror}/dists/{DEFAULT_DEBIAN_SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as reply:
            return reply.status == 200, f"{url}: HTTP {reply.status}"
    except OSError as exc:
        return False, f"{url}: {exc}"


async def test_debian_template_boots_with_its_own_initramfs(daemons: Daemons, tmp_path: Path) -> None:
    """debootstrap (minutes) → Debian's initramfs-tools logs in with the same kernel command line."""
    reachable, why = await asyncio.to_thread(debian_archive_reachable)
    if not reachable:
        pytest.skip(f"the Debian archive is not reachable, so the debian source cannot be built: {why}")
    files = tmp_path / "files"
    backend = make_backend(tmp_path / "volumes")
    lines: list[str] = []
    build = await build_template(backend, "debian", None, "debian", files, tmp_path / "work", lines.append)
    print("\n".join(lines))
    clone = await backend.clone_os("debian", build.version, UUID_A)
    export_lun1(daemons, UUID_A, clone.path)

    serial = daemons.logs / "serial.log"
    ok, took = await boot_until_marker(files / build.kernel, files / build.initrd, UUID_A, serial,
                                       bound=DEBIAN_BOOT_TIMEOUT, memory=1024)
    assert ok, boot_failure(UUID_A, took, daemons, serial)
    print(f"debian boot to marker: {took:.1f} s")
    assert debugfs_cat(clone.path, "/cello-booted") == f"uuid={UUID_A}\nboots=1\n"
    assert debugfs_cat(backend.path("debian-template"), "/cello-booted") == ""
