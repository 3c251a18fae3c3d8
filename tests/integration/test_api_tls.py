"""`api.tls_listen`: the API over HTTPS, and a token never taken in clear from the boot LAN. On by
default ("auto": beside a non-loopback `api.listen`, here the embedded 0.0.0.0:8080).

`cello serve` runs in a network namespace of its own; the operator's machine and a stranger are a
second namespace on a veth to it (10.79.61.0/30, made and removed here). Real clients: curl, openssl and
`cello`'s own CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tls-test-admin-token-0123456789"
SERVER_IP, CLIENT_IP = "10.79.61.1", "10.79.61.2"
HTTPS = f"https://{SERVER_IP}:8443"
PLAIN = f"http://{SERVER_IP}:8080"


@dataclass
class Hosts:
    server: str  # the appliance's namespace
    client: str  # the operator's (or a stranger's) namespace on the same link

    def run(self, ns: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test needs root and iproute2 (CI runs as root; scripts/setup.sh installs iproute2)")
    tag = uuid.uuid4().hex[:6]
    made = Hosts(f"ctls-s-{tag}", f"ctls-c-{tag}")
    veth = f"ctls{tag}"
    try:
        for ns in (made.server, made.client):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", f"{veth}a", "netns", made.server, "type", "veth", "peer", "name",
                        f"{veth}b", "netns", made.client], check=True)
        for ns, dev, ip in ((made.server, f"{veth}a", SERVER_IP), (made.client, f"{veth}b", CLIENT_IP)):
            subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/30", "dev", dev], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", dev, "up"], check=True)
        yield made
    finally:
        for ns in (made.server, made.client):  # deleting a namespace takes its end of the veth with it
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _config(tmp: Path, api: str = "") -> Path:
    cfg = tmp / "cello.toml"
    cfg.write_text(f"""
