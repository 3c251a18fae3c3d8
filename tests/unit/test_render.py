"""Boot config rendering: exact output for each loader, and strict refusals."""

from __future__ import annotations

import dataclasses

import pytest

from bootfiles.render import (
    BUILTIN_PROFILES,
    IPXE_TRIES,
    RenderError,
    kernel_cmdline,
    render_grub,
    render_ipxe,
    render_pxelinux,
)
from bootfiles.spec import BootSpec, IscsiRoot, Profile

UUID = "3f1c0000-0000-4000-8000-000000000001"
IQN = f"iqn.2026-11.io.cello:{UUID}"
INIT = f"iqn.2026-11.io.cello:node-{UUID}"


def spec(profile: str = "compute", **root_changes: object) -> BootSpec:
    root = IscsiRoot(target_iqn=IQN, portal_ip="10.77.0.2", portal_port=3260, lun=1, initiator_iqn=INIT)
    root = dataclasses.replace(root, **root_changes)  # type: ignore[arg-type]
    return BootSpec(
        server_uuid=UUID,
        profile=BUILTIN_PROFILES[profile],
        kernel="templates/tiny/v1/vmlinuz",
        initrd="templates/tiny/v1/initrd.img",
        root=root,
        http_base="http://10.77.0.2:8080",
    )


CMDLINE = (
    f"console=ttyS0 quiet ISCSI_INITIATOR={INIT} ISCSI_TARGET_NAME={IQN} "
    "ISCSI_TARGET_IP=10.77.0.2 ISCSI_TARGET_PORT=3260 ISCSI_TARGET_GROUP=1 "
    f"netroot=iscsi:10.77.0.2::3260:1:{IQN} rd.iscsi.initiator={INIT} cello.server={UUID} cello.lun=1"
)


def test_cmdline_order_and_keys() -> None:
    assert kernel_cmdline(spec()) == CMDLINE


def test_cmdline_with_chap() -> None:
    line = kernel_cmdline(spec(chap_user="node1", chap_secret="s3cr3t-Secret"))
    assert "ISCSI_TARGET_GROUP=1 ISCSI_USERNAME=node1 ISCSI_PASSWORD=s3cr3t-Secret netroot=" in line
    assert f"netroot=iscsi:node1:s3cr3t-Secret@10.77.0.2::3260:1:{IQN} " in line


def test_cmdline_uses_the_lun_the_driver_used() -> None:
    line = kernel_cmdline(spec(lun=0))
    assert f":3260:0:{IQN}" in line and line.endswith("cello.lun=0")


def test_ipv6_portal() -> None:
    line = kernel_cmdline(spec(portal_ip="fd77::2"))
    assert "ISCSI_TARGET_IP=fd77::2 " in line and f"netroot=iscsi:[fd77::2]::3260:1:{IQN}" in line
    assert f"sanhook --drive 0x80 iscsi:[fd77::2]::3260:1:{IQN}" in render_ipxe(spec(portal_ip="fd77::2"))


def test_pxelinux() -> None:
    """The hcc-cello path: kernel and initrd are TFTP paths in the tree, not URLs."""
    assert render_pxelinux(spec("pxelinux-tftp")) == (
        "DEFAULT cello\nPROMPT 0\nTIMEOUT 0\nLABEL cello\n"
        "  KERNEL /templates/tiny/v1/vmlinuz\n  INITRD /templates/tiny/v1/initrd.img\n"
        f"  APPEND {CMDLINE}\n"
    )


def test_ipxe() -> None:
    text = render_ipxe(spec(lun=26))
    assert text.startswith(f"#!ipxe\nset initiator-iqn {INIT}\n")
    commands = [line.split(" && ")[0] for line in text.splitlines() if " && goto cello_" in line and "_ok" in line]
    assert commands == [
        f"sanhook --drive 0x80 iscsi:10.77.0.2::3260:1a:{IQN}",
        f"kernel http://10.77.0.2:8080/boot/files/templates/tiny/v1/vmlinuz {CMDLINE.replace(':1:', ':26:')}".replace(
            "cello.lun=1", "cello.lun=26") + " ip=${ip}:${next-server}:${gateway}:${netmask} initrd=initrd.img",
        "initrd --name initrd.img http://10.77.0.2:8080/boot/files/templates/tiny/v1/initrd.img",
    ]
    assert text.endswith("boot\n:cello_failed\necho cello: giving up, back to the next boot device\nexit 1\n")


