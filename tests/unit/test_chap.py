"""Per-server CHAP from the record to every place it is rendered: the target (tgt, ctl.conf) and the node's
boot config (pxelinux/GRUB kernel arguments, iPXE script), one-way and mutual."""

from __future__ import annotations

import dataclasses

import pytest

from bootfiles.render import RenderError, kernel_cmdline, render_ipxe
from domain.exports import SECRET_LENGTH, chap_for, target_auth
from domain.store import ServerRow
from iscsi import ctlconf, names
from iscsi.model import NameError_, TargetSpec
from tests.unit.test_iscsi_specs import PREFIX, U1, stable_lun
from tests.unit.test_render import spec as boot_spec

NODE = f"{PREFIX}:node-{U1}"


def server(**chap: str) -> ServerRow:
    return ServerRow(uuid=U1, template="tiny", version="v1", profile="compute", owner="alice", state="available",
                     reason="", macs=(), hostname="", address="", created_at=0, updated_at=0, **chap)


@pytest.mark.parametrize("mode", ["on", "mutual"])
def test_new_secrets_are_random_and_fit_every_whitelist(mode: str) -> None:
    made = [chap_for(U1, mode) for _ in range(50)]  # type: ignore[arg-type]
    secrets = [m["chap_secret"] for m in made]
    assert len(set(secrets)) == 50 and {len(s) for s in secrets} == {SECRET_LENGTH}
    for m in made:
        names.chap_user(m["chap_user"])
        names.chap_secret(m["chap_secret"])
        if mode == "mutual":
            assert m["chap_mutual_secret"] != m["chap_secret"]
            names.chap_secret(m["chap_mutual_secret"])
        else:
            assert "chap_mutual_secret" not in m
    assert chap_for(U1, "off") == {}


def test_a_server_without_a_secret_keeps_only_the_initiator_acl() -> None:
    """Servers from before CHAP (store version < 3) keep exporting as they did: their nodes run."""
    legacy = target_auth(server(), NODE)
    assert legacy.chap_user is None and legacy.initiator_names == (NODE,)
    auth = target_auth(server(**chap_for(U1, "mutual")), NODE)
    assert auth.chap_user == f"node-{U1}" and auth.chap_mutual_user == f"target-{U1}"
    assert auth.initiator_names == (NODE,)  # the ACL stays, as a second check


def test_ctl_conf_renders_and_parses_chap_mutual() -> None:
    auth = target_auth(server(chap_user="node-x", chap_secret="aaaaaaaaaaaaaaaa", chap_mutual_user="target-x",
                              chap_mutual_secret="bbbbbbbbbbbbbbbb"), NODE)
    conf = ctlconf.from_specs([TargetSpec(f"{PREFIX}:{U1}", (stable_lun(f"tiny-OS-{U1}", 0, "S0"),), auth)],
                              ["0.0.0.0:3260"])
    text = ctlconf.render(conf)
    assert 'auth-type "chap-mutual"; chap-mutual "node-x" "aaaaaaaaaaaaaaaa" "target-x" "bbbbbbbbbbbbbbbb";' in text
    assert "\tchap " not in text and ' chap "' not in text  # one credential line: ctld takes one auth type
    assert ctlconf.parse(text) == conf


def test_ctl_conf_refuses_mutual_without_chap() -> None:
    bad = dataclasses.replace(target_auth(server(), NODE), chap_mutual_user="t", chap_mutual_secret="b" * 16)
    with pytest.raises(NameError_, match="mutual CHAP needs CHAP"):
        ctlconf.from_specs([TargetSpec(f"{PREFIX}:{U1}", (stable_lun(f"tiny-OS-{U1}", 0, "S0"),), bad)],
                           ["0.0.0.0:3260"])


def test_boot_configs_carry_both_directions() -> None:
    s = boot_spec(chap_user="node-x", chap_secret="aaaaaaaaaaaaaaaa", chap_mutual_user="target-x",
                  chap_mutual_secret="bbbbbbbbbbbbbbbb")
    line = kernel_cmdline(s)
    assert "ISCSI_USERNAME=node-x ISCSI_PASSWORD=aaaaaaaaaaaaaaaa" in line
    assert "ISCSI_IN_USERNAME=target-x ISCSI_IN_PASSWORD=bbbbbbbbbbbbbbbb" in line
    assert "rd.iscsi.in.username=target-x rd.iscsi.in.password=bbbbbbbbbbbbbbbb" in line
    script = render_ipxe(s).splitlines()
    sanhook = next(i for i, x in enumerate(script) if x.startswith("sanhook"))
    assert script.index("set reverse-username target-x") < sanhook
    assert script.index("set reverse-password bbbbbbbbbbbbbbbb") < sanhook


@pytest.mark.parametrize("change", [
    {"chap_mutual_user": "target-x", "chap_mutual_secret": "bbbbbbbbbbbbbbbb"},  # mutual without CHAP
    {"chap_user": "n", "chap_secret": "aaaaaaaaaaaaaaaa", "chap_mutual_user": "target-x"},  # half a pair
    {"chap_user": "n", "chap_secret": "aaaaaaaaaaaaaaaa", "chap_mutual_user": "t",
     "chap_mutual_secret": "has:colon"},  # ':' would split dracut's netroot
])
def test_boot_configs_refuse_bad_mutual(change: dict[str, str]) -> None:
    with pytest.raises(RenderError):
        kernel_cmdline(boot_spec(**change))
