"""Built-in boot profiles (hcc-cello's defaultLeader/defaultCompute, plus one per loader).

Config may override these by name or add more under [boot.profiles.NAME].

The default, `compute`, and `leader` boot through iPXE, so that TFTP carries only the first loader
(undionly.kpxe on a BIOS PXE ROM, ipxe.efi on UEFI PXE; nothing when the ROM is iPXE already, or on UEFI
HTTP Boot) and the kernel and initrd come over HTTP. Lock-step TFTP pays one round trip per 1.4 KiB
block and about a second per lost packet: bench/boot_storm.py measured 64 nodes done in 4.1 / 6.9 s on
iPXE against 27.2 / 29.7 s on pxelinux over TFTP, 256 nodes in 18.9 / 17.6 s against 109.1 / 125.3 s,
and at 1 % loss 4.6 s against 205 s (README, Benchmarks). iPXE rather than lpxelinux.0 because iPXE
runs the same per-node script on BIOS and UEFI, retries each step (render.IPXE_TRIES) where pxelinux
stops at its first failed fetch, and fills the iBFT from its SAN hook.

`pxelinux-tftp` is the old `compute` exactly (hcc-cello's pxelinux over TFTP), `pxelinux` the old
`leader`: servers that must keep that path name one of them.
"""

from __future__ import annotations

from bootfiles.spec import Loader, Profile

# The BIOS loader the proxyDHCP names for a loader when a profile does not name its own.
DEFAULT_BIOS_LOADER: dict[Loader, str] = {"pxelinux": "pxelinux.0", "ipxe": "undionly.kpxe"}

BUILTIN_PROFILES: dict[str, Profile] = {
    "leader": Profile(name="leader", loader="ipxe", kernel_args="console=ttyS0", bios_loader="undionly.kpxe"),
    "compute": Profile(name="compute", loader="ipxe", kernel_args="console=ttyS0 quiet", bios_loader="undionly.kpxe"),
    "pxelinux": Profile(name="pxelinux", loader="pxelinux", kernel_args="console=ttyS0"),
    "pxelinux-tftp": Profile(name="pxelinux-tftp", loader="pxelinux", kernel_args="console=ttyS0 quiet"),
    "ipxe": Profile(name="ipxe", loader="ipxe", kernel_args="console=ttyS0", bios_loader="undionly.kpxe"),
}
