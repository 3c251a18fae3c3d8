"""The netboot lab of the system tests and of `make demo`: made by the tests themselves, torn down after.

```
netns cel-site  : br0 10.77.0.1/24 + fd77::1/64 — dnsmasq as the site DHCP (addresses only) + IPv6 RA
                  ctap0..ctapN on br0 — one tap per qemu node (TCG, the iPXE ROM of qemu)
netns cel-cello : cel-c0 10.77.0.2/24 (veth, its peer cel-c0br on br0) — `cello serve` as a subprocess:
                  proxyDHCP :67/:4011, TFTP :69, API + HTTP boot :8080, its own tgtd (portal :3260)
```

SiteLab is the site (cel-site, br0, taps, dnsmasq, the nodes, the host lock); Appliance is one `cello serve`
in its own namespace; Lab is the site plus the appliance in cel-cello, tests/system/fleet_lab.py the site
plus three. Everything a lab starts is a subprocess it keeps the PID of; `down()` stops those by PID, then
any process still inside its namespaces (Cello's tgtd), then deletes the namespaces. Leftovers of a
crashed run (its names are recorded next to the lock) are removed before building. Logs (serial consoles,
Cello's log, the event stream, dnsmasq's log, tgtadm output) go to one folder, which the caller keeps when a
test fails.

The test process stays in the host's namespace; it reaches the API at 10.77.0.2:8080 from threads
that entered `cel-cello` with setns(2), so no address of the lab leaks into the host's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")

NS_SITE = "cel-site"
NS_CELLO = "cel-cello"
BRIDGE = "br0"
VETH_CELLO = "cel-c0"
VETH_SITE = "cel-c0br"
SITE_IP = "10.77.0.1"
CELLO_IP = "10.77.0.2"
SITE_IP6 = "fd77::1"
API_PORT = 8080
TGT_CONTROL_PORT = 77  # /var/run/tgtd/socket.77: unique to this lab
ADMIN_TOKEN = "cello-lab-admin-token-0123456789"
TAPS = 4  # ctap0..ctap3: A, B + C in parallel, the unknown node
API = f"http://{CELLO_IP}:{API_PORT}"

CLONE_NEWNET = 0x40000000
LOCK_PATH = "/run/lock/cello-e2e-lab.lock"
BUILT_PATH = "/run/lock/cello-e2e-lab.built"  # what the lab holding LOCK_PATH builds (SiteLab._built)


class LabError(RuntimeError):
    """The lab could not be built or a bounded wait ran out; the message says what and where the logs are."""


def run(argv: list[str], *, check: bool = True, timeout: float = 30,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)}: no answer after {timeout:.0f} s") from e
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def in_ns(ns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the system tests and `make demo` need root (network namespaces, taps, tgtd, "
                       "ports 67/69); run them as root (CI does)")
    missing = [t for t in ("ip", "dnsmasq", "qemu-system-x86_64", "tgtd", "tgtadm", "debugfs")
               if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        raise LabError(f"not installed: {', '.join(missing)} (the project's setup installs them)")


def debugfs_cat(image: str | Path, path: str) -> str:
    """A file of an ext4 image, read without mounting it ('' when absent)."""
    out = run(["debugfs", "-R", f"cat {path}", str(image)], timeout=30)
    return out.stdout


# --- the event stream --------------------------------------------------------------------------------


class EventLog:
    """Every event of one Cello's SSE stream, read by a thread inside its namespace, also written to `path`."""

    def __init__(self, path: Path, token: str, ns: str = NS_CELLO, host: str = CELLO_IP) -> None:
        self.path = path
        self.token = token
        self.ns = ns
        self.host = host
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.error: str | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cello-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        enter_netns(self.ns)
        last = 0
        with open(self.path, "a", encoding="utf-8") as out:
            while not self._stop.is_set():
                try:
                    last = self._read_stream(out, last)
                except OSError as e:
                    self.error = str(e)
                if not self._stop.wait(0.5):
                    continue

    def _read_stream(self, out: Any, last: int) -> int:
        sock = socket.create_connection((self.host, API_PORT), timeout=5)
        self._sock = sock
        sock.settimeout(None)
        query = f"?since={last}" if last else "?since=0"
        sock.sendall((f"GET /api/v1/events{query} HTTP/1.1\r\nHost: {self.host}\r\n"
                      f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n").encode())
        reader = sock.makefile("rb")
        status = reader.readline().decode("latin-1")
        if " 200 " not in status:
            self.error = f"events: {status.strip()}"
            sock.close()
            return last
        chunked = False
        while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        fields: dict[str, str] = {}
        for raw in _sse_lines(reader, chunked):
            if self._stop.is_set():
                break
            if raw == "":
                event = _sse_event(fields)
                fields = {}
                if event is None:
                    continue
                if isinstance(event.get("id"), int):
                    last = max(last, event["id"])
                out.write(json.dumps(event) + "\n")
                out.flush()
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
                for listener in self.listeners:
                    listener(event)
            elif not raw.startswith(":"):
                name, _, value = raw.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields[name] = fields[name] + "\n" + value if name in fields else value
        sock.close()
        return last

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.events)

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if match(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(f"no event {what} within {timeout:.0f} s (stream error: {self.error})")
                self._cond.wait(min(left, 0.5))


def _sse_lines(reader: Any, chunked: bool) -> Iterator[str]:
    """The lines of an SSE body, chunked transfer-encoding undone."""
    if not chunked:
        while line := reader.readline():
            yield line.decode("utf-8", "replace").rstrip("\r\n")
        return
    pending = b""
    while True:
        size_line = reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        pending += reader.read(size)
        reader.readline()
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode("utf-8", "replace").rstrip("\r")


def _sse_event(fields: Mapping[str, str]) -> dict[str, Any] | None:
    if "data" not in fields:
        return None
    try:
        data = json.loads(fields["data"])
    except ValueError:
        data = {"text": fields["data"]}
    if not isinstance(data, dict):
        data = {"value": data}
    if "kind" not in data and "event" in fields:
        data["kind"] = fields["event"]
    if "id" not in data and fields.get("id", "").isdigit():
        data["id"] = int(fields["id"])
    return data


# --- qemu nodes --------------------------------------------------------------------------------------


@dataclass
class Node:
    """One qemu node on its own tap of br0."""

    name: str
    uuid: str
    mac: str
    tap: str
    logs: Path
    firmware: str = "bios"  # bios | uefi | uefi-pxe | uefi-http
    # "uefi" boots with the iPXE EFI driver of qemu's NIC ROM; "uefi-pxe" drops that ROM, so OVMF's own PXE
    # client asks the proxyDHCP and is handed ipxe.efi over TFTP; "uefi-http" also turns OVMF's PXE off
    # (its fw_cfg knobs), so its UEFI HTTP Boot client asks instead and fetches ipxe.efi by URL.
    nic: str = "e1000"
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def nic_rom(self) -> str:
        return ",romfile=" if self.firmware in ("uefi-pxe", "uefi-http") else ""

    @property
    def serial(self) -> Path:
        return self.logs / f"serial-{self.name}.log"

    def argv(self) -> list[str]:
        sercon = self.logs / "sercon.bin"
        if not sercon.exists():
            sercon.write_bytes(b"\xf8\x03")  # iPXE mirrors its screen onto COM1 (0x3f8)
        argv = [
            "ip", "netns", "exec", NS_SITE, "qemu-system-x86_64", "-accel", "tcg", "-m", "512",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{self.serial}",
            "-boot", "n", "-uuid", self.uuid, "-name", self.name,
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"{self.nic},netdev=n0,mac={self.mac}{self.nic_rom}",
            "-fw_cfg", f"name=etc/sercon-port,file={sercon}",
        ]  # fmt: skip
        if self.firmware == "uefi-http":
            argv += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
                     "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"]
        if self.firmware.startswith("uefi"):
            vars_copy = self.logs / f"ovmf-vars-{self.name}.fd"
            shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_copy)
            argv += ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                     "-drive", f"if=pflash,format=raw,file={vars_copy}"]
        return argv

    def power_on(self) -> None:
        if self.serial.exists():
            self.serial.unlink()
        log = open(self.logs / f"qemu-{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.started = time.monotonic()

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_console(self, text: str, timeout: float) -> float:
        """Seconds from power-on until `text` is on the serial console; LabError after `timeout`."""
        deadline = self.started + timeout
        while True:
            if text in self.console():
                return time.monotonic() - self.started
            if self.proc is not None and self.proc.poll() is not None and text not in self.console():
                raise LabError(f"{self.name}: qemu exited ({self.proc.returncode}) before {text!r}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: no {text!r} on the serial console within {timeout:.0f} s")
            time.sleep(0.2)

    def power_off(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# --- one appliance -----------------------------------------------------------------------------------


@dataclass
class CelloProcess:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path


@dataclass
class Appliance:
    """One `cello serve` in its own namespace, on br0 through a veth: its config file, process, tgtd, API and
    event stream. Lab has one (cel-cello), tests/system/fleet_lab.py three; what goes into the config beyond
    the appliance's own addresses (base_config) is the lab's business, so start() takes the text."""

    ns: str
    ip: str
    veth: str  # inside ns
    veth_site: str  # its peer, on br0 in cel-site
    tgt_control_port: int  # /var/run/tgtd/socket.N: one per appliance, so each runs its own tgtd
    home: Path  # cello.toml and state/
    logs: Path
    log_tag: str = ""  # "-a" → cello-a.log, events-a.log: several appliances share one log folder
    token: str = ADMIN_TOKEN
    cello: CelloProcess | None = None
    events: EventLog | None = None
    _pool: ThreadPoolExecutor | None = None

    @property
    def config_path(self) -> Path:
        return self.home / "cello.toml"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def api_url(self) -> str:
        return f"http://{self.ip}:{API_PORT}"

    def log(self, stem: str) -> Path:
        return self.logs / f"{stem}{self.log_tag}.log"

    def plug(self, site_ns: str = NS_SITE) -> None:
        """Its namespace and its veth into br0 of `site_ns`; the threads that reach its API from inside."""
        run(["ip", "netns", "add", self.ns])
        in_ns(self.ns, "ip", "link", "set", "lo", "up")
        run(["ip", "link", "add", self.veth, "netns", self.ns, "type", "veth",
             "peer", "name", self.veth_site, "netns", site_ns])
        in_ns(site_ns, "ip", "link", "set", self.veth_site, "master", BRIDGE)
        in_ns(site_ns, "ip", "link", "set", self.veth_site, "up")
        in_ns(self.ns, "ip", "addr", "add", f"{self.ip}/24", "dev", self.veth)
        in_ns(self.ns, "ip", "link", "set", self.veth, "up")
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=self.ns,
                                        initializer=enter_netns, initargs=(self.ns,))

    def unplug(self) -> None:
        """The API threads; the namespace itself goes with the lab's leftovers (after every process in it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def base_config(self, loader_roots: list[str], dhcp_unknown: str) -> str:
        """cello.toml for this appliance's addresses, file backend and tgt driver; a lab appends its tables."""
        roots = ", ".join(f'"{r}"' for r in loader_roots)
        return (
            "[appliance]\n"
            f'state_dir = "{self.state_dir}"\n'
            f'advertise = "{self.ip}"\n'
            "[api]\n"
            f'listen = "{self.ip}:{API_PORT}"\n'
            f'admin_token = "{self.token}"\n'
            "[tftp]\n"
            'listen = "0.0.0.0:69"\n'  # the namespace holds only lo and the veth: this is the appliance's ip
            f"roots = [{roots}]\n"
            "[dhcp]\n"
            'listen = "0.0.0.0"\n'  # broadcasts reach only a wildcard socket; `interface` pins it to the veth
            f'interface = "{self.veth}"\n'
            f'unknown = "{dhcp_unknown}"\n'
            "[storage]\n"
            'backend = "file"\n'
            "[iscsi]\n"
            'driver = "tgt"\n'
            f'portals = ["{self.ip}:3260"]\n'
            f"tgt_control_port = {self.tgt_control_port}\n"
        )

    def start(self, config: str, timeout: float = 40) -> None:
        """Writes `config` as its cello.toml, starts `cello serve` and waits for /api/v1/health."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        log_path = self.log("cello")
        out = open(log_path, "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, PYTHON, "-m", "appliance", "serve", "--config", str(self.config_path),
             "--log-level", "debug"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        self.cello = CelloProcess(proc, self.config_path, log_path)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise LabError(f"cello serve in {self.ns} exited ({proc.returncode}) at start:\n"
                               f"{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, LabError):
                status, _ = self.api("GET", "/api/v1/health", timeout=2)
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise LabError(f"cello serve in {self.ns}: no /api/v1/health within {timeout:.0f} s")
            time.sleep(0.3)
        self.events = EventLog(self.log("events"), self.token, self.ns, self.ip)
        self.events.start()

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to `cello serve` (idempotent); its tgtd goes on serving, by design."""
        if self.events is not None:
            self.events.stop()
            self.events = None
        if self.cello is None:
            return
        proc = self.cello.proc
        self.cello = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 15) -> int:
        """Send `sig` to `cello serve` (SIGKILL: a crash) and reap it; its exit status. What it started
        and did not stop (its tgtd, once tgtd outlives it) is left running."""
        if self.events is not None:
            self.events.stop()
            self.events = None
        assert self.cello is not None, f"cello serve in {self.ns} is not running"
        proc = self.cello.proc
        self.cello = None
        proc.send_signal(sig)  # `ip netns exec` execs, so this is cello serve's own PID
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=5)

    def tgtd_pids(self) -> list[int]:
        """PIDs of the tgtd processes on this appliance's control port inside its namespace (Cello's tgtd)."""
        pids = []
        for pid in run(["ip", "netns", "pids", self.ns], check=False).stdout.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and Path(argv[0].decode(errors="replace")).name == "tgtd" \
                    and b"-C" in argv and str(self.tgt_control_port).encode() in argv:
                pids.append(int(pid))
        return sorted(pids)

    def teardown_exports(self, timeout: float = 30) -> None:
        """With `cello serve` stopped: remove the exports on purpose (`cello teardown --yes`), then end any
        tgtd of this appliance still running (a tgtd outlives `cello serve` by design)."""
        if self.config_path.exists() and self.tgtd_pids():
            done = run(["ip", "netns", "exec", self.ns, PYTHON, "-m", "appliance", "teardown", "--config",
                        str(self.config_path), "--yes"], check=False, timeout=timeout)
            with open(self.log("teardown"), "a") as f:
                f.write(f"--- exit {done.returncode}\n{done.stdout}{done.stderr}")
        deadline = time.monotonic() + 5
        while (pids := self.tgtd_pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def shut_down(self) -> None:
        """Idempotent, for a lab's down(): what tgtd held (for the logs), `cello serve`, its exports and tgtd."""
        with contextlib.suppress(Exception):
            self.tgt_show()
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self.teardown_exports()

    def api(self, method: str, path: str, body: object | None = None, *, timeout: float = 30,
            token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        """One API request from inside its namespace; (status, decoded JSON or text)."""
        assert self._pool is not None, f"{self.ns} is not up"
        return self._pool.submit(_http, self.ip, method, path, body, timeout, token).result(timeout + 5)

    def _cli_env(self) -> dict[str, str]:
        return {**os.environ, "CELLO_API": self.api_url, "CELLO_TOKEN": self.token}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`cello ARGS` inside its namespace, with CELLO_API and CELLO_TOKEN like an operator's shell."""
        return run(["ip", "netns", "exec", self.ns, PYTHON, "-m", "appliance", *args],
                   check=False, timeout=timeout, env=self._cli_env())

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, PYTHON, "-m", "appliance", *args], cwd=REPO,
                                env={**self._cli_env(), "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def tgt_show(self) -> str:
        """What its tgtd really holds (targets, LUNs, I_T nexus = logged-in initiators)."""
        out = run(["tgtadm", "-C", str(self.tgt_control_port), "--lld", "iscsi", "--op", "show",
                   "--mode", "target"], check=False)
        text = out.stdout + out.stderr
        with open(self.log("tgtadm-show"), "a") as f:
            f.write(f"--- {time.strftime('%H:%M:%S')}\n{text}")
        return text


# --- the site, shared by every lab -------------------------------------------------------------------


def _remove_namespace(ns: str) -> None:
    """Every process inside `ns` killed, then `ns` deleted (its veths go with it)."""
    if not Path(f"/run/netns/{ns}").exists():
        return
    for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while run(["ip", "netns", "pids", ns], check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.1)
    run(["ip", "netns", "del", ns], check=False)


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), '' when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _end_daemon(pid: int) -> None:
    """SIGQUIT (PostgreSQL's immediate shutdown: it ends its own children), SIGKILL after 5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 5
    while _process_start(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class SiteLab:
    """What every lab of the system tests shares: the host lock, cel-site with br0, the taps of the qemu
    nodes, dnsmasq as the site DHCP, the nodes and the log folder. Lab adds one appliance, FleetLab three
    (appliances())."""

    workdir: Path
    dnsmasq: subprocess.Popen[bytes] | None = None
    nodes: list[Node] = field(default_factory=list)
    _free_taps: list[str] = field(default_factory=list)
    _lock: IO[str] | None = None
    _daemons: list[tuple[int, str, str]] = field(default_factory=list)  # see record_daemon
    locked_at: float = 0.0  # monotonic time the lock was taken: how long building took, without the wait

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def appliances(self) -> list[Appliance]:
        return []

    # --- network ---------------------------------------------------------------------------------

    def _built(self) -> dict[str, Any]:
        """The namespaces, tgtd control ports and daemons this lab builds, and those the lab before it
        recorded in BUILT_PATH: labs of other shapes (FleetLab) share the lock, and a crash of one must not
        leave its appliances or its database running under the next."""
        built: dict[str, Any] = {
            "namespaces": sorted({NS_SITE, *(a.ns for a in self.appliances())}),
            "tgt_control_ports": sorted({a.tgt_control_port for a in self.appliances()}),
            "daemons": [list(d) for d in self._daemons],
        }
        return built

    def remove_leftovers(self) -> None:
        """Whatever a crashed run of a lab left: processes in its namespaces, the namespaces, tgtd's sockets,
        the daemons it recorded (by PID and start time, so a reused PID is spared) and their folders."""
        mine = self._built()
        try:
            before = json.loads(Path(BUILT_PATH).read_text())
        except (OSError, ValueError):
            before = {}
        for ns in sorted({*mine["namespaces"], *before.get("namespaces", [])}):
            _remove_namespace(str(ns))
        for port in {*mine["tgt_control_ports"], *before.get("tgt_control_ports", [])}:
            for leftover in (f"socket.{port}", f"socket.{port}.lock"):
                with contextlib.suppress(FileNotFoundError):
                    Path("/var/run/tgtd", leftover).unlink()
        for pid, started, folder in [*mine["daemons"], *before.get("daemons", [])]:
            if _process_start(int(pid)) == started:
                _end_daemon(int(pid))
            shutil.rmtree(folder, ignore_errors=True)

    def _record_built(self) -> None:
        Path(BUILT_PATH).write_text(json.dumps(self._built()))

    def record_daemon(self, pid: int, folder: Path) -> None:
        """A daemon the lab started outside its namespaces (it detached: no Popen to keep), and its folder:
        both removed by the next lab's remove_leftovers() if this one crashes before its own down(). It
        replaces what was recorded for `folder` (a restarted daemon)."""
        self._daemons = [d for d in self._daemons if d[2] != str(folder)]
        self._daemons.append((pid, _process_start(pid), str(folder)))
        self._record_built()

    def _site_network(self) -> None:
        s = NS_SITE
        run(["ip", "netns", "add", s])
        in_ns(s, "ip", "link", "set", "lo", "up")
        in_ns(s, "ip", "link", "add", BRIDGE, "type", "bridge")
        in_ns(s, "ip", "addr", "add", f"{SITE_IP}/24", "dev", BRIDGE)
        in_ns(s, "ip", "-6", "addr", "add", f"{SITE_IP6}/64", "dev", BRIDGE, "nodad")
        in_ns(s, "ip", "link", "set", BRIDGE, "up")
        for i in range(TAPS):
            tap = f"ctap{i}"
            in_ns(s, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
            in_ns(s, "ip", "link", "set", tap, "master", BRIDGE)
            in_ns(s, "ip", "link", "set", tap, "up")
            self._free_taps.append(tap)

    def _site_dhcp(self) -> None:
        conf = self.logs / "dnsmasq.conf"
        conf.write_text(
            "port=0\n"
            f"interface={BRIDGE}\nbind-interfaces\nno-resolv\nno-hosts\n"
            "dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h\n"
            "enable-ra\ndhcp-range=fd77::,ra-only\n"
            f"dhcp-leasefile={self.leases}\n"
            f"log-dhcp\nlog-facility={self.logs}/dnsmasq.log\n"
        )
        out = open(self.logs / "dnsmasq.stderr", "ab")
        self.dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", NS_SITE, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground",
             f"--pid-file={self.workdir}/dnsmasq.pid", "--user=root"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        time.sleep(0.3)
        if self.dnsmasq.poll() is not None:
            raise LabError(f"dnsmasq exited at start: {(self.logs / 'dnsmasq.stderr').read_text()}")

    @property
    def leases(self) -> Path:
        """dnsmasq's lease file: `<expiry> <mac> <ip> <hostname> <client-id>` a line."""
        return self.workdir / "dnsmasq.leases"

    def _take_lock(self, timeout: float) -> None:
        """One lab at a time on this host: its names are fixed, and building one removes the leftovers of
        another. The kernel drops the lock when its holder dies, so leftovers found under it are a crash's."""
        self._lock = open(LOCK_PATH, "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked_at = time.monotonic()
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise LabError(f"another Cello lab (system tests or `make demo`) holds {LOCK_PATH} "
                                   f"for more than {timeout:.0f} s") from None
                time.sleep(1)

    def up(self, lock_timeout: float = 600) -> None:
        """Network (the site, each appliance's namespace and veth) + site DHCP; the appliances start later."""
        require_root()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._take_lock(lock_timeout)
        self.remove_leftovers()
        self._record_built()
        self._site_network()
        for appliance in self.appliances():
            appliance.plug()
        self._site_dhcp()

    def loader_roots(self) -> list[str]:
        """The OS's loader folders, after one of copies of the loaders Debian installs as symlinks out of
        them (/usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi), which Cello's TFTP rightly refuses to follow."""
        own = self.workdir / "loaders"
        own.mkdir(exist_ok=True)
        for loader in (Path("/usr/lib/ipxe/ipxe.efi"), Path("/usr/lib/ipxe/snponly.efi")):
            if loader.is_symlink() and loader.exists():
                shutil.copyfile(loader.resolve(), own / loader.name)
        dirs = ["/usr/lib/PXELINUX", "/usr/lib/syslinux/modules/bios", "/usr/lib/ipxe"]
        return [str(own), *(d for d in dirs if Path(d).is_dir())]

    # --- nodes --------------------------------------------------------------------------------------

    def node(self, name: str, uuid: str, mac: str, *, firmware: str = "bios", nic: str = "e1000") -> Node:
        if not self._free_taps:
            raise LabError(f"no free tap for node {name} (the lab has {TAPS})")
        node = Node(name, uuid, mac, self._free_taps.pop(0), self.logs, firmware, nic)
        self.nodes.append(node)
        return node

    def release(self, node: Node) -> None:
        node.power_off()
        if node in self.nodes:
            self.nodes.remove(node)
            self._free_taps.append(node.tap)

    # --- teardown -----------------------------------------------------------------------------------

    def down(self) -> None:
        """Idempotent: nodes, each appliance (Cello, its exports and tgtd, which outlives Cello), dnsmasq,
        then anything left, then the namespaces."""
        for node in list(self.nodes):
            with contextlib.suppress(Exception):
                node.power_off()
        for appliance in self.appliances():
            appliance.shut_down()
        with contextlib.suppress(Exception):
            self.after_appliances_down()
        if self.dnsmasq is not None:
            proc, self.dnsmasq = self.dnsmasq, None
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for appliance in self.appliances():
            appliance.unplug()
        if self._lock is not None:
            self.remove_leftovers()
            with contextlib.suppress(FileNotFoundError):
                Path(BUILT_PATH).unlink()
            self._lock.close()  # releases the flock
            self._lock = None

    def after_appliances_down(self) -> None:
        """What the appliances used and a lab of its own started (FleetLab's database), stopped in down()."""

    def log_tail(self, limit: int = 2500) -> str:
        """The end of every log, for a failure message."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last {limit} chars)\n{text[-limit:]}")
        return "\n".join(parts)


# --- the lab of one appliance ------------------------------------------------------------------------


@dataclass
class Lab(SiteLab):
    """The site and one appliance in cel-cello; its methods are the appliance's, under the names the tests
    have always used."""

    dhcp_unknown: str = "ignore"
    extra_config: str = ""  # TOML appended to cello.toml (e.g. `[boot.profiles.NAME]` tables)
    appliance: Appliance = field(init=False)

    def __post_init__(self) -> None:
        self.appliance = Appliance(NS_CELLO, CELLO_IP, VETH_CELLO, VETH_SITE, TGT_CONTROL_PORT,
                                   self.workdir, self.logs)

    def appliances(self) -> list[Appliance]:
        return [self.appliance]

    @property
    def cello(self) -> CelloProcess | None:
        return self.appliance.cello

    @property
    def events(self) -> EventLog | None:
        return self.appliance.events

    @property
    def state_dir(self) -> Path:
        return self.appliance.state_dir

    def cello_config(self) -> str:
        return self.appliance.base_config(self.loader_roots(), self.dhcp_unknown) + self.extra_config

    def start_cello(self, timeout: float = 40) -> None:
        self.appliance.start(self.cello_config(), timeout)

    def stop_cello(self, timeout: float = 15) -> None:
        self.appliance.stop(timeout)

    def kill_cello(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 15) -> int:
        return self.appliance.kill(sig, timeout)

    def tgtd_pids(self) -> list[int]:
        return self.appliance.tgtd_pids()

    def teardown_exports(self, timeout: float = 30) -> None:
        self.appliance.teardown_exports(timeout)

    def api(self, method: str, path: str, body: object | None = None, *, timeout: float = 30,
            token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        return self.appliance.api(method, path, body, timeout=timeout, token=token)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.appliance.cli(*args, timeout=timeout)

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        return self.appliance.cli_popen(*args)

    def tgt_show(self) -> str:
        return self.appliance.tgt_show()


def _http(host: str, method: str, path: str, body: object | None, timeout: float,
          token: str | None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(host, API_PORT, timeout=timeout)
    try:
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()
