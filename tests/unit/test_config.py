from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import ConfigError, describe_defaults, load_config, parse_config


def test_embedded_defaults_match_the_design_contract() -> None:
    c = parse_config({})
    assert c.appliance.state_dir == Path("./var/cello")
    assert c.api.listen == "0.0.0.0:8080"  # the default profile's nodes boot over HTTP from it
    assert c.tftp.listen == "0.0.0.0:69" and c.tftp.blksize_max == 1468 and c.tftp.windowsize_max == 64
    assert (c.dhcp.port, c.dhcp.pxe_port, c.dhcp.unknown) == (67, 4011, "ignore")
    assert (c.storage.backend, c.storage.kind) == ("file", "zvol")
    assert c.iscsi.driver == "auto" and c.iscsi.portals == ("0.0.0.0:3260",)
    assert {"leader", "compute", "pxelinux", "pxelinux-tftp", "ipxe"} <= set(c.boot.profiles)
    assert c.boot.default_profile == "compute" and c.boot.profiles["compute"].loader == "ipxe"


def test_the_store_is_sqlite_unless_a_postgresql_url_is_given() -> None:
    assert parse_config({}).store.url == ""
    url = "postgresql://cello@db.example:5432/cello?sslmode=require"
    assert parse_config({"store": {"url": url}, "fleet": {"name": "a"}}).store.url == url
    with pytest.raises(ConfigError, match=r"fleet\.name: a PostgreSQL store"):
        parse_config({"store": {"url": url}})  # a shared store: the appliance's name must not drift


def test_every_key_is_documented() -> None:
    rows = describe_defaults()
    assert len(rows) > 25
    assert all(doc for _, _, doc in rows)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tftp": {"blksize_max": 4}}, "tftp.blksize_max: must be 8..65464"),
        ({"tftp": {"blksize_max": "big"}}, "tftp.blksize_max: must be an integer"),
        ({"tftp": {"blksize_max": True}}, "tftp.blksize_max: must be an integer"),
        ({"tftp": {"colour": 1}}, "tftp.colour: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown section"),
        ({"dhcp": {"enabled": "yes"}}, "dhcp.enabled: must be true or false"),
        ({"dhcp": {"unknown": "nope"}}, "dhcp.unknown: must be 'ignore' or a profile name"),
        ({"api": {"listen": "8080"}}, "api.listen: must be HOST:PORT"),
        ({"store": {"url": "mysql://db.example/cello"}}, "store.url: must be '' (the SQLite file"),
        ({"store": {"url": "/var/lib/cello.db"}}, "store.url: must be '' (the SQLite file"),
        ({"store": {"url": 5}}, "store.url: must be a string"),
        ({"api": {"listen": "example.com:80"}}, "api.listen: 'example.com' is not an IP address"),
        ({"storage": {"backend": "lvm"}}, "storage.backend: must be one of 'file', 'zfs'"),
        ({"storage": {"backend": "zfs"}}, "storage.pool: the zfs backend needs a pool"),
        ({"iscsi": {"portals": []}}, "iscsi.portals: needs at least one portal"),
        ({"iscsi": {"portals": "0.0.0.0:3260"}}, "iscsi.portals: must be an array of strings"),
        ({"iscsi": {"iqn_prefix": "not an iqn"}}, "iscsi.iqn_prefix: must look like iqn."),
        ({"boot": {"default_profile": "ghost"}}, "boot.default_profile: no profile named 'ghost'"),
        ({"boot": {"profiles": {"x": {"loader": "grub"}}}}, "boot.profiles.x.loader: must be"),
        ({"boot": {"profiles": {"x": {"kernel": "a"}}}}, "boot.profiles.x.kernel: unknown key"),
        ({"appliance": {"advertise": "10.0.0"}}, "appliance.advertise: must be an IPv4 address"),
        ({"appliance": {"state_dir": "a\nb"}}, None),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, object], message: str | None) -> None:
    if message is None:  # a path with a newline is accepted as a path: Path() allows it
        parse_config(raw)
        return
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_profiles_from_config_extend_and_override_the_builtins() -> None:
    c = parse_config({"boot": {"profiles": {"gpu": {"loader": "ipxe", "kernel_args": "console=ttyS1"},
                                            "compute": {"kernel_args": "console=tty0"}},
                               "default_profile": "gpu"}})
    assert c.boot.profiles["gpu"].loader == "ipxe"
    assert c.boot.profiles["compute"].kernel_args == "console=tty0"
    assert c.boot.profiles["compute"].loader == "ipxe"  # an override keeps what it does not name
    assert c.boot.profiles["pxelinux-tftp"].loader == "pxelinux"


def test_a_profile_naming_only_its_loader_gets_that_loaders_bios_file() -> None:
    """`compute` chains undionly.kpxe; switched back to pxelinux it must offer pxelinux.0, and a new iPXE
    profile must not offer pxelinux.0 (the Profile dataclass's default) to a plain PXE ROM."""
    c = parse_config({"boot": {"profiles": {"gpu": {"loader": "ipxe"}, "compute": {"loader": "pxelinux"},
                                            "own": {"loader": "ipxe", "bios_loader": "snponly.kpxe"}}}})
    assert c.boot.profiles["gpu"].bios_loader == "undionly.kpxe"
    assert c.boot.profiles["compute"].bios_loader == "pxelinux.0"
    assert c.boot.profiles["compute"].kernel_args == "console=ttyS0 quiet"
    assert c.boot.profiles["own"].bios_loader == "snponly.kpxe"


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tftp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text('[tftp]\nlisten = "127.0.0.1:6969"\nroots = ["/tmp"]\n')
    assert load_config(good).tftp.roots == ("/tmp",)


def _cello(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=60)


def test_cli_refuses_a_bad_config_with_one_line_and_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[tftp]\nblksize_max = 70000\n")
    for command in (["serve", "--config", str(bad)], ["check-config", str(bad)]):
        r = _cello(*command)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == "config error: tftp.blksize_max: must be 8..65464"
        assert "Traceback" not in r.stderr


def test_cli_version() -> None:
    r = _cello("--version")
    assert r.returncode == 0 and r.stdout.startswith("cello ")


def test_serve_lifts_a_low_open_file_limit() -> None:
    """In a child process: from a soft limit of 256 to what 512 TFTP transfers need, within the hard limit."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from appliance.host import raise_open_file_limit\n"
        "got = raise_open_file_limit(1536)\n"
        "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "want = 1536 if hard == resource.RLIM_INFINITY else min(1536, hard)\n"
        "assert got == now == want, (got, now, want)\n"
        "assert raise_open_file_limit(100) == now  # never lowered\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr
