"""BMC URLs: what parses, into what, and what is refused with which message."""

from __future__ import annotations

import pytest

from bmc import BmcAddress, parse_bmc_url


@pytest.mark.parametrize(("url", "address"), [
    ("redfish://10.0.0.9/1", BmcAddress("redfish", "10.0.0.9", 80, "1")),
    ("redfish://bmc-7.rack3.example:8000/System.Embedded.1",
     BmcAddress("redfish", "bmc-7.rack3.example", 8000, "System.Embedded.1")),
    ("REDFISH://BMC7/437XR1138R2/", BmcAddress("redfish", "bmc7", 80, "437XR1138R2")),
    ("redfish://127.0.0.1:8000", BmcAddress("redfish", "127.0.0.1", 8000, None)),
    ("redfish://[fd77::9]:8000/e8c270e6-9b99-40df-82e4-213915562182",
     BmcAddress("redfish", "fd77::9", 8000, "e8c270e6-9b99-40df-82e4-213915562182")),
    ("redfish+https://10.0.0.9/1", BmcAddress("redfish", "10.0.0.9", 443, "1", "https", True)),
    ("redfish+https://10.0.0.9:8443/1?verify=off", BmcAddress("redfish", "10.0.0.9", 8443, "1", "https", False)),
    ("redfish+https://10.0.0.9/1?verify=on", BmcAddress("redfish", "10.0.0.9", 443, "1", "https", True)),
    ("ipmi://10.0.0.9", BmcAddress("ipmi", "10.0.0.9", 623, None)),
    ("ipmi://10.0.0.9:6230/", BmcAddress("ipmi", "10.0.0.9", 6230, None)),
    ("ipmi://[::1]:6230", BmcAddress("ipmi", "::1", 6230, None)),
    ("ipmi://h?cipher=3", BmcAddress("ipmi", "h", 623, None, cipher_suite=3)),
    ("ipmi://h:6230/?cipher=17", BmcAddress("ipmi", "h", 6230, None, cipher_suite=17)),
])
def test_parses(url: str, address: BmcAddress) -> None:
    assert parse_bmc_url(url) == address


@pytest.mark.parametrize(("url", "shown"), [
    ("redfish://10.0.0.9/1", "redfish://10.0.0.9:80/1"),
    ("redfish+https://h/1?verify=off", "redfish+https://h:443/1?verify=off"),
    ("ipmi://[fd77::9]", "ipmi://[fd77::9]:623"),
    ("ipmi://h?cipher=3", "ipmi://h:623?cipher=3"),
])
def test_shows_itself_normalised_and_parses_back(url: str, shown: str) -> None:
    address = parse_bmc_url(url)
    assert str(address) == shown and parse_bmc_url(shown) == address


def test_base_url() -> None:
    assert parse_bmc_url("redfish://[fd77::9]:8000/1").base_url == "http://[fd77::9]:8000"
    assert parse_bmc_url("redfish+https://h/1").base_url == "https://h:443"


@pytest.mark.parametrize(("url", "message"), [
    ("", "BMC URL is empty"),
    ("10.0.0.9", "scheme must be redfish, redfish+https or ipmi, not ''"),
    ("http://10.0.0.9/redfish/v1", "scheme must be redfish, redfish+https or ipmi, not 'http'"),
    ("ipmi://", "names no host"),
    ("redfish:///1", "names no host"),
    ("ipmi://10.0.0.9:0", "port must be 1-65535"),
    ("ipmi://10.0.0.9:70000", "is malformed: Port out of range"),
    ("ipmi://10.0.0.9:x", "is malformed"),
    ("ipmi://10.0.0.9/1", "an ipmi:// URL is only ipmi://host[:port][?cipher=N]"),
    ("ipmi://10.0.0.9?verify=off", "the only option of an ipmi:// URL is ?cipher=N"),
    ("ipmi://10.0.0.9?cipher=0", "an RMCP+ cipher suite from 1 to 17"),  # suite 0: no authentication
    ("ipmi://10.0.0.9?cipher=18", "an RMCP+ cipher suite from 1 to 17"),
    ("ipmi://10.0.0.9?cipher=03", "an RMCP+ cipher suite from 1 to 17"),
    ("ipmi://10.0.0.9?cipher=3&cipher=3", "the only option of an ipmi:// URL is ?cipher=N"),
    ("redfish://10.0.0.9/1?cipher=3", "the only option is ?verify=off"),
    ("redfish://bad_host/1", "host 'bad_host' is neither a DNS name nor an IP address"),
    ("redfish://-h/1", "neither a DNS name nor an IP address"),
    ("redfish://10.0.0.999/1", "neither a DNS name nor an IP address"),
    ("redfish://h/a/b", "SystemId 'a/b' must be one path segment"),
    ("redfish://h/..", "SystemId '..' must be one path segment"),
    ("redfish://h/%2e%2e", "SystemId '..' must be one path segment"),
    ("redfish://h/a%2Fb", "SystemId 'a/b' must be one path segment"),
    ("redfish://h/1?verify=off", "the only option is ?verify=off, on redfish+https:// URLs"),
    ("redfish+https://h/1?verify=no", "the only option is ?verify=off"),
    ("redfish+https://h/1?insecure=1", "the only option is ?verify=off"),
    ("redfish+https://h/1?verify=off&verify=off&x", "the only option"),
    ("redfish://h/1#top", "a '#' fragment means nothing here"),
    ("redfish://h /1", "has spaces or control characters"),
    ("redfish://h/1\n", "has spaces or control characters"),
    ("redfish://h/" + "a" * 600, "over 512 chars"),
])
def test_refuses(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_bmc_url(url)
    assert message in str(caught.value)


def test_credentials_in_the_url_are_refused_without_repeating_them() -> None:
    with pytest.raises(ValueError) as caught:
        parse_bmc_url("redfish://admin:hunter2@10.0.0.9/1")
    assert "credentials do not belong in the URL" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "admin" not in str(caught.value)
    with pytest.raises(ValueError) as caught:  # a secret in a URL refused for another reason is masked too
        parse_bmc_url("redfish://admin:hunter2@10.0.0.9/1 ")
    assert "hunter2" not in str(caught.value)


def test_an_address_is_frozen() -> None:
    address = parse_bmc_url("ipmi://h")
    with pytest.raises(AttributeError):
        address.port = 1  # type: ignore[misc]
