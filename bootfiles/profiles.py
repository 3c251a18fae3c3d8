"""Built-in boot profiles (hcc-cello's defaultLeader/defaultCompute, plus one per loader).

Config may override these by name or add more under [boot.profiles.NAME].
"""

from __future__ import annotations

from bootfiles.spec import Profile

BUILTIN_PROFILES: dict[str, Profile] = {
    "leader": Profile(name="leader", loader="pxelinux", kernel_args="console=ttyS0"),
    "compute": Profile(name="compute", loader="pxelinux", kernel_args="console=ttyS0 quiet"),
    "pxelinux": Profile(name="pxelinux", loader="pxelinux", kernel_args="console=ttyS0"),
    "ipxe": Profile(name="ipxe", loader="ipxe", kernel_args="console=ttyS0", bios_loader="undionly.kpxe"),
}
