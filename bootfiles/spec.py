"""What a node boots: the contract between the appliance (which knows the store) and the boot services.

`bootfiles` and `dhcp` never read the store; they ask a `BootPolicy` that the appliance implements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Loader = Literal["pxelinux", "ipxe"]

# A sink for boot events (TFTP fetches, DHCP offers): kind, then JSON-able fields.
EventSink = Callable[[str, Mapping[str, object]], None]


@dataclass(frozen=True)
class Profile:
    """A boot profile: how a node boots its OS template (hcc-cello's defaultLeader/defaultCompute)."""

    name: str
    loader: Loader = "pxelinux"
    kernel_args: str = "console=ttyS0"
    # BIOS loader file the proxyDHCP names for this profile (pxelinux.0 for pxelinux, undionly.kpxe for iPXE).
    bios_loader: str = "pxelinux.0"
    efi_loader: str = "ipxe.efi"


@dataclass(frozen=True)
class IscsiRoot:
    """The iSCSI root disk of one server, as the export driver really made it."""

    target_iqn: str
    portal_ip: str
    portal_port: int
    lun: int
    initiator_iqn: str
    chap_user: str | None = None
    chap_secret: str | None = field(default=None, repr=False)
    chap_mutual_user: str | None = None  # mutual CHAP: the target's name and secret
    chap_mutual_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BootSpec:
    """Everything needed to render one server's boot config."""

    server_uuid: str
    profile: Profile
    kernel: str  # path inside the boot tree, e.g. "templates/tiny/v1/vmlinuz"
    initrd: str
    root: IscsiRoot | None  # None: a diskless boot (an unknown node booting the unknown-node profile)
    http_base: str  # e.g. "http://10.77.0.2:8080" — where iPXE fetches scripts, kernels and initrds
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class PxeClient:
    """A PXE client as the proxyDHCP saw it in one boot request: what an operator needs to adopt it."""

    mac: str
    uuid: str | None  # SMBIOS UUID from option 97, canonical; None when absent or broken
    arch: int  # option 93 (RFC 4578 §2.1)
    vendor_class: str  # option 60, e.g. "PXEClient:Arch:00000:UNDI:002001"
    user_class: str  # option 77, e.g. "iPXE"
    address: str | None  # the address the packet says the client holds (dhcp.binding), if it says


class BootPolicy(Protocol):
    """Implemented by the appliance from its state store."""

    def boot_spec(self, *, uuid: str | None, mac: str | None) -> BootSpec | None:
        """The boot spec of a known server (by SMBIOS UUID, falling back to MAC), or the unknown-node
        profile's spec, or None when the node must get no answer."""
        ...

    def client_seen(self, *, mac: str, uuid: str | None, address: str) -> None:
        """The proxyDHCP saw a DHCP packet of this client say it holds `address` (see
        `dhcp.binding`); called for packets it answers and for those it does not. Cheap and
        synchronous; the policy keeps it only for known servers."""
        ...

    def client_unknown(self, client: PxeClient) -> None:
        """The proxyDHCP got a boot request from a client that no server record names (no boot spec,
        or the unknown-node profile's). Called from the datagram handler: cheap, synchronous, never
        blocking; the policy notes it (discovered nodes) and persists it later, off the loop."""
        ...

    def may_fetch(self, spec: BootSpec, address: str) -> bool:
        """May the host at `address` (the TFTP/HTTP peer) be sent the config rendered from `spec`?
        A spec with a root disk carries the node's secret: only its node's address may have it."""
        ...
