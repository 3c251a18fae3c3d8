"""The pure parts of the BMC clients: Redfish JSON and ipmitool output read into decisions, the ipmitool
command line, the bounded wait for a power state."""

from __future__ import annotations

import asyncio

import pytest

from bmc import BmcError, IpmiController, parse_bmc_url
from bmc.ipmi import confirms, explain, parse_status
from bmc.model import PowerState, wait_for_state
from bmc.redfish import choose_reset, error_text, is_local_path, power_state_of, reset_action

SUSHY_SYSTEM = {  # the parts of sushy-tools' ComputerSystem that matter here
    "PowerState": "On",
    "Actions": {"#ComputerSystem.Reset": {
        "target": "/redfish/v1/Systems/e8c2/Actions/ComputerSystem.Reset",
        "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "GracefulShutdown", "GracefulRestart",
                                              "ForceRestart", "Nmi", "ForceOn"]}},
}


@pytest.mark.parametrize(("value", "state"), [("On", "on"), ("Off", "off"), ("PoweringOn", "unknown"),
                                              ("Paused", "unknown"), (None, "unknown")])
def test_redfish_power_state(value: str | None, state: str) -> None:
    assert power_state_of({"PowerState": value} if value else {}) == state


def test_redfish_reset_action_from_the_system() -> None:
    target, allowed = reset_action(SUSHY_SYSTEM, "/redfish/v1/Systems/x")
    assert target == "/redfish/v1/Systems/e8c2/Actions/ComputerSystem.Reset"
    assert choose_reset("cycle", allowed) == "ForceRestart"  # sushy has no PowerCycle
    assert choose_reset("on", allowed) == "On" and choose_reset("off", allowed) == "ForceOff"


def test_redfish_reset_action_defaults() -> None:
    assert reset_action({}, "/redfish/v1/Systems/1") == ("/redfish/v1/Systems/1/Actions/ComputerSystem.Reset", ())
    bad_target = {"Actions": {"#ComputerSystem.Reset": {"target": "http://elsewhere/x"}}}
    assert reset_action(bad_target, "/s")[0] == "/s/Actions/ComputerSystem.Reset"  # never another host
    for elsewhere in ("//elsewhere/redfish/v1/x", "/\\elsewhere/x", None, 7):
        assert not is_local_path(elsewhere)
        assert reset_action({"Actions": {"#ComputerSystem.Reset": {"target": elsewhere}}}, "/s")[0].startswith("/s/")
    assert is_local_path("/redfish/v1/Systems/1/Actions/ComputerSystem.Reset")
    assert choose_reset("cycle", ()) == "PowerCycle"
    assert choose_reset("cycle", ("PowerCycle", "ForceRestart")) == "PowerCycle"
    assert choose_reset("cycle", ("On", "ForceOff")) is None  # the client then does off + on
    assert choose_reset("on", ("ForceOn",)) == "ForceOn"


def test_redfish_error_text() -> None:
    doc = (b'{"error": {"code": "Base.1.0.GeneralError", "message": "general",'
           b' "@Message.ExtendedInfo": [{"Message": "The action  ResetType\\n PowerCycle is not supported."}]}}')
    assert error_text(doc) == "The action ResetType PowerCycle is not supported."
    assert error_text(b'{"error": {"message": "only this"}}') == "only this"
    assert error_text(b"<html>\n<b>Internal</b> error</html>") == "<html> <b>Internal</b> error</html>"
    assert error_text(b"x" * 500).endswith("…") and len(error_text(b"x" * 500)) == 201
    assert error_text(b"") == ""


def test_ipmitool_status_and_confirmations() -> None:
    assert parse_status("Chassis Power is on\n") == "on"
    assert parse_status("Chassis Power is off\n") == "off"
    assert parse_status("Chassis Power is   \n") == "unknown"
    assert confirms("on", "Chassis Power Control: Up/On\n")
    assert confirms("off", "Chassis Power Control: Down/Off\n")
    assert confirms("cycle", "Chassis Power Control: Cycle\n")
    assert not confirms("on", "Chassis Power Control: Down/Off\n")


# stderr captured from ipmitool 1.8.19 -v against virtualbmc
WRONG_PASSWORD = ("Loading IANA PEN Registry...\nUsing best available cipher suite 3\n\n"
                  "> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n")
NO_ANSWER = ("> Error: no response from RAKP 1 message\n> Error: no response from RAKP 1 message\n"
             "Set Session Privilege Level to ADMINISTRATOR failed\n"
             "Error: Unable to establish IPMI v2 / RMCP+ session\n")
CYCLE_REFUSED = ("Loading IANA PEN Registry...\nRunning Get VSO Capabilities my_addr 0x20, transit 0, target 0x20\n"
                 "Invalid completion code received: Invalid command\nDiscovered IPMB address 0x0\n"
                 "Set Chassis Power Control to Cycle failed: Invalid data field in request\n")


def test_ipmitool_errors_explained() -> None:
    assert explain(WRONG_PASSWORD) == "login refused: check the BMC user and password"
    assert explain(NO_ANSWER).startswith("no IPMI session: the BMC did not answer")
    assert explain(CYCLE_REFUSED) == "Set Chassis Power Control to Cycle failed: Invalid data field in request"
    assert explain("") == "no reason given"


def test_ipmitool_command_line_carries_no_password() -> None:
    power = IpmiController(parse_bmc_url("ipmi://[fd77::9]:6230"), "admin", "hunter2", ipmitool="/usr/bin/ipmitool")
    argv = power.argv(["chassis", "power", "status"])
    assert argv == ["/usr/bin/ipmitool", "-I", "lanplus", "-H", "fd77::9", "-p", "6230", "-U", "admin", "-E", "-v",
                    "-N", "1", "-R", "3", "chassis", "power", "status"]
    assert "hunter2" not in " ".join(argv) and "-P" not in argv
    with_cipher = IpmiController(parse_bmc_url("ipmi://h?cipher=3"), "admin", "hunter2").argv(["chassis"])
    assert with_cipher[-3:] == ["-C", "3", "chassis"]


async def test_wait_for_state_returns_once_reported() -> None:
    states: list[PowerState] = ["on", "unknown", "off"]

    async def read() -> PowerState:
        return states.pop(0)

    assert await wait_for_state(read, "off", within=5, every=0, what="bmc") == "off"
    assert states == []


async def test_wait_for_state_is_bounded() -> None:
    reads = 0

    async def read() -> PowerState:
        nonlocal reads
        reads += 1
        return "on"

    started = asyncio.get_running_loop().time()
    expected = r"^ipmi://h:623: power off: still reports power on after 0\.2s \(expected off\)$"
    with pytest.raises(BmcError, match=expected):
        await wait_for_state(read, "off", within=0.2, every=0.05, what="ipmi://h:623: power off")
    assert asyncio.get_running_loop().time() - started < 1 and reads >= 2
