"""Power and one-time PXE boot over IPMI v2.0 LAN (RMCP+), by running ipmitool off the event loop.

The password goes to ipmitool through its environment (`-E` reads IPMI_PASSWORD), never its argv: a
command line is world-readable in /proc, a process's environment only to its owner and root. The parsers
of ipmitool's output are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from bmc.address import BmcAddress
from bmc.model import BmcError, ChangeAction, PowerState, wait_for_state

# ipmitool's own per-try timeout and retries (-N, -R); the whole command is bounded by `timeout` as well.
# -v is there for its stderr: only then does ipmitool say "RAKP 2 HMAC is invalid" for a wrong password.
TRY_SECONDS = 1
RETRIES = 3
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONFIRMS = {"on": "Up/On", "off": "Down/Off", "cycle": "Cycle"}  # "Chassis Power Control: <word>"

_STATUS = re.compile(r"^Chassis Power is (on|off)\s*$", re.MULTILINE)
# RAKP 2's HMAC is keyed with the password: a wrong one shows there. Unknown users get no RAKP 2 at all
# from many BMCs (only "no response from RAKP 1"), so they look like a BMC that does not answer.
_LOGIN_REFUSED = ("RAKP 2 HMAC is invalid", "unauthorized name", "Unauthorized name", "invalid integrity")
# "Set Chassis Power Control to Cycle failed: <completion code>"; C1h and CCh (IPMI v2.0 table 5-2) mean
# "this BMC does not do that". (-v makes ipmitool print its own probes' "Invalid command" too: not those.)
_CONTROL_FAILED = re.compile(r"^Set Chassis Power Control to \w+ failed: (.*)$", re.MULTILINE)
_UNSUPPORTED = ("Invalid command", "Invalid data field in request", "not supported")
# What -v adds to stderr on every run (IANA registry, cipher suite, the VSO/PICMG probes).
_NOISE = ("Using best available", "Loading IANA", "Running Get", "Discovered IPMB", "Invalid completion code")


def parse_status(stdout: str) -> PowerState:
    """`chassis power status` output → on/off (unknown if it says neither)."""
    match = _STATUS.search(stdout)
    return "unknown" if match is None else ("on" if match.group(1) == "on" else "off")


def confirms(action: ChangeAction, stdout: str) -> bool:
    """Whether `chassis power <action>` printed its success line."""
    return f"Chassis Power Control: {CONFIRMS[action]}" in stdout


def explain(stderr: str) -> str:
    """What went wrong, on one line, from ipmitool's stderr."""
    if any(marker in stderr for marker in _LOGIN_REFUSED):
        return "login refused: check the BMC user and password"
    lines = [" ".join(line.split()).lstrip("> ") for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_NOISE)]
    if any("Unable to establish IPMI v2 / RMCP+ session" in line for line in useful):
        return "no IPMI session: the BMC did not answer, or refused the user name or the password"
    failures = [line for line in useful if line.startswith("Error") or " failed" in line]
    text = (failures or useful or ["no reason given"])[-1]
    return text[:200] + ("…" if len(text) > 200 else "")


class IpmiController:
    def __init__(self, address: BmcAddress, user: str, password: str, *, timeout: float = 10.0,
                 power_wait: float = 60.0, poll: float = 1.0, ipmitool: str = "ipmitool") -> None:
        if address.scheme != "ipmi":
            raise ValueError(f"{address} is not an IPMI BMC")
        self.address = address
        self._user = user
        self._password = password
        self._timeout = timeout
        self._power_wait = power_wait
        self._poll = poll
        self._ipmitool = ipmitool

    async def status(self) -> PowerState:
        return parse_status(await self._run(["chassis", "power", "status"], "read power state"))

    async def power(self, action: ChangeAction) -> PowerState:
        state = await self.status()
        want: PowerState = "off" if action == "off" else "on"
        if action == "cycle" and state == "off":
            action = "on"
        if action == "cycle":
            try:
                await self._power_command("cycle")
            except _Unsupported:
                # virtualbmc and some boards answer "power cycle" with a completion code: do it by hand.
                await self._power_command("off")
                await self._wait("off", "power cycle (off)")
                await self._power_command("on")
        elif state != want:
            await self._power_command(action)
        return await self._wait(want, f"power {action}")

    async def boot_pxe_once(self) -> None:
        # Without options=persistent, ipmitool sets the boot flags "valid, next boot only" (IPMI v2.0
        # §28.13, boot option parameter 5): the BMC clears them after one boot.
        out = await self._run(["chassis", "bootdev", "pxe"], "set one-time PXE boot")
        if "Set Boot Device to pxe" not in out:
            raise BmcError(f"{self.address}: set one-time PXE boot: unexpected answer {_one_line(out)!r}")

    # -- internals ----------------------------------------------------------------------------------

    async def _power_command(self, action: ChangeAction) -> None:
        out = await self._run(["chassis", "power", action], f"power {action}", unsupported_ok=action == "cycle")
        if not confirms(action, out):
            raise BmcError(f"{self.address}: power {action}: unexpected answer {_one_line(out)!r}")

    async def _wait(self, want: PowerState, what: str) -> PowerState:
        return await wait_for_state(self.status, want, within=self._power_wait, every=self._poll,
                                    what=f"{self.address}: {what}")

    def argv(self, command: list[str]) -> list[str]:
        """The ipmitool command line: no password in it (see the module's docstring)."""
        cipher = ["-C", str(self.address.cipher_suite)] if self.address.cipher_suite else []
        return [self._ipmitool, "-I", "lanplus", "-H", self.address.host, "-p", str(self.address.port),
                "-U", self._user, "-E", "-v", "-N", str(TRY_SECONDS), "-R", str(RETRIES), *cipher, *command]

    async def _run(self, command: list[str], what: str, *, unsupported_ok: bool = False) -> str:
        where = f"{self.address}: {what}"
        env = {"IPMI_PASSWORD": self._password, "PATH": SEARCH_PATH, "LC_ALL": "C"}
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv(command), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
        except FileNotFoundError:
            raise BmcError(f"{where}: {self._ipmitool} is not installed (apt-get install ipmitool)") from None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            raise BmcError(f"{where}: no answer within {self._timeout:g}s") from None
        finally:
            if process.returncode is None:  # timed out or cancelled: never leave ipmitool behind
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        out, err = stdout.decode("utf-8", "replace"), self._scrub(stderr.decode("utf-8", "replace"))
        if process.returncode != 0:
            failed = _CONTROL_FAILED.search(err)
            if unsupported_ok and failed and any(marker in failed.group(1) for marker in _UNSUPPORTED):
                raise _Unsupported(err)
            raise BmcError(f"{where}: {explain(err)}")
        return out

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


class _Unsupported(Exception):
    """The BMC answered a command with "invalid command / not supported"."""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
