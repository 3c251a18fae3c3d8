"""Real BMCs for the bmc tests: a libvirt qemu domain (TCG, diskless, one user-mode NIC so it has a
network boot device), driven by sushy-tools' Redfish emulator or virtualbmc's IPMI server — the stack
OpenStack Ironic's CI uses. Everything listens on 127.0.0.1 on free ports (libvirtd on its unix socket
only); every daemon started here is stopped here, and a libvirtd already running is used, not replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bmc import PowerController
from tests.tools import require

LIBVIRT_URI = "qemu:///system"
USER = "cello-admin"
PASSWORD = "s3cret-Bmc-pw"  # distinctive, so a test can tell it never leaks into a message
VENV_BIN = Path(sys.executable).parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def virsh(*args: str, check: bool = True) -> str:
    out = subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def wait_until(what: str, ok: object, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ok():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not ready after {within:g}s")


def _libvirt_answers() -> bool:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, "version"], capture_output=True, timeout=30).returncode == 0


def _stop(process: subprocess.Popen[bytes], group: bool = False) -> None:
    if process.poll() is None:
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=15)


@contextlib.contextmanager
def libvirtd(workdir: Path) -> Iterator[None]:
    """A libvirtd on its default unix socket: the running one, else one started (with virtlogd) here."""
    require("libvirtd", "virtlogd", "virsh", packages="libvirt-daemon-system libvirt-clients", root=True)
    if _libvirt_answers():
        yield
        return
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not Path("/run/libvirt/virtlogd-sock").exists():
            started.append(subprocess.Popen(["virtlogd", "-p", str(workdir / "virtlogd.pid")],
                                            stdout=open(workdir / "virtlogd.log", "wb"), stderr=subprocess.STDOUT))
        # No -l: it listens on its unix sockets only, never on the network.
        started.append(subprocess.Popen(["libvirtd", "-p", str(workdir / "libvirtd.pid")],
                                        stdout=open(workdir / "libvirtd.log", "wb"), stderr=subprocess.STDOUT))
        wait_until("libvirtd", lambda: started[-1].poll() is None and _libvirt_answers())
        yield
    finally:
        for process in reversed(started):
            _stop(process)


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    definition: Path

    def redefine(self) -> None:
        """Back to the definition it was made with (boot from hd); the running qemu is left alone."""
        virsh("define", str(self.definition))

    def state(self) -> str:
        return virsh("domstate", self.name)

    def run_id(self) -> str:
        """libvirt's domain id: a new one each time qemu starts, "-" while off."""
        return virsh("domid", self.name)

    def first_boot_device(self) -> str:
        """The device the next start boots from, from the persistent definition (what a BMC changes):
        <os><boot dev=…> (virtualbmc's way), else the device with <boot order='1'/> (sushy-tools' way)."""
        tree = ET.fromstring(virsh("dumpxml", "--inactive", self.name))
        os_boot = tree.find("os/boot")
        if os_boot is not None:
            return os_boot.get("dev", "")
        for device in tree.find("devices") or []:
            if any(b.get("order") == "1" for b in device.findall("boot")):
                return {"interface": "network", "disk": "hd"}.get(device.tag, device.tag)
        return ""


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{qemu}</emulator>
    <interface type='user'><model type='e1000'/></interface>
    <serial type='null'/>
  </devices>
</domain>
"""


@contextlib.contextmanager
def domain(workdir: Path) -> Iterator[Domain]:
    """A persistent (so that power-off keeps it) diskless qemu domain under TCG, defined here and
    undefined afterwards. It boots nowhere: only its power state and boot order matter."""
    require("qemu-system-x86_64", packages="qemu-system-x86")
    name = f"cello-bmc-{uuid.uuid4().hex[:8]}"
    dom = Domain(name, str(uuid.uuid4()), workdir / f"{name}.xml")
    dom.definition.write_text(DOMAIN_XML.format(name=dom.name, uuid=dom.uuid,
                                                qemu=shutil.which("qemu-system-x86_64")))
    dom.redefine()
    try:
        yield dom
    finally:
        virsh("destroy", dom.name, check=False)
        virsh("undefine", dom.name, check=False)


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA signed (a BMC's factory certificate), and its key."""
    require("openssl", packages="openssl")
    cert, key = workdir / "bmc.crt", workdir / "bmc.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@contextlib.contextmanager
