"""Power and one-time PXE boot through a Redfish service (DMTF DSP0266), with aiohttp.

The ComputerSystem resource says what it allows (`ResetType@Redfish.AllowableValues`, the action's
`target`); the client reads those rather than assume one vendor's set: sushy-tools' libvirt driver offers
ForceRestart but no PowerCycle, many boards the other way round. The JSON-reading helpers are pure.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeGuard
from urllib.parse import quote

import aiohttp

from bmc.address import BmcAddress
from bmc.model import BmcError, ChangeAction, PowerState, wait_for_state

SYSTEMS = "/redfish/v1/Systems"
MAX_BODY = 1 << 20  # a ComputerSystem document is a few kB; anything near this is not a BMC talking
# DSP2046 ResetType values, in order of preference for each action.
RESET_FOR: dict[str, tuple[str, ...]] = {
    "on": ("On", "ForceOn"),
    "off": ("ForceOff",),
    "cycle": ("PowerCycle", "ForceRestart"),
}


# -- pure helpers over Redfish JSON -------------------------------------------------------------------

def power_state_of(system: dict[str, Any]) -> PowerState:
    """ComputerSystem.PowerState → on/off; PoweringOn, PoweringOff, Paused and absent → unknown."""
    state = system.get("PowerState")
    return "on" if state == "On" else "off" if state == "Off" else "unknown"


def reset_action(system: dict[str, Any], system_path: str) -> tuple[str, tuple[str, ...]]:
    """The Reset action's target and its allowed ResetTypes (empty = the BMC did not say)."""
    action = (system.get("Actions") or {}).get("#ComputerSystem.Reset") or {}
    target = action.get("target")
    if not is_local_path(target):
        target = f"{system_path}/Actions/ComputerSystem.Reset"
    allowed = action.get("ResetType@Redfish.AllowableValues")
    return target, tuple(v for v in allowed if isinstance(v, str)) if isinstance(allowed, list) else ()


def is_local_path(value: object) -> TypeGuard[str]:
    """A path on this BMC ("/redfish/v1/…"): links in its documents are followed only then, so that a
    document naming another host ("http://…", "//…") never gets the credentials sent there."""
    return isinstance(value, str) and value.startswith("/redfish/") and "\\" not in value


def choose_reset(action: ChangeAction, allowed: tuple[str, ...]) -> str | None:
    """The ResetType to send for `action`; None when the BMC allows none of them (for `cycle`: do off
    then on instead). With no allowed list, the first of the standard names."""
    wanted = RESET_FOR[action]
    if not allowed:
        return wanted[0]
    return next((reset for reset in wanted if reset in allowed), None)


