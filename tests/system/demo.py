"""`make demo`: one virtual diskless node PXE-boots from its own iSCSI clone, shown live.

As root: builds the lab (tests/system/lab.py), starts `cello serve` in its namespace, builds the `tiny`
template, creates a server, powers on a qemu node and prints the boot as it happens — Cello's event
stream (`cello events --follow`) and the node's own console lines — then the time from power-on to its
root filesystem. Ctrl-C, or the end, removes everything (nodes, Cello and its tgtd, dnsmasq, namespaces).

    python -m tests.system.demo [--profile pxelinux|ipxe] [--stay]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from tests.system.lab import Lab, LabError, require_root

UUID = "3f1c2b4e-0000-4000-8000-00000000d001"
MAC = "52:54:00:77:00:d1"
USER = "demo"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
BOOT_TIMEOUT = 120.0

_print_lock = threading.Lock()
_t0: float | None = None


def say(line: str) -> None:
    stamp = f"[+{time.monotonic() - _t0:5.1f}s] " if _t0 is not None else "          "
    with _print_lock:
        print(stamp + line, flush=True)


def step(title: str) -> None:
    with _print_lock:
        print(f"\n== {title}", flush=True)


def cello(lab: Lab, *args: str, timeout: float = 240) -> str:
    """A `cello` CLI command, its output printed as it comes."""
    say("$ cello " + " ".join(args))
    proc = lab.cli_popen(*args)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    output = []
    for line in proc.stdout:
        output.append(line)
        say("  " + line.rstrip())
        if time.monotonic() > deadline:
            proc.kill()
            break
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
    if proc.returncode != 0:
        raise LabError(f"cello {' '.join(args)}: exit {proc.returncode}")
    return "".join(output)


def follow(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        say(prefix + line.rstrip())


def tail_console(path: Path, stop: threading.Event) -> None:
    """The node's own progress lines from its serial console (the initramfs and the root's marker)."""
    offset = 0
    pending = b""
    while not stop.is_set():
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                text = ANSI.sub("", raw.decode(errors="replace")).strip()
                if text.startswith(("cello-", "iscsistart: Connection", "iPXE ", "Next server", "Filename")) \
                        or "Linux version" in text:
                    say("node console | " + text[:150])
        stop.wait(0.2)


def run(profile: str, stay: bool) -> int:
    global _t0
    require_root()
    workdir = Path("/tmp") / f"cello-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    lab = Lab(workdir)
    events: subprocess.Popen[str] | None = None
    stop = threading.Event()
    ok = False
    try:
        step("lab: namespaces cel-site (bridge, dnsmasq site DHCP + IPv6 RA) and cel-cello (the appliance)")
        lab.up()
        lab.start_cello()
        say(f"cello serve is up in netns cel-cello at http://10.77.0.2:8080 (logs: {lab.logs})")

        step("template: tiny (host kernel, busybox initramfs that logs in to iSCSI, marker root)")
        cello(lab, "user", "create", USER, "--max-volumes", "8", "--max-data-gb", "8")
        cello(lab, "template", "build", "tiny", "--from", "tiny")

        step(f"server {UUID} (profile {profile}, one 1 GB data volume): clone + iSCSI export")
        cello(lab, "server", "create", UUID, "--template", "tiny", "--profile", profile, "--mac", MAC,
              "--user", USER, "--data-gb", "1", "--wait", "--wait-timeout", "60", timeout=90)

        step("power on the node (qemu, TCG, iPXE ROM) — live from `cello events --follow` and its console")
        # Not filtered by --server: the static loader files (pxelinux.0, ldlinux.c32) belong to no server.
        assert lab.events is not None
        since = max((int(e.get("id", 0)) for e in lab.events.snapshot()), default=0)
        events = lab.cli_popen("events", "--follow", "--since", str(since))
        threading.Thread(target=follow, args=(events, "event | "), daemon=True).start()
        node = lab.node("demo", UUID, MAC)
        time.sleep(0.5)  # the follower is connected before the first DHCP packet
        node.power_on()
        _t0 = node.started
        threading.Thread(target=tail_console, args=(node.serial, stop), daemon=True).start()
        took = node.wait_console(f"cello-root-ok {UUID}", BOOT_TIMEOUT)
        time.sleep(0.5)
        step("result")
        say(f"power-on → root filesystem on its own iSCSI clone: {took:.1f} s")
        for line in lab.tgt_show().splitlines():
            if "Initiator:" in line or "Connection:" in line or "IP Address:" in line:
                say("Cello's tgtd sees | " + line.strip())
        ok = True
        if stay:
            say("the node keeps running; Ctrl-C ends the demo and removes everything")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 0 if ok else 130
    except LabError as e:
        say(f"demo failed: {e}")
        say(f"logs kept in {lab.logs}")
        return 1
    finally:
        stop.set()
        if events is not None and events.poll() is None:
            events.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                events.wait(timeout=5)
        step("cleanup: nodes, cello (and its tgtd), dnsmasq, namespaces")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the lab half-removed
        lab.down()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        say("done")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=("pxelinux", "ipxe"), default="pxelinux")
    parser.add_argument("--stay", action="store_true", help="keep the node running until Ctrl-C")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args.profile, args.stay)
    except LabError as e:  # not root, a tool missing
        print(f"demo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