def test_ipxe_retries_every_step_with_a_growing_wait_then_gives_up() -> None:
    """Stock iPXE stops at the first failed command: a target restarting or a storm loses the node."""
    lines = render_ipxe(spec()).splitlines()
    for step in ("sanhook", "kernel", "initrd"):
        at = lines.index(f":cello_{step}")
        assert lines[at - 1] == "set tries 0"
        assert lines[at + 1].endswith(f" && goto cello_{step}_ok ||")  # success skips the retry
        assert lines[at + 2:at + 8] == [
            "inc tries", f"iseq ${{tries}} {IPXE_TRIES} && goto cello_failed ||",
            f"echo cello: {step} failed, try ${{tries}} of {IPXE_TRIES}, again in ${{tries}} s",
            "sleep ${tries}", f"goto cello_{step}", f":cello_{step}_ok"]
    assert lines.index(":cello_sanhook") < lines.index(":cello_kernel") < lines.index(":cello_initrd")


def test_ipxe_chap_set_before_sanhook() -> None:
    lines = render_ipxe(spec(chap_user="u1", chap_secret="pw")).splitlines()
    assert lines[1:4] == [f"set initiator-iqn {INIT}", "set username u1", "set password pw"]
    assert lines[5] == ":cello_sanhook" and lines[6].startswith("sanhook ")


def test_grub() -> None:
    assert render_grub(spec()) == (
        f'set default=0\nset timeout=0\nmenuentry "cello {UUID}" {{\n'
        f"  linux /templates/tiny/v1/vmlinuz {CMDLINE}\n"
        "  initrd /templates/tiny/v1/initrd.img\n}\n"
    )


def test_builtin_profiles() -> None:
    assert {"leader", "compute", "pxelinux", "pxelinux-tftp", "ipxe"} <= set(BUILTIN_PROFILES)
    for name in ("ipxe", "compute", "leader"):  # big files over HTTP
        assert BUILTIN_PROFILES[name].loader == "ipxe" and BUILTIN_PROFILES[name].bios_loader == "undionly.kpxe"
    for name in ("pxelinux", "pxelinux-tftp"):  # everything over TFTP, as hcc-cello
        assert BUILTIN_PROFILES[name].loader == "pxelinux" and BUILTIN_PROFILES[name].bios_loader == "pxelinux.0"
    # pxelinux-tftp is the old default exactly, kernel arguments included
    assert BUILTIN_PROFILES["pxelinux-tftp"].kernel_args == BUILTIN_PROFILES["compute"].kernel_args


def test_empty_kernel_args() -> None:
    s = dataclasses.replace(spec(), profile=Profile(name="bare", kernel_args=""))
    assert kernel_cmdline(s).startswith("ISCSI_INITIATOR=")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kernel": ""}, "kernel"),
        ({"kernel": "../etc/passwd"}, "kernel"),
        ({"kernel": "/abs/vmlinuz"}, "kernel"),
        ({"initrd": "a b"}, "initrd"),
        ({"server_uuid": "not-a-uuid"}, "server_uuid"),
        ({"server_uuid": "{" + UUID + "}"}, "server_uuid"),
        ({"http_base": "ftp://x"}, "http_base"),
        ({"profile": Profile(name="p", kernel_args="quiet\nDEFAULT evil")}, "profile.kernel_args"),
        ({"profile": Profile(name="p", kernel_args="quiet  console=ttyS0")}, "profile.kernel_args"),
        ({"profile": Profile(name="p", kernel_args=" quiet")}, "profile.kernel_args"),
        ({"profile": Profile(name="p", kernel_args="x=${evil}")}, "profile.kernel_args"),
        ({"profile": Profile(name="p", kernel_args="a;b")}, "profile.kernel_args"),
    ],
)
def test_spec_refusals(change: dict[str, object], field: str) -> None:
    bad = dataclasses.replace(spec(), **change)  # type: ignore[arg-type]
    with pytest.raises(RenderError) as info:
        render_ipxe(bad) if field == "http_base" else render_pxelinux(bad)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_iqn": ""}, "root.target_iqn"),
        ({"target_iqn": "iqn.2026-11.io.cello:x\n"}, "root.target_iqn"),
        ({"target_iqn": "nonsense"}, "root.target_iqn"),
        ({"initiator_iqn": "iqn.2026-11.io.cello:a b"}, "root.initiator_iqn"),
        ({"portal_ip": "10.77.0.300"}, "root.portal_ip"),
        ({"portal_ip": "host name"}, "root.portal_ip"),
        ({"portal_port": 0}, "root.portal_port"),
        ({"portal_port": 70000}, "root.portal_port"),
        ({"lun": -1}, "root.lun"),
        ({"lun": 20000}, "root.lun"),
        ({"chap_user": "u"}, "root.chap_user"),
        ({"chap_user": "u:x", "chap_secret": "p"}, "root.chap_user"),
        ({"chap_user": "u", "chap_secret": "p@q"}, "root.chap_secret"),
        ({"chap_user": "u", "chap_secret": "p q"}, "root.chap_secret"),
    ],
)
def test_root_refusals(change: dict[str, object], field: str) -> None:
    with pytest.raises(RenderError) as info:
        kernel_cmdline(spec(**change))
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
