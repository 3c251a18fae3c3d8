"""web/tls.py and the plain listener's rule (web/auth.py): what is taken as loopback, what a start refuses."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from appliance.config import ApiConfig, tls_listen
from web import tls
from web.auth import _loopback


@pytest.mark.parametrize(("remote", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.79.61.2", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("", False), (None, False),
])
def test_only_this_hosts_loopback_may_send_a_token_in_clear(remote: str | None, loopback: bool) -> None:
    assert _loopback(remote) is loopback


@pytest.mark.parametrize(("listen", "tls", "effective"), [
    ("0.0.0.0:8080", "auto", "0.0.0.0:8443"), ("10.0.0.2:80", "auto", "10.0.0.2:8443"),
    ("[::]:8080", "auto", "[::]:8443"),
    ("127.0.0.1:8080", "auto", ""), ("[::1]:8080", "auto", ""), ("localhost:8080", "auto", ""),  # nothing to guard
    ("0.0.0.0:8080", "", ""), ("127.0.0.1:8080", "127.0.0.1:9443", "127.0.0.1:9443"),
])
def test_https_is_on_by_default_wherever_the_api_is_reachable_from_a_network(listen: str, tls: str,
                                                                             effective: str) -> None:
    assert tls_listen(ApiConfig(listen=listen, tls_listen=tls)) == effective
    assert ApiConfig().tls_listen == "auto" and tls_listen(ApiConfig()) == "0.0.0.0:8443"


def test_a_self_signed_certificate_is_made_once_and_kept(tmp_path: Path) -> None:
    first = tls.server_certificate("", "", tmp_path / "tls", ["10.0.0.5", "cello-a", "127.0.0.1"])
    again = tls.server_certificate("", "", tmp_path / "tls", ["10.0.0.5"])
    assert first.made and not again.made and first.fingerprint == again.fingerprint
    assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert not list((tmp_path / "tls").glob("*.tmp"))
    # a client holding only that file checks the certificate (it is its own anchor), names included
    info = ssl._ssl._test_decode_cert(str(first.cert))  # type: ignore[attr-defined]
    assert ("IP Address", "10.0.0.5") in info["subjectAltName"] and ("DNS", "cello-a") in info["subjectAltName"]
    assert len(first.fingerprint) == 95 and first.fingerprint.count(":") == 31
    # two appliances' certificates never share a subject (a CA file of both finds each one's issuer)
    other = tls.server_certificate("", "", tmp_path / "other", ["10.0.0.5"])
    assert ssl._ssl._test_decode_cert(str(other.cert))["subject"] != info["subject"]  # type: ignore[attr-defined]


def test_a_pair_that_does_not_load_is_named(tmp_path: Path) -> None:
    made = tls.server_certificate("", "", tmp_path / "tls", ["127.0.0.1"])
    with pytest.raises(tls.TlsError, match="go together"):
        tls.server_certificate(str(made.cert), "", tmp_path, [])
    with pytest.raises(tls.TlsError, match=r"nope\.pem: no such file"):
        tls.server_certificate(str(tmp_path / "nope.pem"), str(made.key), tmp_path, [])
    with pytest.raises(tls.TlsError, match="not a PEM certificate"):
        tls.server_certificate(str(made.key), str(made.key), tmp_path, [])
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match="not a PEM certificate and its own private key"):
        tls.server_certificate(str(tmp_path / "junk.pem"), str(made.key), tmp_path, [])