def sushy_emulator(workdir: Path, dom: Domain, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """sushy-emulator on 127.0.0.1:<free port> with basic auth, exposing only `dom` (over https with
    `tls`, a certificate and its key); yields its redfish:// (redfish+https://) URL without a system id."""
    import bcrypt  # sushy-tools' own dependency (its auth file takes bcrypt entries only)

    emulator = VENV_BIN / "sushy-emulator"
    if not emulator.exists():
        pytest.fail("sushy-emulator not installed: run scripts/setup.sh (pip install sushy-tools)", pytrace=False)
    port = free_port()
    htpasswd = workdir / "sushy.htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    conf = workdir / "sushy.conf"
    conf.write_text(
        f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n"
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
        f"SUSHY_EMULATOR_LIBVIRT_URI = {LIBVIRT_URI!r}\n"
        f"SUSHY_EMULATOR_ALLOWED_INSTANCES = [{dom.uuid!r}, {dom.name!r}]\n"
        + (f"SUSHY_EMULATOR_SSL_CERT = {str(tls[0])!r}\nSUSHY_EMULATOR_SSL_KEY = {str(tls[1])!r}\n" if tls else ""))
    log = open(workdir / "sushy.log", "wb")
    process = subprocess.Popen([str(emulator), "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            assert process.poll() is None, (workdir / "sushy.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False
        wait_until("sushy-emulator", answers)
        yield f"{'redfish+https' if tls else 'redfish'}://127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


@contextlib.contextmanager
def virtualbmc(workdir: Path, dom: Domain) -> Iterator[str]:
    """virtualbmc's vbmcd (control port on 127.0.0.1, its own config dir) with one BMC for `dom` on
    127.0.0.1:<free UDP port>; yields its ipmi:// URL."""
    require("ipmitool", packages="ipmitool")
    vbmcd, vbmc = VENV_BIN / "vbmcd", VENV_BIN / "vbmc"
    if not vbmcd.exists():
        pytest.fail("virtualbmc not installed: run scripts/setup.sh (pip install virtualbmc)", pytrace=False)
    config_dir = workdir / "vbmc"
    config_dir.mkdir(exist_ok=True)
    conf = workdir / "virtualbmc.conf"
    conf.write_text(f"[default]\nconfig_dir = {config_dir}\npid_file = {config_dir}/master.pid\n"
                    f"server_port = {free_port()}\n[log]\nlogfile = {workdir}/vbmc.log\n")
    env = {**os.environ, "VIRTUALBMC_CONFIG": str(conf)}
    ipmi_port = free_port(socket.SOCK_DGRAM)
    log = open(workdir / "vbmcd.out", "wb")
    # Its own session, so that stopping it also stops the per-BMC processes it forks.
    process = subprocess.Popen([str(vbmcd), "--foreground"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(vbmc), *args], env=env, capture_output=True, text=True, timeout=60)

    try:
        wait_until("vbmcd", lambda: process.poll() is None and run("list").returncode == 0)
        added = run("add", dom.name, "--address", "127.0.0.1", "--port", str(ipmi_port), "--username", USER,
                    "--password", PASSWORD, "--libvirt-uri", LIBVIRT_URI)
        assert added.returncode == 0, added.stderr
        started = run("start", dom.name)
        assert started.returncode == 0, started.stderr

        def answers() -> bool:
            status = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(ipmi_port), "-U",
                                     USER, "-E", "-N", "1", "-R", "1", "chassis", "power", "status"],
                                    env={**os.environ, "IPMI_PASSWORD": PASSWORD}, capture_output=True, timeout=30)
            return status.returncode == 0
        wait_until("virtualbmc's BMC", answers)
        yield f"ipmi://127.0.0.1:{ipmi_port}"
    finally:
        run("stop", dom.name)
        _stop(process, group=True)
        log.close()


def ipmitool_command_lines() -> list[str]:
    """The command lines of the ipmitool processes running now (as anyone on the host can read them)."""
    lines = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            if argv and Path(argv[0].decode(errors="replace")).name == "ipmitool":
                lines.append(" ".join(a.decode(errors="replace") for a in argv))
    return lines


QEMU_NODE = ["qemu-system-x86_64", "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
             "-nic", "user,model=e1000", "-serial", "null", "-boot", "c"]
SIM_EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""
SIM_LAN = """name "cello"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 {port}
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid {guid}
  endlan
  chassis_control "{python} {chassis} {state}"
  user 2 true "{user}" "{password}" admin 10 md5
"""


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for init to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class SimNode:
    url: str  # ipmi://127.0.0.1:<port>?cipher=3 (ipmi_sim cannot list its cipher suites)
    state: Path  # tests/ipmi_sim_chassis.py's folder: pid, boot, starts, qemu.log

    def pid(self) -> int | None:
        """The qemu process's id while it runs."""
        try:
            pid = int((self.state / "pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def starts(self) -> list[str]:
        """The command line of each power-on so far."""
        path = self.state / "starts"
        return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def ipmi_sim(workdir: Path, qemu_argv: list[str] | None = None, *, netns: str | None = None) -> Iterator[SimNode]:
    """OpenIPMI's ipmi_sim as the BMC of a qemu process (QEMU_NODE unless `qemu_argv` names another, such
    as a PXE node in a network namespace), on 127.0.0.1:<free UDP port>; power and boot device go through
    tests/ipmi_sim_chassis.py. The machine is left powered off. With `netns`, ipmi_sim (and so the chassis
    script) runs inside that network namespace, listening on its own loopback: an appliance in the same
    namespace reaches it at 127.0.0.1, and nothing of it shows in the host's namespace."""
    require("ipmi_sim", "ipmitool", packages="openipmi ipmitool")
    require((qemu_argv or QEMU_NODE)[0], packages="qemu-system-x86")
    state = workdir / "sim-chassis"
    (state / "persist").mkdir(parents=True, exist_ok=True)
    (state / "argv.json").write_text(json.dumps(qemu_argv or QEMU_NODE))
    port = free_port(socket.SOCK_DGRAM)
    (workdir / "sim.emu").write_text(SIM_EMU)
    chassis = Path(__file__).with_name("ipmi_sim_chassis.py")
    (workdir / "lan.conf").write_text(SIM_LAN.format(port=port, guid=uuid.uuid4().hex, python=sys.executable,
                                                     chassis=chassis, state=state, user=USER, password=PASSWORD))
    log = open(workdir / "ipmi_sim.log", "wb")
    inside = ["ip", "netns", "exec", netns] if netns else []  # `ip netns exec` execs: the PID is ipmi_sim's
    process = subprocess.Popen([*inside, "ipmi_sim", "-n", "-c", str(workdir / "lan.conf"), "-f",
                                str(workdir / "sim.emu"), "-s", str(state / "persist")],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    node = SimNode(f"ipmi://127.0.0.1:{port}?cipher=3", state)
    try:
        def answers() -> bool:
            assert process.poll() is None, (workdir / "ipmi_sim.log").read_text()
            status = subprocess.run([*inside, "ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port),
                                     "-U", USER, "-E", "-C", "3", "-N", "1", "-R", "1", "chassis", "power", "status"],
                                    env={**os.environ, "IPMI_PASSWORD": PASSWORD}, capture_output=True, timeout=30)
            return status.returncode == 0
        wait_until("ipmi_sim", answers)
        yield node
    finally:
        _stop(process)
        log.close()
        subprocess.run([sys.executable, str(chassis), str(state), "set", "power", "0"], timeout=30)


@dataclass(frozen=True)
class Lab:
    dom: Domain
    url: str  # the BMC's URL, naming the system where the protocol does


async def check_power_actions(power: PowerController, dom: Domain) -> None:
    """The PowerController contract, checked on the domain itself: status, on, off, cycle, idempotence."""
    assert await power.power("off") == "off"
    assert dom.state() == "shut off" and await power.status() == "off"
    assert await power.power("on") == "on"
    assert dom.state() == "running" and await power.status() == "on"
    assert await power.power("on") == "on"  # already on: no second start, no error
    run = dom.run_id()
    assert await power.power("cycle") == "on"
    assert dom.state() == "running" and dom.run_id() != run  # qemu really stopped and started again
    await power.power("off")
    assert await power.power("cycle") == "on" and dom.state() == "running"  # cycle of an off node powers it on
    assert await power.power("off") == "off" and await power.power("off") == "off"
    assert dom.state() == "shut off"


async def check_boot_pxe_once(power: PowerController, dom: Domain) -> None:
    dom.redefine()
    assert dom.first_boot_device() == "hd"
    await power.boot_pxe_once()
    assert dom.first_boot_device() == "network"


@contextlib.contextmanager
def silent_tcp_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])
