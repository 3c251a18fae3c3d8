"""Power control of a node through its BMC: Redfish (aiohttp) or IPMI (ipmitool, off the event loop).

    power = controller("redfish://10.0.0.9/1", user, password)
    await power.power("off"); await power.boot_pxe_once(); await power.power("on")

Every failure is a BmcError whose message names the BMC (its URL, never the password) and what failed.
Imports nothing of Cello's: the appliance hands it a URL and credentials.
"""

from __future__ import annotations

from bmc.address import BmcAddress, parse_bmc_url
from bmc.ipmi import IpmiController
from bmc.model import BmcError, ChangeAction, PowerAction, PowerController, PowerState
from bmc.redfish import RedfishController

__all__ = [
    "BmcAddress",
    "BmcError",
    "ChangeAction",
    "IpmiController",
    "PowerAction",
    "PowerController",
    "PowerState",
    "RedfishController",
    "controller",
    "parse_bmc_url",
]


def controller(url: str, user: str, password: str, *, timeout: float = 10.0,
               power_wait: float = 60.0) -> PowerController:
    """The client for the BMC at `url` (ValueError if the URL is bad). `timeout` bounds each request to
    the BMC; `power_wait` bounds how long `power()` waits for the BMC to report the new state."""
    address = parse_bmc_url(url)
    if address.scheme == "ipmi":
        return IpmiController(address, user, password, timeout=timeout, power_wait=power_wait)
    return RedfishController(address, user, password, timeout=timeout, power_wait=power_wait)
