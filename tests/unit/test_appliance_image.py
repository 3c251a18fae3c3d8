"""The FreeBSD appliance image and the image-build scripts, checked on Linux: shell syntax (sh -n),
shellcheck, the default config against the Config contract, and the rc.d scripts' rc.subr variables."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

IMAGE_BUILD = Path(__file__).resolve().parents[2] / "image-build"
APPLIANCE = IMAGE_BUILD / "appliance"
RC_CELLO = APPLIANCE / "rc.d/cello"
RC_FIRSTBOOT = APPLIANCE / "rc.d/cello_firstboot"
DEFAULT_CONFIG = APPLIANCE / "cello.toml"

# DESIGN.md, "Config": the documented sections and keys.
DOCUMENTED_KEYS = {
    "appliance": {"state_dir", "advertise"},
    "api": {"listen", "admin_token"},
    "tftp": {"listen", "roots", "blksize_max", "windowsize_max"},
    "dhcp": {"enabled", "listen", "port", "pxe_port", "interface", "unknown"},
    "storage": {"backend", "path", "pool", "kind"},
    "iscsi": {"driver", "iqn_prefix", "portals"},
}


def shell_scripts() -> list[Path]:
    found = [p for p in sorted(IMAGE_BUILD.rglob("*")) if p.is_file() and p.read_bytes()[:9] == b"#!/bin/sh"]
    return found


def test_every_expected_script_is_found() -> None:
    names = {str(p.relative_to(IMAGE_BUILD)) for p in shell_scripts()}
    assert {"tiny/init", "tiny/rootinit", "tiny/udhcpc.script", "debian/cello-booted", "appliance/build.sh",
            "appliance/rc.d/cello", "appliance/rc.d/cello_firstboot"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(IMAGE_BUILD)))
def test_script_syntax_and_shellcheck(script: Path) -> None:
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run(["shellcheck", "-s", "sh", "-S", "style", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_default_config_has_only_documented_keys() -> None:
    raw = tomllib.loads(DEFAULT_CONFIG.read_text())
    assert set(raw) <= set(DOCUMENTED_KEYS)
    for section, keys in raw.items():
        assert set(keys) <= DOCUMENTED_KEYS[section], f"[{section}] has undocumented keys"
    assert raw["storage"]["backend"] == "zfs" and raw["iscsi"]["driver"] == "ctld"
    assert raw["storage"]["pool"] == "cello/volumes"


def test_default_config_loads_through_the_appliance_loader() -> None:
    from appliance.config import load_config

    config = load_config(DEFAULT_CONFIG)
    assert config.storage.backend == "zfs" and config.storage.kind == "zvol"
    assert config.storage.pool == "cello/volumes"
    assert config.iscsi.driver == "ctld"
    assert str(config.appliance.state_dir) == "/var/db/cello"
    assert tuple(config.tftp.roots) == ("/usr/local/share/cello/loaders",)


def _rc_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r'^: "\$\{(\w+):=([^}]*)\}"$', text, re.M))


def _assignments(text: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r"^(\w+)=(\S.*)$", text, re.M)}


def test_rc_cello_uses_rc_subr_and_daemon() -> None:
    text = RC_CELLO.read_text()
    header = re.findall(r"^# (PROVIDE|REQUIRE|BEFORE|KEYWORD): (.*)$", text, re.M)
    assert ("PROVIDE", "cello") in header
    require = dict(header)["REQUIRE"].split()
    assert {"NETWORKING", "ctld", "zfs"} <= set(require)
    assert "shutdown" in dict(header)["KEYWORD"].split()

    values = _assignments(text)
    assert values["name"] == "cello" and values["rcvar"] == "cello_enable"
    assert values["pidfile"] == "/var/run/${name}.pid"
    assert values["command"] == "/usr/sbin/daemon"
    args = values["command_args"].split()
    assert args[args.index("-P") + 1] == "${pidfile}"  # the supervisor's pidfile: stop signals daemon(8)
    assert "-r" in args and args[args.index("-o") + 1] == "${cello_logfile}"
    assert "serve" in args and args[args.index("--config") + 1] == "${cello_config}"
    assert values["required_files"] == "${cello_config}"

    defaults = _rc_defaults(text)
    assert defaults["cello_enable"] == "NO"
    assert defaults["cello_config"] == "/usr/local/etc/cello/cello.toml"
    assert set(defaults) == {"cello_enable", "cello_config", "cello_logfile", "cello_flags"}
    # rc.subr order: source it, name it, load rc.conf, then defaults, and run_rc_command last.
    order = [text.index(s) for s in (". /etc/rc.subr", 'name="cello"', 'load_rc_config "$name"',
                                     ': "${cello_enable:=NO}"')]
    assert order == sorted(order)
    assert text.rstrip().endswith('run_rc_command "$1"')


def test_rc_firstboot_runs_once_before_ctld_and_cello() -> None:
    text = RC_FIRSTBOOT.read_text()
    header = dict(re.findall(r"^# (PROVIDE|REQUIRE|BEFORE|KEYWORD): (.*)$", text, re.M))
    assert header["PROVIDE"] == "cello_firstboot"
    assert {"ctld", "cello"} <= set(header["BEFORE"].split())
    assert "firstboot" in header["KEYWORD"].split()
    assert _assignments(text)["rcvar"] == "cello_firstboot_enable"
    defaults = _rc_defaults(text)
    assert defaults["cello_firstboot_pool"] == "cello"
    # The datasets it makes are the ones the default config names.
    raw = tomllib.loads(DEFAULT_CONFIG.read_text())
    assert '"${pool}/volumes"' in text and raw["storage"]["pool"] == defaults["cello_firstboot_pool"] + "/volumes"
    assert "mountpoint=" + raw["appliance"]["state_dir"] in text
    assert text.index("zpool import -N") < text.index("zpool create -O")  # never re-create a pool
    assert text.rstrip().endswith('run_rc_command "$1"')


def test_build_script_installs_what_the_rc_scripts_and_config_expect() -> None:
    text = (APPLIANCE / "build.sh").read_text()
    assert "/usr/local/etc/rc.d/cello" in text and "/usr/local/etc/rc.d/cello_firstboot" in text
    assert "/usr/local/etc/cello/cello.toml" in text
    for package in ("python311", "aiohttp", "dnslib", "scapy", "syslinux", "ipxe"):
        assert package in text
    roots = tomllib.loads(DEFAULT_CONFIG.read_text())["tftp"]["roots"]
    assert all(root.replace("/usr/local", "${root}/usr/local") in text for root in roots)
    assert 'ctld_enable="YES"' in text and 'cello_enable="YES"' in text


def test_build_script_installs_every_runtime_dependency_as_a_package() -> None:
    # Cello itself goes in with `pip install --no-deps`: a dependency pyproject.toml names and the
    # package list lacks is an ImportError on the appliance (psycopg was, for a PostgreSQL store).
    text = (APPLIANCE / "build.sh").read_text()
    assert "pip install --no-deps" in text
    listed = set(re.findall(r"\$\{py\}-([a-z0-9_-]+)", text.split('packages="', 1)[1].split('"', 1)[0]))
    deps = tomllib.loads((IMAGE_BUILD.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.match(r"[A-Za-z0-9_-]+", d).group(0).lower() for d in deps}  # type: ignore[union-attr]
    assert wanted and wanted <= listed, wanted - listed


def test_build_script_refuses_to_run_on_linux() -> None:
    result = subprocess.run(["sh", str(APPLIANCE / "build.sh")], capture_output=True, text=True, timeout=10)
    assert result.returncode == 1 and "FreeBSD only" in result.stderr


def test_readme_says_it_cannot_be_built_on_linux() -> None:
    assert "cannot be built on Linux" in (APPLIANCE / "README.md").read_text()
