"""The chassis of a BMC simulated by OpenIPMI's ipmi_sim: its lan.conf line
`chassis_control "<python> <this file> <state dir>"` makes ipmi_sim run this for every chassis command,
as `… get power boot` (print `power:1`, `boot:pxe`) or `… set power 0 boot pxe`.

The "machine" is a real qemu process whose command line is `<state dir>/argv.json`: power on starts it
(in its own session, log in qemu.log), power off kills it, `get power` says whether it lives. A boot
device set by `chassis bootdev` applies to the next power-on only, as IPMI's "next boot only" flag says:
`pxe` adds `-boot once=n` to that start and is then forgotten. Any qemu command line works, so a test can
put a BMC in front of a PXE node in a network namespace (`ip netns exec site qemu-system-x86_64 …`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ONCE = {"pxe": ["-boot", "once=n"], "disk": ["-boot", "once=c"], "cdrom": ["-boot", "once=d"]}


def running(state: Path) -> int | None:
    try:
        pid = int((state / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    # A zombie of ours or a pid reused by something else is not the machine.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def power_on(state: Path) -> None:
    if running(state):
        return
    argv = json.loads((state / "argv.json").read_text())
    boot = state / "boot"
    once = ONCE.get(boot.read_text().strip(), []) if boot.exists() else []
    boot.unlink(missing_ok=True)  # next boot only
    with open(state / "qemu.log", "ab") as log:
        process = subprocess.Popen([*argv, *once], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    (state / "pid").write_text(str(process.pid))
    with open(state / "starts", "a") as starts:  # what each power-on ran, for tests to read
        starts.write(" ".join([*argv, *once]) + "\n")


def power_off(state: Path) -> None:
    pid = running(state)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not running(state):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    (state / "pid").unlink(missing_ok=True)


def main(args: list[str]) -> int:
    state, op, params = Path(args[0]), args[1], args[2:]
    if op == "get":
        for param in params:
            if param == "power":
                print(f"power:{1 if running(state) else 0}")
            elif param == "boot":
                boot = state / "boot"
                print(f"boot:{boot.read_text().strip() if boot.exists() else 'default'}")
        return 0
    for param, value in zip(params[::2], params[1::2], strict=True):
        if param == "power":
            power_on(state) if value == "1" else power_off(state)
        elif param == "reset" and value == "1":
            power_off(state)
            power_on(state)
        elif param == "boot":
            (state / "boot").write_text(value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