[appliance]
state_dir = "{tmp / 'state'}"
advertise = "{SERVER_IP}"
[api]
admin_token = "{TOKEN}"
{api}
[tftp]
listen = "127.0.0.1:6969"
[dhcp]
enabled = false
[iscsi]
driver = "none"
""")
    return cfg


class Serve:
    def __init__(self, hosts: Hosts, config: Path) -> None:
        self.log = config.with_suffix(".log")
        self.start = self.log.stat().st_size if self.log.exists() else 0  # this start's lines only
        out = open(self.log, "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", hosts.server, sys.executable, "-m", "appliance",
                                      "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                     text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        out.close()
        deadline = time.monotonic() + 30
        while "api: listening on" not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.1)

    def text(self) -> str:
        with open(self.log) as f:
            f.seek(self.start)
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)


def _curl(hosts: Hosts, ns: str, url: str, *extra: str) -> tuple[int, dict[str, str], str]:
    """(HTTP status, headers, body) through curl in `ns`; status 0 when curl could not connect or verify."""
    done = hosts.run(ns, "curl", "-sS", "--max-time", "10", "-D", "-", "-H", f"Authorization: Bearer {TOKEN}",
                     *extra, url)
    head, _, body = done.stdout.partition("\n\n")  # text mode: curl's CRLFs read as "\n"
    status = re.match(r"HTTP/[\d.]+ (\d{3})", head)
    headers = dict(line.split(": ", 1) for line in head.splitlines()[1:] if ": " in line)
    return (int(status.group(1)) if status else 0), {k.lower(): v for k, v in headers.items()}, body + done.stderr


def _openssl_fingerprint(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1]


def test_the_api_is_served_over_tls_and_refused_in_clear_from_the_lan(tmp_path: Path, hosts: Hosts) -> None:
    config = _config(tmp_path)
    (tmp_path / "state" / "boot").mkdir(parents=True)
    (tmp_path / "state" / "boot" / "vmlinuz").write_bytes(b"kernel bytes")
    serve = Serve(hosts, config)
    try:
        cert = tmp_path / "state" / "tls" / "cert.pem"
        key = tmp_path / "state" / "tls" / "key.pem"
        # a self-signed certificate made at the first start, its key the owner's alone, its fingerprint logged
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        fingerprint = _openssl_fingerprint(cert)
        assert f"(self-signed, made now), SHA-256 fingerprint {fingerprint}" in serve.text()
        san = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
                             capture_output=True, text=True, check=True).stdout
        assert f"IP Address:{SERVER_IP}" in san, san

        # the operator, across the link: HTTPS with the certificate checked against that file
        status, _, body = _curl(hosts, hosts.client, f"{HTTPS}/api/v1/users", "--cacert", str(cert))
        assert status == 200 and json.loads(body) == [], body
        # without it curl refuses the certificate (it is nobody's CA's)
        status, _, body = _curl(hosts, hosts.client, f"{HTTPS}/api/v1/users")
        assert status == 0 and "certificate" in body, body

        # the plain listener takes no token from the LAN, whatever the route, and says where the API is
        for method, path in (("GET", "/api/v1/users"), ("POST", "/api/v1/users"),
                             ("GET", f"/api/v1/servers/{uuid.uuid4()}")):
            status, _, body = _curl(hosts, hosts.client, PLAIN + path, "-X", method)
            assert status == 403, (method, path, body)
            assert json.loads(body) == {"error": "tls_required", "detail": "this listener serves boot files; the "
                                        f"API is at {HTTPS} (HTTPS)"}
        # the dashboard's page sends the browser there before a token is typed
        status, headers, _ = _curl(hosts, hosts.client, f"{PLAIN}/")
        assert status == 308 and headers["location"] == f"{HTTPS}/"
        # what nodes fetch stays on plain HTTP: boot files, health, metrics
        status, _, body = _curl(hosts, hosts.client, f"{PLAIN}/boot/files/vmlinuz")
        assert (status, body) == (200, "kernel bytes")
        assert _curl(hosts, hosts.client, f"{PLAIN}/api/v1/health")[0] == 200
        assert _curl(hosts, hosts.client, f"{PLAIN}/metrics")[0] == 200
        # on the appliance itself the plain listener still answers the local CLI: over loopback, or to the
        # host's own address (that connection never leaves the host)
        assert _curl(hosts, hosts.server, "http://127.0.0.1:8080/api/v1/users")[0] == 200
        assert _curl(hosts, hosts.server, f"{PLAIN}/api/v1/users")[0] == 200

        # `cello`'s CLI across the link: with CELLO_CACERT it works; without, one line that says what to give
        env = {"CELLO_API": HTTPS, "CELLO_TOKEN": TOKEN}
        done = hosts.run(hosts.client, sys.executable, "-m", "appliance", "user", "create", "alice",
                         env={**env, "CELLO_CACERT": str(cert)})
        assert done.returncode == 0, done.stderr
        done = hosts.run(hosts.client, sys.executable, "-m", "appliance", "user", "list", "--json",
                         env={**env, "CELLO_CACERT": str(cert)})
        assert done.returncode == 0 and [u["name"] for u in json.loads(done.stdout)] == ["alice"], done.stderr
        done = hosts.run(hosts.client, sys.executable, "-m", "appliance", "user", "list", env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "CELLO_CACERT" in done.stderr, done.stderr
        done = hosts.run(hosts.client, sys.executable, "-m", "appliance", "user", "list", "--api", PLAIN, env=env)
        assert done.returncode == 1 and f"tls_required: this listener serves boot files; the API is at {HTTPS}" \
            in done.stderr, done.stderr
    finally:
        serve.stop()

    # the next start keeps the certificate: what clients were given stays valid
    serve = Serve(hosts, config)
    try:
        assert f"{cert}, SHA-256 fingerprint {fingerprint}" in serve.text()
        assert "made now" not in serve.text()
        assert _curl(hosts, hosts.client, f"{HTTPS}/api/v1/users", "--cacert", str(cert))[0] == 200
    finally:
        serve.stop()


def test_an_operators_certificate_is_served_and_a_bad_pair_refuses_the_start(tmp_path: Path, hosts: Hosts) -> None:
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=cello.site.test",
                    "-addext", f"subjectAltName=DNS:cello.site.test,IP:{SERVER_IP}"],
                   check=True, capture_output=True)
    config = _config(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"')
    serve = Serve(hosts, config)
    try:
        assert f"TLS on 0.0.0.0:8443 with {cert}, SHA-256 fingerprint {_openssl_fingerprint(cert)}" in serve.text()
        assert not (tmp_path / "state" / "tls").exists()  # nothing self-signed made beside it
        status, _, body = _curl(hosts, hosts.client, f"{HTTPS}/api/v1/users", "--cacert", str(cert))
        assert status == 200, body
    finally:
        serve.stop()

    for api, problem in ((f'tls_cert = "{cert}"', "api.tls_cert and api.tls_key go together"),
                         (f'tls_cert = "{cert}"\ntls_key = "{tmp_path / "none.key"}"',
                          f"{tmp_path / 'none.key'}: no such file"),
                         (f'tls_cert = "{key}"\ntls_key = "{key}"', "not a PEM certificate and its own private key")):
        done = hosts.run(hosts.server, sys.executable, "-m", "appliance", "serve", "--config",
                         str(_config(tmp_path, api)))
        assert done.returncode != 0 and problem in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr

    # turned off on purpose: no HTTPS listener, and the plain one takes the API from the LAN as before
    serve = Serve(hosts, _config(tmp_path, 'tls_listen = ""'))
    try:
        assert "TLS on" not in serve.text() and "api: listening on 0.0.0.0:8080\n" in serve.text()
        assert _curl(hosts, hosts.client, f"{PLAIN}/api/v1/users")[0] == 200
        assert _curl(hosts, hosts.client, f"{HTTPS}/api/v1/users", "--cacert", str(cert))[0] == 0
    finally:
        serve.stop()
