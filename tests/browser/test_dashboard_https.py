"""The dashboard over HTTPS (`api.tls_listen`), in Chromium, on the appliance's self-signed certificate.

The browser trusts that one certificate only through its public key's pin
(`--ignore-certificate-errors-spki-list`, the way an operator's browser is told to trust it); without the
pin the page does not load: the browser really checks. Everything the page does then — the login, the
panels, the event stream, a create — goes over TLS.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import Page, chromium, script_errors
from tests.browser.live import LiveStack
from tests.integration.test_api_stack import uuid_n


@pytest.fixture
def live_tls(tmp_path: Path) -> Iterator[LiveStack]:
    stack = LiveStack(tmp_path / "stack", sections={"api": 'listen = "127.0.0.1:8080"\ntls_listen = "127.0.0.1:8443"'})
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _spki_pin(cert: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_the_dashboard_works_over_https_on_a_pinned_self_signed_certificate(live_tls: LiveStack,
                                                                            tmp_path: Path) -> None:
    tls = live_tls.s.appliance.tls
    assert tls is not None and tls.made and live_tls.url.startswith("https://")
    logs = tmp_path / "logs"
    logs.mkdir()

    # no pin: Chromium refuses the certificate, and no login form is shown
    with chromium(tmp_path / "profile-no-pin") as driver:
        page = Page(driver, logs)
        page.d.get(live_tls.url + "/")
        assert not page.css("#token")
        assert "privacy" in page.d.title.lower() or "ERR_CERT" in page.d.page_source, page.d.title

    with chromium(tmp_path / "profile", f"--ignore-certificate-errors-spki-list={_spki_pin(tls.cert)}") as driver:
        page = Page(driver, logs)
        page.login(live_tls.url, live_tls.s.admin_token)
        page.wait("the services", lambda: page.css('#panel-services tr[data-service="tftp"]'))
        page.wait("the event stream", lambda: "live" in page.text("#stream"))  # EventSource over TLS
        uuid = uuid_n(0xE1)
        page.one("#create-uuid").send_keys(uuid)
        page.one("#create-macs").send_keys("52:54:00:77:00:e1")
        page.click('#create-user option[value="alice"]')
        page.click("#create-server button[type=submit]")
        page.wait("the new server available", lambda: page.css(f'tr[data-server="{uuid}"][data-state="available"]'))
        assert page.d.execute_script("return location.protocol") == "https:"
        assert script_errors(page.console()) == []
