"""Typed requests: what a caller (the API, the CLI through it, a test) asks the domain to do.

The web edge parses JSON into these (web/requests.py: types and shapes, 422 for a wrong one); the
domain checks what only it can (name rules, profiles, quotas, existence) and raises domain errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import naming
from domain.errors import InvalidRequest

MAX_MACS = 16
MAX_DATA_VOLUMES = 64
MAX_DATA_GB = 65536
MAX_QUOTA_VOLUMES = 100000
MAX_QUOTA_GB = 10000000


@dataclass(frozen=True)
class CreateServer:
    uuid: str
    template: str
    owner: str
    profile: str = ""  # "" = the appliance's default profile
    macs: tuple[str, ...] = ()
    data_gb: tuple[int, ...] = ()
    hostname: str = ""
    address: str = ""

    def checked(self, profiles: Sequence[str], default_profile: str) -> CreateServer:
        """The request with names normalised and every rule checked; InvalidRequest naming the field."""
        uuid = naming.UUID.check(self.uuid.lower(), InvalidRequest, "uuid")
        if uuid in naming.BROKEN_UUIDS:
            raise InvalidRequest("uuid: all-zero and all-one UUIDs are what broken boards report; give the MAC")
        naming.TEMPLATE.check(self.template, InvalidRequest, "template")
        profile = self.profile or default_profile
        if profile not in profiles:
            raise InvalidRequest(f"profile: must be one of {', '.join(profiles)}")
        if len(self.macs) > MAX_MACS:
            raise InvalidRequest(f"macs: at most {MAX_MACS} MAC addresses")
        macs = tuple(sorted({naming.MAC.check(naming.normalize_mac(m), InvalidRequest, "mac") for m in self.macs}))
        if len(self.data_gb) > MAX_DATA_VOLUMES:
            raise InvalidRequest(f"data_volumes: at most {MAX_DATA_VOLUMES}")
        for i, gb in enumerate(self.data_gb):
            if not 1 <= gb <= MAX_DATA_GB:
                raise InvalidRequest(f"data_volumes[{i}].size_gb: must be an integer 1..{MAX_DATA_GB}")
        if self.hostname:
            naming.HOSTNAME.check(self.hostname, InvalidRequest, "hostname")
        if self.address:
            naming.IPV4.check(self.address, InvalidRequest, "address")
        return CreateServer(uuid, self.template, self.owner, profile, macs, self.data_gb, self.hostname,
                            self.address)


@dataclass(frozen=True)
class Quota:
    max_volumes: int
    max_data_gb: int

    def checked(self) -> Quota:
        if not 0 <= self.max_volumes <= MAX_QUOTA_VOLUMES:
            raise InvalidRequest(f"max_volumes: must be an integer 0..{MAX_QUOTA_VOLUMES}")
        if not 0 <= self.max_data_gb <= MAX_QUOTA_GB:
            raise InvalidRequest(f"max_data_gb: must be an integer 0..{MAX_QUOTA_GB}")
        return self


DEFAULT_QUOTA = Quota(max_volumes=32, max_data_gb=1024)


@dataclass(frozen=True)
class QuotaChange:
    """Either field None: unchanged."""

    max_volumes: int | None = None
    max_data_gb: int | None = None