def error_text(body: bytes) -> str:
    """The message of a Redfish error document (DSP0266 §9.6), else the start of the body, on one line."""
    try:
        doc = json.loads(body)
        error = doc["error"]
        infos = error.get("@Message.ExtendedInfo") or []
        text = next((i["Message"] for i in infos if isinstance(i, dict) and i.get("Message")), error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace")
    text = " ".join(str(text or "").split())
    return text[:200] + ("…" if len(text) > 200 else "")


# -- the client -------------------------------------------------------------------------------------

class RedfishController:
    def __init__(self, address: BmcAddress, user: str, password: str, *, timeout: float = 10.0,
                 power_wait: float = 60.0, poll: float = 0.5) -> None:
        if address.scheme != "redfish":
            raise ValueError(f"{address} is not a Redfish BMC")
        self.address = address
        # aiohttp drops this header on a redirect to another origin, so it never leaves the BMC.
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._password = password
        self._timeout = timeout
        self._power_wait = power_wait
        self._poll = poll
        self._system_path: str | None = (
            f"{SYSTEMS}/{quote(address.system_id, safe='')}" if address.system_id else None)

    async def status(self) -> PowerState:
        async with self._session() as session:
            return power_state_of(await self._system(session))

    async def power(self, action: ChangeAction) -> PowerState:
        async with self._session() as session:
            system = await self._system(session)
            state = power_state_of(system)
            target, allowed = reset_action(system, await self._path(session))
            want: PowerState = "off" if action == "off" else "on"
            if action == "cycle" and state == "off":
                action = "on"
            if action == "cycle" and choose_reset("cycle", allowed) is None:
                await self._reset(session, target, self._reset_type("off", allowed), "power cycle (off)")
                await self._wait(session, "off", "power cycle (off)")
                await self._reset(session, target, self._reset_type("on", allowed), "power cycle (on)")
            elif action == "cycle" or state != want:
                # On of a node that is on, or ForceOff of one that is off, is an error on many BMCs.
                await self._reset(session, target, self._reset_type(action, allowed), f"power {action}")
            return await self._wait(session, want, f"power {action}")

    async def boot_pxe_once(self) -> None:
        async with self._session() as session:
            path = await self._path(session)
            _, headers = await self._request(session, "GET", path, "read boot settings")
            # BMCs that version their resources (iLO 5, newer iDRACs) refuse a PATCH without If-Match.
            etag = {"If-Match": headers["ETag"]} if "ETag" in headers else {}
            body = {"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}
            await self._request(session, "PATCH", path, "set one-time PXE boot", body, etag)
            boot = (await self._system(session)).get("Boot") or {}
            if boot.get("BootSourceOverrideTarget") != "Pxe":
                raise BmcError(f"{self.address}: set one-time PXE boot: the BMC accepted it but reports boot "
                               f"target {boot.get('BootSourceOverrideTarget')!r}")

    # -- internals ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[aiohttp.ClientSession]:
        # ssl=True verifies against the system's CAs; False skips it (only for a ?verify=off URL).
        connector = aiohttp.TCPConnector(ssl=self.address.verify_tls, limit=2)
        headers = {"Authorization": self._authorization, "Accept": "application/json", "OData-Version": "4.0"}
        async with aiohttp.ClientSession(self.address.base_url, connector=connector, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self._timeout)) as session:
            yield session

    async def _path(self, session: aiohttp.ClientSession) -> str:
        if self._system_path is None:
            doc, _ = await self._request(session, "GET", SYSTEMS, "list systems")
            members = [m.get("@odata.id") for m in doc.get("Members") or [] if isinstance(m, dict)]
            if len(members) != 1 or not is_local_path(members[0]):
                raise BmcError(f"{self.address}: the BMC manages {len(members)} systems; name one in the URL "
                               f"({self.address}/SystemId)")
            self._system_path = members[0]
        return self._system_path

    async def _system(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        doc, _ = await self._request(session, "GET", await self._path(session), "read power state")
        return doc

    async def _status(self, session: aiohttp.ClientSession) -> PowerState:
        return power_state_of(await self._system(session))

    async def _wait(self, session: aiohttp.ClientSession, want: PowerState, what: str) -> PowerState:
        return await wait_for_state(lambda: self._status(session), want, within=self._power_wait,
                                    every=self._poll, what=f"{self.address}: {what}")

    def _reset_type(self, action: ChangeAction, allowed: tuple[str, ...]) -> str:
        reset = choose_reset(action, allowed)
        if reset is None:
            raise BmcError(f"{self.address}: power {action}: the BMC allows only ResetType {', '.join(allowed)}")
        return reset

    async def _reset(self, session: aiohttp.ClientSession, target: str, reset: str, what: str) -> None:
        await self._request(session, "POST", target, f"{what} (ResetType {reset})", {"ResetType": reset})

    async def _request(self, session: aiohttp.ClientSession, method: str, path: str, what: str,
                       body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
                       ) -> tuple[dict[str, Any], dict[str, str]]:
        """One call; its JSON object (or {} for an empty answer) and headers. Every failure → BmcError."""
        where = f"{self.address}: {what}"
        try:
            async with session.request(method, path, json=body, headers=headers) as response:
                data = await _read_bounded(response, where)
                status, answer_headers = response.status, dict(response.headers)
        except BmcError:
            raise
        except TimeoutError:
            raise BmcError(f"{where}: no answer within {self._timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise BmcError(f"{where}: TLS certificate refused ({exc.certificate_error}); "
                           "for a self-signed BMC add ?verify=off to its URL") from None
        except aiohttp.ClientConnectorError as exc:
            raise BmcError(f"{where}: cannot connect: {exc.os_error.strerror or exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise BmcError(self._scrub(f"{where}: {type(exc).__name__}: {exc}")) from None
        if status in (401, 403):
            raise BmcError(f"{where}: login refused (HTTP {status}): check the BMC user and password")
        if status >= 400:
            raise BmcError(self._scrub(f"{where}: HTTP {status}: {error_text(data) or 'no reason given'}"))
        if not data.strip():
            return {}, answer_headers
        try:
            doc = json.loads(data)
        except ValueError:
            raise BmcError(f"{where}: HTTP {status} with an answer that is not JSON") from None
        if not isinstance(doc, dict):
            raise BmcError(f"{where}: HTTP {status} with JSON that is not an object")
        return doc, answer_headers

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


async def _read_bounded(response: aiohttp.ClientResponse, where: str) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_BODY:
            raise BmcError(f"{where}: answer over {MAX_BODY} bytes")
    return bytes(data)
