"""The templates' initiator side for a root on iSCSI: one set of settings (image-build/tiny/iscsid.conf) that
the tiny initramfs passes to iscsistart, the tiny root's iscsid reads, and the Debian template merges into
open-iscsi's own iscsid.conf; iscsid shipped in the tiny root and enabled early in the Debian one.

The system test tests/system/test_root_survives.py shows the settings at work (a node whose target goes away).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from images.initramfs import busybox_applets_from_list, host_libraries
from images.rootfs import (
    IMAGE_BUILD_DIR,
    TinyInputs,
    _configure_debian,
    _fill_tiny,
    conf_settings,
    with_settings,
)
from iscsi.runner import run_output

ROOT_CONF = IMAGE_BUILD_DIR / "tiny/iscsid.conf"

# The shape of open-iscsi's shipped iscsid.conf (Debian 12): comments around active lines, a commented-out
# alternative before the active one, keys the root settings leave alone.
DEBIAN_CONF = """\
# To request that the iscsi service scripts startup a session, use "automatic":
# node.startup = automatic
#
# To manually startup the session, use "manual". The default is manual.
node.startup = manual
# The value is in seconds and the default is 120 seconds.
node.session.timeo.replacement_timeout = 120
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.cmds_max = 128
"""


def test_the_root_settings_are_a_long_replacement_timeout_and_no_nop_outs() -> None:
    settings = conf_settings(ROOT_CONF.read_text())
    assert int(settings["node.session.timeo.replacement_timeout"]) >= 3600
    assert settings["node.conn[0].timeo.noop_out_interval"] == "0"
    assert settings["node.conn[0].timeo.noop_out_timeout"] == "0"


def test_the_tiny_initramfs_gives_iscsistart_the_same_settings() -> None:
    init = (IMAGE_BUILD_DIR / "tiny/init").read_text()
    passed = dict(re.findall(r'-P "([^"=]+)=([^"]*)"', init))
    settings = conf_settings(ROOT_CONF.read_text())
    assert passed, "tiny/init passes no -P settings to iscsistart"
    assert passed == {k: v for k, v in settings.items() if k in passed}
    for key in ("node.session.timeo.replacement_timeout", "node.conn[0].timeo.noop_out_interval",
                "node.conn[0].timeo.noop_out_timeout"):
        assert key in passed
    # both logins get them: explicit target keys and the iBFT
    assert 'iscsistart "$@"' in init and 'iscsistart -b "$@"' in init


def test_with_settings_replaces_in_place_and_keeps_the_rest() -> None:
    out = with_settings(DEBIAN_CONF, {"node.session.timeo.replacement_timeout": "86400",
                                      "node.startup": "manual", "node.session.scan": "auto"})
    assert conf_settings(out) == {
        "node.startup": "manual",
        "node.session.timeo.replacement_timeout": "86400",
        "node.conn[0].timeo.login_timeout": "15",
        "node.conn[0].timeo.noop_out_interval": "5",
        "node.conn[0].timeo.noop_out_timeout": "5",
        "node.session.cmds_max": "128",
        "node.session.scan": "auto",
    }
    lines = out.splitlines()
    # an active line is set where it stands; the commented-out alternative above it stays a comment
    assert lines.count("node.startup = manual") == 1
    assert lines.index("node.startup = manual") == 4
    assert lines[1] == "# node.startup = automatic"
    # a key with only a commented-out line takes that line's place
    assert with_settings("# node.session.scan = manual\nx = 1\n", {"node.session.scan": "auto"}) == \
        "node.session.scan = auto\nx = 1\n"
    assert "# The value is in seconds and the default is 120 seconds." in lines
    assert lines[-1] == "node.session.scan = auto"
    assert with_settings(out, {"node.session.scan": "auto"}) == out


def test_debian_root_gets_the_settings_in_both_iscsid_conf_and_its_initramfs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/iscsi").mkdir(parents=True)
    (root / "etc/initramfs-tools").mkdir()
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/iscsi/iscsid.conf").write_text(DEBIAN_CONF)
    _configure_debian(root, IMAGE_BUILD_DIR)

    conf = conf_settings((root / "etc/iscsi/iscsid.conf").read_text())
    for key, value in conf_settings(ROOT_CONF.read_text()).items():
        assert conf[key] == value, key
    assert conf["node.session.cmds_max"] == "128"
    hook = root / "etc/initramfs-tools/hooks/cello-iscsi-conf"
    assert hook.stat().st_mode & 0o111 and "iscsid.conf" in hook.read_text()
    units = root / "etc/systemd/system"
    assert "OPENSSL_CONF=/dev/null" in (units / "iscsid.service.d/cello-root.conf").read_text()
    assert Path(str((units / "sysinit.target.wants/iscsid.service").readlink())) == \
        Path("/lib/systemd/system/iscsid.service")
    assert (units / "multi-user.target.wants/cello-booted.service").is_symlink()


def test_tiny_root_carries_iscsid_its_libraries_and_the_root_settings(tmp_path: Path) -> None:
    iscsid = Path("/usr/sbin/iscsid")
    busybox = Path("/bin/busybox")
    libs = asyncio.run(host_libraries(iscsid))
    assert any("libc.so" in lib for lib in libs) and any("ld-linux" in lib for lib in libs)
    tiny = TinyInputs(
        busybox=busybox,
        applets=busybox_applets_from_list(asyncio.run(run_output([str(busybox), "--list-full"]))),
        rootinit=IMAGE_BUILD_DIR / "tiny/rootinit",
        iscsid=iscsid,
        iscsid_conf=ROOT_CONF,
        libs=libs,
    )
    root = tmp_path / "root"
    _fill_tiny(root, tiny)
    assert (root / "sbin/iscsid").read_bytes() == iscsid.read_bytes()
    for lib in libs:
        assert (root / lib.lstrip("/")).is_file(), lib
    assert (root / "etc/iscsi/iscsid.conf").read_text() == ROOT_CONF.read_text()
    # rootinit copies these into its RAM jail for iscsid
    rootinit = (root / "sbin/init").read_text()
    for needed in ("/sbin/iscsid", "/lib /lib64", "/etc/iscsi/iscsid.conf", "/etc/passwd"):
        assert needed in rootinit, needed
    assert (root / "etc/passwd").read_text().startswith("root:")
